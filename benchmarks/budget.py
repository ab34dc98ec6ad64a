"""Chapter times against the budget, in reference steps that do not move with the machine.

Seconds depend on the machine (this project has seen the same chapter take 83 s and 169 s on
two machines of the same kind), so the budget is stated in **reference steps**: the time of
one step of a fixed plain-PyTorch workload, measured in the same run. Measured here:

0. the reference step: ``nn.TransformerEncoder``, width 32, 6 Pre-LN blocks of 4 heads, batch
   32 × 12 tokens, Adam, one thread; the median of several blocks of 20 steps, before and after
   the chapters (their ratio says how steady the machine was). Also one core's float32 matmul
   peak (512 × 512);
1. each chapter alone, from scratch, on both cores (how a reader runs it), with nbval (the
   test command's runner): seconds, reference steps, and its training arithmetic (every run's
   steps × ``training.step_flops``, logged by the loop) as a share of both cores' matmul
   peak: near 1 the chapter is arithmetic, far below it is PyTorch's fixed cost per operation
   and Python;
2. with ``--book``, the book as the build and the tests execute it (two chapters at a time, one
   core each): wall clock.

Budgets: 7,500 reference steps per chapter alone (about 90 s at 12 ms a step) and 45,000 for
the book (the chapters' sum). The results go to ``benchmarks/budget.json``; ``--write`` also
puts each chapter's measured time into its opening line ("⏱ about 75 s on a 2-core CPU
(6,300 reference steps)"), which ``tests/test_budget.py`` compares with the file (and with the
chapter's code: a changed chapter must be measured again). The status page shows the file.

Run from the repository root on an otherwise idle machine:
``.venv/bin/python benchmarks/budget.py [--write] [--book] [NN ...]`` (about 12 minutes for
all chapters; chapter numbers select some, and keep the others' entries).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import execute  # noqa: E402

RESULTS = ROOT / "benchmarks" / "budget.json"
CHAPTER_BUDGET, BOOK_BUDGET = 7_500, 45_000              # reference steps
STATED = re.compile(r"⏱ about [\d.]+ s on a 2-core CPU( \([\d,]+ reference steps\))?")


def code_hash(path: Path) -> str:
    """A chapter's code (its code cells, in order): what its running time depends on."""
    nb = json.loads(Path(path).read_text())
    code = "\n\0".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def stated(path: Path) -> tuple[float, int | None]:
    """(seconds, reference steps) a chapter states in its opening cell (0, None if it does
    not state them)."""
    nb = json.loads(Path(path).read_text())
    first = "".join(nb["cells"][0]["source"]) if nb.get("cells") else ""
    found = re.search(r"⏱ about ([\d.]+) s on a 2-core CPU(?: \(([\d,]+) reference steps\))?",
                      first)
    if not found:
        return 0.0, None
    return float(found.group(1)), int(found.group(2).replace(",", "")) if found.group(2) else None


class _Reference(nn.Module):
    """The reference workload: PyTorch's own Pre-LN encoder with embeddings and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 128, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)))


def reference_step_ms(blocks: int = 7, steps: int = 20) -> float:
    """Median milliseconds of one training step of the reference workload, one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = _Reference()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randint(0, 16, (32, 12))
        y = torch.randint(0, 16, (32, 12))
        loss_fn = nn.CrossEntropyLoss()

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x).reshape(-1, 16), y.reshape(-1)).backward()
            opt.step()

        for _ in range(5):
            step()
        times = []
        for _ in range(blocks):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - start) / steps)
        return 1e3 * statistics.median(times)
    finally:
        torch.set_num_threads(before)


