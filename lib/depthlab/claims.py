"""Claims: every statement the book makes is checked against numbers measured in the run.

A chapter opens a ``ClaimBook`` and calls ``check`` once per claim, with the evidence as
comparisons (``below``, ``above``, ``between``). The claim *holds* when every comparison passes
and is *refuted* otherwise. The book states in advance which verdict it expects: ``"holds"`` for
a claim it supports, ``"refuted"`` for a myth it sets out to refute. ``check`` renders a verdict
box with the numbers and raises ``AssertionError`` when the measured verdict is not the expected
one, so a notebook whose evidence changed fails its test instead of publishing a stale sentence.

Every check is written (upserted by claim id) to a JSON ledger when ``DEPTHLAB_LEDGER`` names a
file; the book's build sets it, and the "Claims ledger" page lists the ledger.

Thresholds come from the science (a decade of change, chance level, float resolution), stated
in the comparison's text, never tuned until a check passes.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

LEDGER_ENV = "DEPTHLAB_LEDGER"
VERDICTS = ("holds", "refuted")


def _fmt(x: float) -> str:
    if isinstance(x, bool):
        return str(x)
    if x == 0 or not math.isfinite(x):
        return str(x)
    ax = abs(x)
    return f"{x:.3g}" if 1e-3 <= ax < 1e4 else f"{x:.2e}"


def span(values: float | Sequence[float], fmt: str = "{:.2f}") -> str:
    """Lowest to highest of ``values`` as text, e.g. "0.57–0.61" (one value: just that value).

    For printing a result measured over several seeds as the range it is.
    """
    v = _values(values)
    lo, hi = min(v), max(v)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _values(value: float | Sequence[float]) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


@dataclass(frozen=True)
class Comparison:
    """One piece of evidence: a measured quantity (one value, or one per seed) and a bound.

    With several values (seeds), the comparison is judged on the worst one: every seed must
    satisfy it.
    """

    quantity: str
    values: tuple[float, ...]
    op: str                  # "<", ">", "in"
    bound: tuple[float, ...]
    over: str = "values"     # what several values are: "seeds", "depths", "configurations"

    @property
    def passed(self) -> bool:
        vals = self.values
        if any(math.isnan(v) for v in vals):
            return False
        if self.op == "<":
            return max(vals) < self.bound[0]
        if self.op == ">":
            return min(vals) > self.bound[0]
        lo, hi = self.bound
        return all(lo <= v <= hi for v in vals)

    def describe(self) -> str:
        vals = self.values
        shown = (_fmt(vals[0]) if len(vals) == 1
                 else f"{_fmt(min(vals))} to {_fmt(max(vals))} over {len(vals)} {self.over}")
        if self.op == "in":
            rule = f"in [{_fmt(self.bound[0])}, {_fmt(self.bound[1])}]"
        else:
            rule = f"{self.op} {_fmt(self.bound[0])}"
        mark = "✓" if self.passed else "✗"
        return f"{self.quantity} = {shown}  (needs {rule}) {mark}"


def below(quantity: str, value: float | Sequence[float], bound: float, *,
          over: str = "values") -> Comparison:
    """Evidence that ``value`` (every value, if several) is below ``bound``.

    ``over`` names what the several values are ("seeds", "depths") in the verdict text.
    """
    return Comparison(quantity, tuple(_values(value)), "<", (float(bound),), over)


def above(quantity: str, value: float | Sequence[float], bound: float, *,
          over: str = "values") -> Comparison:
    """Evidence that ``value`` (every value, if several) is above ``bound``."""
    return Comparison(quantity, tuple(_values(value)), ">", (float(bound),), over)


def between(quantity: str, value: float | Sequence[float], low: float, high: float, *,
            over: str = "values") -> Comparison:
    """Evidence that ``value`` (every value, if several) lies in [low, high]."""
    return Comparison(quantity, tuple(_values(value)), "in", (float(low), float(high)), over)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one ``ClaimBook.check``."""

    claim_id: str
    chapter: str
    statement: str
    source: str
    expected: str
    verdict: str
    evidence: tuple[Comparison, ...]
    note: str = ""

    @property
    def as_expected(self) -> bool:
        return self.verdict == self.expected

    def to_record(self) -> dict:
        d = asdict(self)
        d["evidence"] = [dict(quantity=c.quantity, values=list(c.values), op=c.op,
                              bound=list(c.bound), passed=c.passed, text=c.describe())
                         for c in self.evidence]
        d["as_expected"] = self.as_expected
        return d

    def to_text(self) -> str:
        lines = [f"[{self.verdict.upper()}] {self.statement}"]
        lines += [f"    {c.describe()}" for c in self.evidence]
        if not self.as_expected:
            lines.append(f"    UNEXPECTED: the book states this claim {self.expected}")
        return "\n".join(lines)

    def to_html(self) -> str:
        if not self.as_expected:
            colour, label = "#b00020", f"{self.verdict} — the book expected {self.expected}!"
        elif self.verdict == "holds":
            colour, label = "#1b7f3b", "holds"
        else:
            colour, label = "#a15c00", "refuted (a myth)"
        items = "".join(f"<li><code>{html.escape(c.describe())}</code></li>"
                        for c in self.evidence)
        src = f" <em>({html.escape(self.source)})</em>" if self.source else ""
        note = f"<div style='margin-top:4px'>{html.escape(self.note)}</div>" if self.note else ""
        return (
            f"<div class='depthlab-claim' style='border-left:6px solid {colour};"
            f"background:#ffffff;color:#1a1a1a;padding:8px 12px;margin:8px 0;"
            f"border-radius:4px;box-shadow:0 0 0 1px #ddd'>"
            f"<div><strong style='color:{colour}'>Claim {html.escape(self.claim_id)}: "
            f"{html.escape(label)}</strong></div>"
            f"<div>{html.escape(self.statement)}{src}</div>"
            f"<ul style='margin:4px 0 0 0'>{items}</ul>{note}</div>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        return self.to_text()


@dataclass
class ClaimBook:
    """The claims of one chapter. ``chapter`` names it in the ledger (e.g. "01_vanishing")."""

    chapter: str
    ledger: str | None = None          # path; None = the DEPTHLAB_LEDGER variable, if set
    verdicts: dict[str, Verdict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A chapter that runs again starts its ledger section afresh, so a claim that was
        # removed from the notebook does not linger in the ledger.
        path = self._path()
        if path is not None and path.exists():
            keep = [r for r in read_ledger(path) if r["chapter"] != self.chapter]
            _write_records(path, keep)

    def _path(self) -> Path | None:
        p = self.ledger or os.environ.get(LEDGER_ENV)
        return Path(p) if p else None

    def check(self, claim_id: str, statement: str, evidence: Comparison | Iterable[Comparison],
              *, expect: str = "holds", source: str = "", note: str = "",
              display: bool = True) -> None:
        """Judge a claim on its evidence, show the verdict, log it, and assert it.

        ``expect="refuted"`` marks a myth that the book refutes with this evidence.
        Raises ``AssertionError`` if the verdict differs from ``expect``. Like ``display``,
        it returns nothing (so the box is not shown twice at the end of a cell); the verdict
        is kept in ``self.verdicts[claim_id]``.
        """
        if expect not in VERDICTS:
            raise ValueError(f"expect={expect!r}; choose one of {VERDICTS}")
        ev = (evidence,) if isinstance(evidence, Comparison) else tuple(evidence)
        if not ev:
            raise ValueError("a claim needs at least one comparison as evidence")
        verdict = "holds" if all(c.passed for c in ev) else "refuted"
        v = Verdict(claim_id, self.chapter, statement, source, expect, verdict, ev, note)
        self.verdicts[claim_id] = v
        path = self._path()
        if path is not None:
            write_ledger_entry(path, v)
        if display:
            _show(v)
        if not v.as_expected:
            raise AssertionError(v.to_text())

    def summary(self) -> str:
        return "\n".join(v.to_text() for v in self.verdicts.values())


def verdict_table(rows: Sequence[Mapping[str, str]], claims: ClaimBook) -> str:
    """A Markdown table of remedies and their verdicts, every row backed by a checked claim.

    Each row maps column names to text and names its evidence under "claim": a claim id
    already checked in ``claims``. The table adds the claim's measured verdict, and refuses a
    row whose claim was never checked or did not come out as the chapter stated, so a cell
    cannot say more than the measurements did (chapter 6). Displayed in a notebook; returned.
    """
    if not rows:
        raise ValueError("verdict_table needs at least one row")
    columns = [c for c in rows[0] if c != "claim"] + ["checked claim"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        claim_id = row["claim"]
        if claim_id not in claims.verdicts:
            raise KeyError(f"row {row} cites claim {claim_id!r}, which was not checked")
        v = claims.verdicts[claim_id]
        if not v.as_expected:
            raise AssertionError(f"claim {claim_id!r} did not come out as stated")
        cells = [str(row[c]).replace("|", "/") for c in columns[:-1]]
        cells.append(f"`{claim_id}` ({'holds' if v.verdict == 'holds' else 'myth refuted'})")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
        if get_ipython() is not None:
            display(Markdown(text))
    except ImportError:
        pass
    return text


def _show(v: Verdict) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:                                        # plain Python: print instead
        print(v.to_text())
        return
    if get_ipython() is None:
        print(v.to_text())
    else:
        display(HTML(v.to_html()))


def read_ledger(path: Path | str) -> list[dict]:
    """All records in a ledger file, in chapter then claim order (empty if it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    records = json.loads(p.read_text())["claims"]
    return sorted(records, key=lambda r: (r["chapter"], r.get("order", 0)))


def write_ledger_entry(path: Path, v: Verdict) -> None:
    """Upsert one verdict by (chapter, claim id); written atomically."""
    records = {(r["chapter"], r["claim_id"]): r for r in read_ledger(path)}
    rec = v.to_record()
    key = (v.chapter, v.claim_id)
    same_chapter = [r for r in records.values() if r["chapter"] == v.chapter]
    rec["order"] = records[key]["order"] if key in records else len(same_chapter)
    rec["checked_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    records[key] = rec
    _write_records(path, list(records.values()))


def _write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"claims": records}, f, indent=1)
    os.replace(tmp, path)
