"""The seed audit: re-run the chapters under other seed offsets and compare every verdict.

A reader who re-runs a chapter with other seeds must get the same verdicts. ``tasks.py audit``
executes every chapter under ``DEPTHLAB_SEED_OFFSET=k`` for each k (default 1 2 3), with claims
recorded rather than raised (``DEPTHLAB_CLAIMS_RAISE=0``, so one flipped claim does not hide the
rest of its chapter), each offset into its own ledger under ``_build/audit/``. It prints one row
per claim: its kind, the verdict the chapter expects, and per offset the verdict measured and
the margin of its tightest comparison; and exits non-zero if any verdict differs from the
expected one, or a chapter failed to run.

    python3 tasks.py audit                 offsets 1 2 3, every chapter
    python3 tasks.py audit --offsets 1 2 3 4 5 --chapters 02 05
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import execute  # noqa: E402

AUDIT = execute.BUILD / "audit"


def run(offsets: list[int], selected: list[Path], *, jobs: int = 2,
        out: Path = AUDIT, log=print) -> dict[int, dict]:
    """Execute ``selected`` under each offset; {offset: {"ledger": [...], "errors": {...}}}."""
    found = {}
    for k in offsets:
        ledger = out / f"offset-{k}.json"
        if ledger.exists():
            ledger.unlink()
        log(f"offset {k}:")
        results = execute.execute(selected, jobs=jobs, ledger=ledger, offset=k,
                                  raise_claims=False, use_cache=False,
                                  out=out / f"offset-{k}", log=log)
        records = json.loads(ledger.read_text())["claims"] if ledger.exists() else []
        found[k] = {"ledger": records,
                    "errors": {r.chapter: r.error for r in results if r.error}}
    return found


def _tightest(record: dict) -> float:
    """The smallest margin among the comparisons that decided the verdict."""
    role = "against" if record["verdict"] == "refuted" else "evidence"
    margins = [c["margin"] for c in record[role] if c.get("margin") is not None]
    margins = [m for m in margins if isinstance(m, (int, float)) and not math.isnan(m)]
    return min(margins) if margins else math.nan


def table(found: dict[int, dict]) -> tuple[str, bool]:
    """Markdown table claim × offset and whether every verdict was the expected one."""
    offsets = sorted(found)
    claims: dict[tuple[str, str], dict] = {}
    for k in offsets:
        for r in found[k]["ledger"]:
            claims.setdefault((r["chapter"], r["claim_id"]), {})[k] = r
    ok = not any(found[k]["errors"] for k in offsets)
    head = "| chapter | claim | kind | expected | " + " | ".join(f"offset {k}" for k in offsets)
    lines = [head + " |", "|" + "---|" * (4 + len(offsets))]
    for (chapter, claim), by_offset in sorted(claims.items()):
        first = next(iter(by_offset.values()))
        cells = []
        for k in offsets:
            r = by_offset.get(k)
            if r is None:
                cells.append("**not run**")
                ok = False
                continue
            m = _tightest(r)
            margin = "" if math.isnan(m) else f" ({m:+.2g})"
            flag = "" if r["as_expected"] else " **FLIP**"
            ok = ok and r["as_expected"]
            cells.append(f"{r['verdict']}{margin}{flag}")
        lines.append(f"| {chapter} | {claim} | {first['kind']} | {first['expected']} | "
                     + " | ".join(cells) + " |")
    for k in offsets:
        for chapter, error in found[k]["errors"].items():
            lines.append(f"\nchapter {chapter} failed at offset {k}:\n{error[-2000:]}")
    return "\n".join(lines), ok


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python3 tasks.py audit", description=__doc__)
    ap.add_argument("--offsets", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--chapters", nargs="*", default=None,
                    help="chapter numbers or names (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    found = run(args.offsets, execute.chapters(args.chapters), jobs=args.jobs)
    text, ok = table(found)
    AUDIT.mkdir(parents=True, exist_ok=True)
    (AUDIT / "table.md").write_text(text + "\n")
    print(text)
    print(f"\n{'every verdict as expected' if ok else 'VERDICTS FLIPPED (see FLIP)'}; "
          f"table in {AUDIT / 'table.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