def matmul_gflops(n: int = 512, repeats: int = 20) -> float:
    """One core's float32 matmul rate (GFLOP/s), median of ``repeats``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return 2 * n ** 3 / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(before)


def alone(paths: list[Path], ref_ms: float, peak: float) -> dict[str, dict]:
    """Each chapter alone on both cores, with its training arithmetic logged."""
    out = {}
    print(f"{'chapter, alone on 2 cores':30s} {'seconds':>8s} {'ref. steps':>10s} "
          f"{'arithmetic':>10s}   budget {CHAPTER_BUDGET:,} reference steps")
    for path in paths:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "arithmetic.jsonl"
            env = execute.kernel_env(None)
            env["DEPTHLAB_ARITHMETIC_LOG"] = str(log)
            _, seconds, error = execute._execute_one(str(path), env)
            runs = [json.loads(line) for line in log.read_text().splitlines()] \
                if log.exists() else []
        flops = sum(r["steps"] * r["flops_per_step"] for r in runs)
        share = flops / (seconds * 2 * peak * 1e9)               # both cores' peak
        steps = seconds / (ref_ms / 1e3)
        out[path.stem] = {"seconds": round(seconds, 1), "reference_steps": round(steps),
                          "code_hash": code_hash(path), "runs": len(runs),
                          "grouped_runs": sum(r["grouped"] for r in runs),
                          "arithmetic_gflop": round(flops / 1e9, 1),
                          "arithmetic_share": round(share, 3), "failed": bool(error)}
        flag = ("  FAILED" if error else "") + ("  OVER BUDGET" if steps > CHAPTER_BUDGET else "")
        print(f"{path.name:30s} {seconds:8.1f} {steps:10,.0f} {share:10.0%}{flag}")
        if error:
            print(error[-2000:])
    return out


def as_built(paths: list[Path]) -> float:
    print(f"\n{'book as built, 2 at a time':30s} {'seconds':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        results = execute.execute(paths, jobs=2, ledger=Path(tmp) / "ledger.json",
                                  use_cache=False, out=Path(tmp), log=lambda *_: None)
        wall = time.perf_counter() - start
    for r in results:
        print(f"{r.chapter + '.ipynb':30s} {r.seconds:8.1f}" + ("  FAILED" if r.error else ""))
    print(f"{'whole book, wall clock':30s} {wall:8.1f}")
    return wall


def write_stated(path: Path, entry: dict) -> None:
    """Put the measured time into the chapter's opening line."""
    nb = json.loads(path.read_text())
    first = "".join(nb["cells"][0]["source"])
    seconds = entry["seconds"]
    rounded = int(round(seconds / 5.0) * 5) if seconds >= 20 else int(round(seconds))
    new = f"⏱ about {rounded} s on a 2-core CPU ({entry['reference_steps']:,} reference steps)"
    if not STATED.search(first):
        raise SystemExit(f"{path.name}: its opening cell has no '⏱ about N s on a 2-core CPU'")
    nb["cells"][0]["source"] = STATED.sub(new, first, count=1).splitlines(keepends=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def main(args: list[str]) -> int:
    # argparse, so that a mistyped or unknown option (--help included) stops here instead of
    # starting a 12-minute measurement that overwrites budget.json
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", metavar="NN", help="chapters to measure "
                        "(default: all; the others keep their entries)")
    parser.add_argument("--write", action="store_true", help="also write each measured "
                        "chapter's time into its opening line")
    parser.add_argument("--book", action="store_true", help="also time the book as the build "
                        "executes it (two chapters at a time)")
    opts = parser.parse_args(args)
    paths = execute.chapters(opts.chapters or None)
    os.environ.setdefault("DEPTHLAB_QUIET", "1")
    ref_before, peak = reference_step_ms(), matmul_gflops()
    print(f"reference step {ref_before:.2f} ms; one core's matmul peak {peak:.1f} GFLOP/s\n")
    chapters = alone(paths, ref_before, peak)
    ref_after = reference_step_ms()
    ref = statistics.median([ref_before, ref_after])
    for entry in chapters.values():                  # in units of the run's median reference
        entry["reference_steps"] = round(entry["seconds"] / (ref / 1e3))
    total = sum(e["reference_steps"] for e in chapters.values())
    print(f"\nreference step before {ref_before:.2f} ms, after {ref_after:.2f} ms "
          f"(steady: {ref_after / ref_before:.2f}); in the median, {ref:.2f} ms, which the file "
          f"and the stated times use (the table above used the first):")
    for name, e in chapters.items():
        flag = "  OVER BUDGET" if e["reference_steps"] > CHAPTER_BUDGET else ""
        print(f"{name + '.ipynb':30s} {e['reference_steps']:19,}{flag}")
    print(f"these chapters: {total:,} reference steps")
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"chapters": {}}
    merged = {**old.get("chapters", {}), **chapters}
    book_steps = sum(e["reference_steps"] for e in merged.values())
    result = {
        "measured": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "reference_step_ms": round(ref, 2), "matmul_gflops": round(peak, 1),
        "chapters": dict(sorted(merged.items())),
        "book_reference_steps": book_steps,
    }
    if opts.book:
        result["book_as_built_seconds"] = round(as_built(paths), 1)
    elif "book_as_built_seconds" in old:
        result["book_as_built_seconds"] = old["book_as_built_seconds"]
    print(f"book (every chapter alone, summed): {book_steps:,} reference steps of "
          f"{BOOK_BUDGET:,}")
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    if opts.write:
        for path in paths:                 # markdown only: the code hash stays the same
            write_stated(path, chapters[path.stem])
    over = [n for n, e in chapters.items() if e["reference_steps"] > CHAPTER_BUDGET or e["failed"]]
    return 1 if over or book_steps > BOOK_BUDGET else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
