"""Everything this project can only check on a GPU, in one run of at most 8 minutes.

Run by ``benchmarks/gpu_check.sh`` on a machine with CUDA (see its header for how, and the
README's "On a GPU" for what it found). It writes one JSON report, ``gpu_check.json``:

1. ``tests``: the library's CUDA tests (``tests/test_cuda.py``, which the CPU-only CI skips)
   and the grouped-training tests run with every run on CUDA;
2. ``chapters``: every chapter at its CPU settings with every run sent to CUDA
   (``DEPTHLAB_DEVICE=cuda``), its claims logged to a ledger instead of raising: each claim's
   verdict is compared with the one the chapter states, which CI confirms on the CPU;
3. ``gpu_scale``: the first minute of each chapter's ``SCALE = "gpu"`` settings (never run
   before a GPU was at hand): how far it got, and any error.

The chapters run as plain Python, cell by cell (the GPU machine has PyTorch but no Jupyter),
four at a time. A missing IPython is replaced by a stand-in whose ``display`` does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))


def cells_of(path: Path, scale: str | None = None) -> list[str]:
    """The chapter's code cells as Python: IPython's ``%`` and ``!`` lines become ``pass``;
    with ``scale`` the line ``SCALE = "cpu"`` is changed to that scale."""
    nb = json.loads(path.read_text())
    out = []
    for c in nb["cells"]:
        if c["cell_type"] != "code":
            continue
        src = "".join(c["source"])
        src = re.sub(r"^(\s*)[%!].*$", r"\1pass", src, flags=re.M)
        if scale is not None:
            src = src.replace('SCALE = "cpu"', f'SCALE = "{scale}"')
        out.append(src)
    return out


def _ipython_stand_in() -> None:
    """Enough of IPython for the chapters to run without it: display() does nothing."""
    try:
        import IPython.display  # noqa: F401 (the real one is there: use it)
        return
    except ImportError:
        pass
    ipython = types.ModuleType("IPython")
    display = types.ModuleType("IPython.display")
    display.display = lambda *a, **k: None
    display.Markdown = display.HTML = lambda text: text
    ipython.display = display
    ipython.get_ipython = lambda: None
    sys.modules["IPython"], sys.modules["IPython.display"] = ipython, display


def run_chapter(path: Path, scale: str | None, progress: Path) -> None:
    """Run a chapter's cells in this process, writing the number of cells done to
    ``progress`` after each one (so that a run stopped by a time limit says how far it got)."""
    _ipython_stand_in()
    path = path.resolve()
    os.chdir(path.parent)
    namespace = {"__name__": "__main__"}
    cells = cells_of(path, scale)
    for i, src in enumerate(cells):
        exec(compile(src, f"{path.name}:cell{i}", "exec"), namespace)  # noqa: S102 (our own)
        progress.write_text(f"{i + 1} {len(cells)}")


def _child(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "lib"))
    run_chapter(Path(args.chapter), args.scale, Path(args.progress))
    return 0


def _run(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, float, str]:
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT)
        return p.returncode, time.perf_counter() - start, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
            errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout or "")
        return None, time.perf_counter() - start, text[-3000:]


def _env(out: Path, **extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "lib"), MPLBACKEND="Agg", DEPTHLAB_QUIET="1",
               DEPTHLAB_STATIC="1", OMP_NUM_THREADS="4", PYTHONUNBUFFERED="1", **extra)
    env.pop("DEPTHLAB_SEED_OFFSET", None)
    return env


def chapter_on_cuda(path: Path, out: Path, timeout: float) -> dict:
    ledger, progress = out / f"ledger-{path.stem}.json", out / f"progress-{path.stem}.txt"
    env = _env(out, DEPTHLAB_DEVICE="cuda", DEPTHLAB_LEDGER=str(ledger),
               DEPTHLAB_CLAIMS_RAISE="0")
    code, seconds, text = _run([sys.executable, __file__, "--child", "--chapter", str(path),
                                "--progress", str(progress)], env, timeout)
    records = json.loads(ledger.read_text())["claims"] if ledger.exists() else []
    unexpected = [f"{r['claim_id']}: {r['verdict']} (stated {r['expected']})"
                  for r in records if not r["as_expected"]]
    return {"seconds": round(seconds, 1), "finished": code == 0, "claims": len(records),
            "unexpected": unexpected, "cells": progress.read_text() if progress.exists()
            else "0", "error": None if code == 0 else text}


def gpu_scale_minute(path: Path, out: Path, seconds: float) -> dict | None:
    if 'SCALE = "cpu"' not in "".join(cells_of(path)):
        return None
    progress = out / f"progress-gpu-{path.stem}.txt"
    env = _env(out, DEPTHLAB_LEDGER=str(out / f"ledger-gpu-{path.stem}.json"),
               DEPTHLAB_CLAIMS_RAISE="0")
    code, took, text = _run([sys.executable, __file__, "--child", "--chapter", str(path),
                             "--scale", "gpu", "--progress", str(progress)], env, seconds)
    return {"cells_done": progress.read_text() if progress.exists() else "0",
            "stopped_at_limit": code is None, "finished": code == 0,
            "error": None if code in (0, None) else text}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chapter", help=argparse.SUPPRESS)
    ap.add_argument("--scale", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)
    ap.add_argument("--chapter-timeout", type=float, default=240)
    ap.add_argument("--gpu-minute", type=float, default=60)
    ap.add_argument("--jobs", type=int, default=4)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # ledgers, progress: $OUT takes 8
    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                    else None}
    start = time.perf_counter()
    code, took, text = _run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                             "no:cacheprovider", "tests/test_cuda.py", "tests/test_grouped.py"],
                            _env(out), 150)
    report["tests"] = {"passed": code == 0, "seconds": round(took, 1), "tail": text[-1500:]}
    print(f"tests: {'passed' if code == 0 else 'FAILED'} in {took:.0f} s", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(CHAPTERS, pool.map(lambda p: chapter_on_cuda(p, scratch,
                                                                     args.chapter_timeout),
                                           CHAPTERS)))
    report["chapters"] = {p.stem: r for p, r in done.items()}
    for p, r in done.items():
        print(f"{p.stem}: {r['seconds']} s, cells {r['cells']}, {r['claims']} claims, "
              f"unexpected {r['unexpected'] or 'none'}" + ("" if r["finished"] else " FAILED"),
              flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        gpu = dict(zip(CHAPTERS, pool.map(lambda p: gpu_scale_minute(p, scratch, args.gpu_minute),
                                          CHAPTERS)))
    report["gpu_scale"] = {p.stem: r for p, r in gpu.items() if r is not None}
    for stem, r in report["gpu_scale"].items():
        print(f"SCALE=gpu {stem}: cells done {r['cells_done']}, "
              f"{'error' if r['error'] else 'no error'}", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    ok = (report["tests"]["passed"] and all(r["finished"] and not r["unexpected"]
                                            for r in report["chapters"].values()))
    print(f"gpu check {'passed' if ok else 'FAILED'} in {report['seconds']:.0f} s; report: "
          f"{out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
