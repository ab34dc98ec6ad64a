"""depthlab.experiments: chapter 5's experiments from the command line, the same records in one
process and over two torchrun processes, with chapter 5's own settings."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import depthlab as dl
from depthlab import experiments

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "steps=3", "--set", "seeds=1", "--set", "lrs=[0.001, 0.01]", "--set",
        "batch=4"]


def _chapter5_code() -> str:
    nb = json.loads((ROOT / "chapters" / "05_pre_ln_vs_post_ln.ipynb").read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_chapter_5_runs_these_experiments_and_restates_none_of_their_settings():
    """SCALES is the one place the two experiments' settings are written: chapter 5 calls
    ``run`` for both (so the page and the command line run the same code) and spells out none
    of their settings itself (chapter 5's settings used to be a copy, kept equal by a test)."""
    code = _chapter5_code()
    assert 'experiments.run("lr-map", SCALE' in code
    assert 'experiments.run("xiong-profile", SCALE' in code
    for spelled_out in (r"\blrs=\[", r"\bdepths=\[", r"\bprobe_batch=", r"xiong_d"):
        assert not re.search(spelled_out, code), spelled_out


def test_unknown_settings_and_scales_are_refused():
    with pytest.raises(ValueError, match="no setting 'stepz'"):
        experiments.settings("lr-map", "cpu", {"stepz": 3})
    with pytest.raises(ValueError, match="unknown scale"):
        experiments.settings("lr-map", "tpu")
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.settings("lr-mop", "cpu")


def _cli(out: Path, *args: str, procs: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DEPTHLAB_QUIET="1", DEPTHLAB_WORKERS="1")
    env.pop("WORLD_SIZE", None)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(procs)] if procs > 1 else [sys.executable])
    cmd = [*launch, "-m", "depthlab.experiments", *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return experiments.load(out)


def test_the_lr_map_is_the_same_on_one_process_and_on_two(tmp_path):
    one = _cli(tmp_path / "one.json", "lr-map", *TINY)
    two = _cli(tmp_path / "two.json", "lr-map", *TINY, procs=2)
    assert len(one["records"]) == 2 * 3 * 1                # lrs x blocks x seeds
    assert one["records"] == two["records"]               # JSON floats: exactly equal
    assert one["settings"]["steps"] == 3
    # per-step loss and gradient norm for every run (chapter 5 draws both)
    assert all(len(r["loss"]) == 3 and len(r["grad_norm"]) == 3 for r in one["records"])
    assert [(r["lr"], r["block"]) for r in one["records"]] == [
        (lr, b) for lr in (0.001, 0.01) for b in experiments.LR_MAP_BLOCKS]
    acc = experiments.lr_map_accuracy(one)
    assert set(acc) == set(experiments.LR_MAP_BLOCKS) and acc["Pre-LN"].shape == (2, 1)
    # what the chapter draws from such a file passes the book's figure check
    dl.plots.check_figure(experiments.plot_lr_map(one))


def test_the_xiong_profile_records_a_gradient_per_block(tmp_path):
    result = _cli(tmp_path / "x.json", "xiong-profile", "--set", "depths=[2, 3]",
                  "--set", "seeds=1", "--set", "d_model=16", "--set", "n_heads=2")
    depths = {(r["block"], r["depth"]): len(r["weight_grad_norm"]) for r in result["records"]}
    assert depths == {(b, d): d for b in experiments.PROFILE_BLOCKS for d in (2, 3)}
    # without its final norm, Pre-LN's last-layer gradient is that of another model
    last = {r["block"]: r["weight_grad_norm"][-1] for r in result["records"] if r["depth"] == 3}
    assert last["Pre-LN"] != last["Pre-LN, no final norm"]


def test_a_setting_that_is_not_json_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        experiments.main(["lr-map", "--out", str(tmp_path / "f.json"), "--set", "lrs=[1e-3"])
