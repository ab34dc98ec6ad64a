#!/usr/bin/env bash
# The checks that need a GPU, in one run of at most 8 minutes; one JSON report (gpu_check.json
# in $OUT, or ./gpu-check). See benchmarks/gpu_check.py for what it runs.
#
# On a machine with CUDA and PyTorch (no Jupyter needed), from the repository root:
#     bash benchmarks/gpu_check.sh
# Record what it found in the README's "On a GPU" section.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'" || exit 2
exec timeout 480 $PY benchmarks/gpu_check.py --out "${OUT:-gpu-check}" "$@"
