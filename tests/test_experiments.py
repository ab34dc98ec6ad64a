"""depthlab.experiments: chapter 5's experiments from the command line, the same records in one
process and over two torchrun processes, with chapter 5's own settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import depthlab as dl
from depthlab import experiments

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "steps=3", "--set", "seeds=1", "--set", "lrs=[0.001, 0.01]", "--set",
        "batch=4"]


def _chapter5_settings() -> dict:
    """Chapter 5's S dictionary, read from the notebook's own source."""
    nb = json.loads((ROOT / "chapters" / "05_pre_ln_vs_post_ln.ipynb").read_text())
    src = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"
               and "S = {" in "".join(c["source"]))
    start = src.index("S = {")
    block = src[start:src.index("}[SCALE]", start) + 1]
    scope: dict = {}
    exec(block, scope)                                    # noqa: S102 (our own notebook)
    return scope["S"]


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_the_settings_are_chapter_5s(scale):
    chapter = _chapter5_settings()[scale]
    lr = experiments.SCALES["lr-map"][scale]
    for name in ("d_model", "n_heads", "depth", "n", "batch", "steps", "warmup", "lrs"):
        assert lr[name] == chapter[name], name
    xiong = experiments.SCALES["xiong-profile"][scale]
    assert xiong["d_model"] == chapter["xiong_d"]
    assert xiong["depths"] == chapter["xiong_depths"]
    assert xiong["probe_batch"] == chapter["probe_batch"]


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
    acc = experiments.lr_map_accuracy(one)
    assert set(acc) == set(experiments.LR_MAP_BLOCKS) and acc["Pre-LN"].shape == (2, 1)
    # what the chapter draws from such a file passes the book's figure check
    dl.plots.check_figure(experiments.plot_lr_map(one))


def test_the_xiong_profile_records_a_gradient_per_block(tmp_path):
    result = _cli(tmp_path / "x.json", "xiong-profile", "--set", "depths=[2, 3]",
                  "--set", "seeds=1", "--set", "d_model=16", "--set", "n_heads=2")
    depths = {(r["placement"], r["depth"]): len(r["weight_grad_norm"]) for r in result["records"]}
    assert depths == {("post", 2): 2, ("post", 3): 3, ("pre", 2): 2, ("pre", 3): 3}


def test_a_setting_that_is_not_json_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        experiments.main(["lr-map", "--out", str(tmp_path / "f.json"), "--set", "lrs=[1e-3"])
