"""Claims: every statement the book makes is checked against numbers measured in the run.

A chapter opens a ``ClaimBook`` and calls ``check`` once per claim. The evidence is a list of
comparisons (``below``, ``above``, ``between``), each with the origin of its bound. Three
verdicts are possible:

- **holds**: every comparison in ``evidence`` passes;
- **refuted**: the evidence fails *and* every comparison in ``against`` passes: decisive
  evidence that contradicts the claim. Only a claim with such evidence can be refuted, so a
  comparison that could never pass adds nothing but a "not shown here";
- **not shown here**: neither. The effect did not appear at this scale or run length; that
  neither confirms nor refutes the claim (a width-32 model is not a width-768 one).

The chapter states in advance which verdict it expects; ``check`` shows a verdict box with the
numbers, their margins and spread over seeds, and raises ``AssertionError`` when the measured
verdict differs, so a notebook whose evidence changed fails its test instead of publishing a
stale sentence. (``DEPTHLAB_CLAIMS_RAISE=0`` records instead of raising: the seed audit uses it
to see every verdict of a chapter.)

Two kinds of claims: a **finding** is science (measured over at least 3 seeds from
``depthlab.seeds``, every seed must satisfy it); an **identity** is a parity check, an
algebraic identity or a property true by construction. Both are checked and shown; the ledger
lists them apart and counts findings only.

Every bound states where it comes from (``origin="chance: ..."``, ``"float: ..."``, ...), never
a number tuned until a check passes. Every check is written (upserted by claim id) to a JSON
ledger when ``DEPTHLAB_LEDGER`` names a file; the book's build sets it, and the "Claims
ledger" page lists it.
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

from .seeding import seed_offset

LEDGER_ENV = "DEPTHLAB_LEDGER"
RAISE_ENV = "DEPTHLAB_CLAIMS_RAISE"
VERDICTS = ("holds", "refuted", "not shown here")
KINDS = ("finding", "identity")
# Where a bound may come from. The word before the colon of ``origin`` must be one of these.
ORIGINS = {
    "chance": "chance level (uniform guessing, random vectors)",
    "float": "floating-point resolution",
    "paper": "a number reported in the cited paper",
    "theory": "a value derived from the theory the chapter states",
    "spread": "a multiple of the seed-to-seed spread",
    "decade": "a factor of 10 (or several) on a log scale",
    "definition": "the definition of the quantity (e.g. 'moves at all': > 0)",
}
MIN_SEEDS = 3


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
    satisfy it. ``origin`` says where the bound comes from; ``scale="log"`` measures the margin
    in decades (for quantities that span decades), otherwise relative to the bound.
    """

    quantity: str
    values: tuple[float, ...]
    op: str                  # "<", ">", "in"
    bound: tuple[float, ...]
    over: str = "values"     # what several values are: "seeds", "depths", "configurations"
    origin: str = ""         # "chance: 1/10 for ten classes", "decade: ...", ...
    scale: str = "linear"    # "linear" (margin relative to the bound) or "log" (decades)

    def __post_init__(self) -> None:
        if self.op not in ("<", ">", "in"):
            raise ValueError(f"op={self.op!r}; choose '<', '>' or 'in'")
        if self.scale not in ("linear", "log"):
            raise ValueError(f"scale={self.scale!r}; choose 'linear' or 'log'")
        if not self.values:
            raise ValueError(f"{self.quantity!r}: a comparison needs at least one value")
        if "seeds" in self.over and len(self.values) < MIN_SEEDS:
            raise ValueError(f"{self.quantity!r} is measured over {len(self.values)} seeds; a "
                             f"stochastic finding needs at least {MIN_SEEDS}")

    @property
    def worst(self) -> float:
        """The value nearest to failing (or failing most)."""
        vals = self.values
        if any(math.isnan(v) for v in vals):
            return math.nan
        if self.op == "<":
            return max(vals)
        if self.op == ">":
            return min(vals)
        lo, hi = self.bound
        return min(vals, key=lambda v: min(v - lo, hi - v))

    @property
    def passed(self) -> bool:
        w = self.worst
        if math.isnan(w):
            return False
        if self.op == "<":
            return w < self.bound[0]
        if self.op == ">":
            return w > self.bound[0]
        lo, hi = self.bound
        return lo <= w <= hi

    @property
    def margin(self) -> float:
        """How far the worst value is inside the bound (negative: outside).

        Linear scale: as a fraction of |bound| (for "in", of the interval's width). Log scale:
        in decades. NaN when a value is NaN (or non-positive on a log scale).
        """
        w = self.worst
        if math.isnan(w):
            return math.nan
        if self.scale == "log":
            if any(b <= 0 for b in self.bound):
                return math.nan
            if w <= 0:                       # 0 is infinitely many decades below any bound
                return math.inf if self.op == "<" else -math.inf
            lw = math.log10(w)
            if self.op == "<":
                return math.log10(self.bound[0]) - lw
            if self.op == ">":
                return lw - math.log10(self.bound[0])
            lo, hi = (math.log10(b) for b in self.bound)
            return min(lw - lo, hi - lw)
        if self.op == "in":
            lo, hi = self.bound
            return min(w - lo, hi - w) / (hi - lo) if hi > lo else 0.0
        b = self.bound[0]
        d = b - w if self.op == "<" else w - b
        return d / abs(b) if b != 0 else d

    def margin_text(self) -> str:
        m = self.margin
        if math.isnan(m):
            return "margin n/a"
        if math.isinf(m):
            return "margin ∞" if m > 0 else "margin -∞"
        if self.scale == "log":
            return f"margin {m:+.2g} decades"
        if self.op != "in" and self.bound[0] == 0:         # no scale to be relative to
            return f"margin {m:+.3g}"
        return f"margin {m:+.0%}" + (" of the interval" if self.op == "in" else "")

    def describe(self) -> str:
        vals = self.values
        if len(vals) == 1:
            shown = _fmt(vals[0])
        else:
            shown = (f"{_fmt(self.worst)} worst of {len(vals)} {self.over} "
                     f"(range {_fmt(min(vals))} to {_fmt(max(vals))})")
        if self.op == "in":
            rule = f"in [{_fmt(self.bound[0])}, {_fmt(self.bound[1])}]"
        else:
            rule = f"{self.op} {_fmt(self.bound[0])}"
        mark = "✓" if self.passed else "✗"
        return f"{self.quantity} = {shown}; needs {rule} ({self.margin_text()}) {mark}"


def below(quantity: str, value: float | Sequence[float], bound: float, *,
          over: str = "values", origin: str = "", log: bool = False) -> Comparison:
    """Evidence that ``value`` (every value, if several) is below ``bound``.

    ``over`` names what the several values are ("seeds", "depths"); ``origin`` where the
    bound comes from ("chance: ...", "decade: ..."; see ``ORIGINS``); ``log=True`` gives the
    margin in decades.
    """
    return Comparison(quantity, tuple(_values(value)), "<", (float(bound),), over, origin,
                      "log" if log else "linear")


def above(quantity: str, value: float | Sequence[float], bound: float, *,
          over: str = "values", origin: str = "", log: bool = False) -> Comparison:
    """Evidence that ``value`` (every value, if several) is above ``bound``."""
    return Comparison(quantity, tuple(_values(value)), ">", (float(bound),), over, origin,
                      "log" if log else "linear")


def between(quantity: str, value: float | Sequence[float], low: float, high: float, *,
            over: str = "values", origin: str = "", log: bool = False) -> Comparison:
    """Evidence that ``value`` (every value, if several) lies in [low, high]."""
    return Comparison(quantity, tuple(_values(value)), "in", (float(low), float(high)), over,
                      origin, "log" if log else "linear")


def _check_origin(c: Comparison) -> None:
    kind = c.origin.split(":", 1)[0].strip()
    if kind not in ORIGINS:
        raise ValueError(
            f"{c.quantity!r}: origin={c.origin!r} must say where the bound comes from, as "
            f"'<kind>: <detail>' with kind one of {sorted(ORIGINS)}")


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
    against: tuple[Comparison, ...] = ()
    kind: str = "finding"
    note: str = ""
    seeds: tuple[int, ...] = ()
    deterministic: str = ""

    @property
    def as_expected(self) -> bool:
        return self.verdict == self.expected

    @property
    def label(self) -> str:
        """The verdict as the book shows it: a refutation is a "myth" only when expected."""
        if self.verdict == "refuted" and self.as_expected:
            return "refuted (a myth)"
        return self.verdict

    def to_record(self) -> dict:
        d = asdict(self)
        d["evidence"] = [_record(c, "evidence") for c in self.evidence]
        d["against"] = [_record(c, "against") for c in self.against]
        d["seeds"] = list(self.seeds)
        d["as_expected"] = self.as_expected
        d["label"] = self.label
        return d

    def to_text(self) -> str:
        lines = [f"[{self.verdict.upper()}] ({self.kind}) {self.statement}"]
        lines += [f"    {c.describe()}  [{c.origin}]" for c in self.evidence]
        if self.against:
            lines.append("    decisive evidence against:")
            lines += [f"    {c.describe()}  [{c.origin}]" for c in self.against]
        if self.note:
            lines.append(f"    note: {self.note}")
        if not self.as_expected:
            lines.append(f"    UNEXPECTED: the book states this claim {self.expected}")
        return "\n".join(lines)

    def to_html(self) -> str:
        """A verdict box readable in Jupyter, Colab and both website themes: every colour is
        set explicitly (text on its own background), so no theme's colours leak in."""
        colour = {"holds": "#1b6e36", "refuted": "#8a4b00", "not shown here": "#3d4f66"}
        c = "#b00020" if not self.as_expected else colour[self.verdict]
        label = (f"{self.verdict} — the book expected {self.expected}!"
                 if not self.as_expected else self.label)

        def items(cs: tuple[Comparison, ...]) -> str:
            return "".join(
                f"<li style='color:#1a1a1a'><span style='font-family:monospace;"
                f"color:#1a1a1a'>{html.escape(x.describe())}</span> "
                f"<span style='color:#4a4a4a'>[bound: {html.escape(x.origin)}]</span></li>"
                for x in cs)

        src = (f" <em style='color:#333333'>({html.escape(self.source)})</em>"
               if self.source else "")
        against = (f"<div style='color:#1a1a1a;margin-top:4px'>Decisive evidence against:</div>"
                   f"<ul style='margin:2px 0 0 0'>{items(self.against)}</ul>"
                   if self.against else "")
        note = (f"<div style='margin-top:4px;color:#1a1a1a'>{html.escape(self.note)}</div>"
                if self.note else "")
        kind = "identity (a check of our code)" if self.kind == "identity" else "finding"
        slug = self.verdict.replace(" ", "-")
        return (
            f"<div class='depthlab-claim depthlab-{slug} depthlab-{self.kind}' "
            f"style='border-left:6px solid {c};background:#ffffff;color:#1a1a1a;"
            f"padding:8px 12px;margin:8px 0;border-radius:4px;box-shadow:0 0 0 1px #cccccc'>"
            f"<div><span class='depthlab-chip' style='background:{c};color:#ffffff;"
            f"padding:1px 8px;border-radius:9px;font-weight:bold'>{html.escape(label)}</span> "
            f"<strong style='color:#1a1a1a'>Claim {html.escape(self.claim_id)}</strong> "
            f"<span style='color:#4a4a4a'>· {kind}</span></div>"
            f"<div style='color:#1a1a1a'>{html.escape(self.statement)}{src}</div>"
            f"<ul style='margin:4px 0 0 0'>{items(self.evidence)}</ul>{against}{note}</div>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        return self.to_text()


def _record(c: Comparison, role: str) -> dict:
    return dict(quantity=c.quantity, values=list(c.values), op=c.op, bound=list(c.bound),
                over=c.over, origin=c.origin, scale=c.scale, role=role, passed=c.passed,
                worst=c.worst, margin=c.margin, margin_text=c.margin_text(), text=c.describe())


def judge(evidence: Sequence[Comparison], against: Sequence[Comparison] = ()) -> str:
    """The verdict the rules above give: holds, refuted (only on decisive ``against``
    evidence) or not shown here."""
    if all(c.passed for c in evidence):
        return "holds"
    if against and all(c.passed for c in against):
        return "refuted"
    return "not shown here"


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
              *, against: Comparison | Iterable[Comparison] = (), expect: str = "holds",
              kind: str = "finding", seeds: Sequence[int] | None = None,
              deterministic: str = "", source: str = "", note: str = "",
              display: bool = True) -> None:
        """Judge a claim on its evidence, show the verdict, log it, and assert it.

        ``evidence``: comparisons that must all pass for the claim to hold. ``against``:
        comparisons that, all passing, refute it (decisive evidence against); without them a
        claim whose evidence fails is "not shown here", never refuted. ``expect``: the verdict
        the chapter states. ``kind``: "finding" or "identity". A finding names the ``seeds``
        it was measured over (at least 3, every seed must satisfy it), or says in
        ``deterministic`` why nothing random is involved. Raises ``AssertionError`` if the
        verdict differs from ``expect`` (unless ``DEPTHLAB_CLAIMS_RAISE=0``).
        """
        if expect not in VERDICTS:
            raise ValueError(f"expect={expect!r}; choose one of {VERDICTS}")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
        ev = (evidence,) if isinstance(evidence, Comparison) else tuple(evidence)
        ag = (against,) if isinstance(against, Comparison) else tuple(against)
        if not ev:
            raise ValueError("a claim needs at least one comparison as evidence")
        for c in ev + ag:
            _check_origin(c)
        if expect == "refuted" and not ag:
            raise ValueError(f"{claim_id}: a claim the book refutes needs decisive evidence "
                             "against it (against=...)")
        seeds = tuple(int(s) for s in seeds) if seeds is not None else ()
        if kind == "finding" and not deterministic:
            if len(seeds) < MIN_SEEDS:
                raise ValueError(f"{claim_id}: a finding is measured over at least {MIN_SEEDS} "
                                 "seeds (seeds=...), or says why nothing random is involved "
                                 "(deterministic=...)")
            if not any("seeds" in c.over for c in ev + ag):
                raise ValueError(f"{claim_id}: a finding over seeds needs at least one "
                                 "comparison with over='seeds' (or e.g. 'seeds × depths': "
                                 "every seed must satisfy it)")
        verdict = judge(ev, ag)
        v = Verdict(claim_id, self.chapter, statement, source, expect, verdict, ev, ag, kind,
                    note, seeds, deterministic)
        self.verdicts[claim_id] = v
        path = self._path()
        if path is not None:
            write_ledger_entry(path, v)
        if display:
            _show(v)
        if not v.as_expected and os.environ.get(RAISE_ENV, "1") != "0":
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
        label = v.label
        if not v.as_expected:
            # As claims.check: the seed audit (DEPTHLAB_CLAIMS_RAISE=0) records and goes on,
            # so that one flipped claim does not hide the rest of its chapter.
            if os.environ.get(RAISE_ENV, "1") != "0":
                raise AssertionError(f"claim {claim_id!r} did not come out as stated")
            label = f"NOT AS STATED: {v.label}"
        cells = [str(row[c]).replace("|", "/") for c in columns[:-1]]
        cells.append(f"`{claim_id}` ({label})")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    try:
        from IPython import get_ipython  # only in a notebook, where IPython is there
        from IPython.display import Markdown, display  # (the library runs without it)
        if get_ipython() is not None:
            display(Markdown(text))
    except ImportError:
        pass
    return text


def _show(v: Verdict) -> None:
    try:
        from IPython import get_ipython  # only in a notebook (see above)
        from IPython.display import HTML, display  # (the library runs without it)
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
    rec["seed_offset"] = seed_offset()
    records[key] = rec
    _write_records(path, list(records.values()))


def _write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"claims": records}, f, indent=1, allow_nan=True)
    os.replace(tmp, path)
