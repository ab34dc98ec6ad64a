import json
import math

import pytest

import depthlab as dl
from depthlab.claims import judge, read_ledger

SEEDS = [0, 1, 2]


def _below(value, bound, **kw):
    return dl.below("x", value, bound, origin="chance: test", **kw)


def _above(value, bound, **kw):
    return dl.above("x", value, bound, origin="chance: test", **kw)


def test_three_verdicts():
    book = dl.ClaimBook("test", ledger=None)
    book.check("a", "x is small", _below(0.1, 1.0), kind="identity", display=False)
    assert book.verdicts["a"].verdict == "holds"
    book.check("b", "myth: x is big", _above(0.1, 1.0), against=_below(0.1, 0.5),
               expect="refuted", kind="identity", display=False)
    assert book.verdicts["b"].verdict == "refuted" and book.verdicts["b"].label == \
        "refuted (a myth)"
    book.check("c", "x is big", _above(0.7, 1.0), against=_below(0.7, 0.5),
               expect="not shown here", kind="identity", display=False)
    assert book.verdicts["c"].verdict == "not shown here"


def test_a_comparison_that_cannot_hold_never_refutes_a_claim():
    """Decisive evidence: a failing piece of evidence gives "not shown here"; only the
    comparisons named in ``against`` can refute, and only when they all pass."""
    impossible = dl.below("a ratio below zero", 0.3, 0.0, origin="definition: impossible")
    assert judge([_below(0.1, 1.0), impossible]) == "not shown here"
    assert judge([impossible], against=[impossible]) == "not shown here"
    assert judge([impossible], against=[_below(0.1, 1.0)]) == "refuted"
    book = dl.ClaimBook("t", ledger=None)
    with pytest.raises(AssertionError, match="NOT SHOWN HERE"):
        book.check("d", "s", [_below(0.1, 1.0), impossible], expect="refuted",
                   against=impossible, kind="identity", display=False)


def test_a_refutation_needs_evidence_against():
    with pytest.raises(ValueError, match="against"):
        dl.ClaimBook("t").check("a", "myth", _above(0.1, 1.0), expect="refuted",
                                kind="identity", display=False)


def test_unexpected_verdict_raises_with_the_numbers_unless_recording(monkeypatch):
    book = dl.ClaimBook("test")
    with pytest.raises(AssertionError, match="0.1"):
        book.check("c", "x is big", _above(0.1, 1.0), kind="identity", display=False)
    monkeypatch.setenv("DEPTHLAB_CLAIMS_RAISE", "0")       # the seed audit records instead
    book.check("c", "x is big", _above(0.1, 1.0), kind="identity", display=False)
    assert not book.verdicts["c"].as_expected


def test_every_bound_states_its_origin():
    with pytest.raises(ValueError, match="origin"):
        dl.ClaimBook("t").check("a", "s", dl.below("x", 1, 2), kind="identity", display=False)
    with pytest.raises(ValueError, match="origin"):
        dl.ClaimBook("t").check("a", "s", dl.below("x", 1, 2, origin="tuned: it passes"),
                                kind="identity", display=False)


def test_a_finding_needs_three_seeds_or_a_reason():
    book = dl.ClaimBook("t")
    with pytest.raises(ValueError, match="at least 3"):
        dl.below("x", [0.1, 0.2], 1.0, over="seeds", origin="chance: t")
    with pytest.raises(ValueError, match="seeds"):
        book.check("a", "s", _below(0.1, 1.0), display=False)
    with pytest.raises(ValueError, match="over='seeds'"):
        book.check("a", "s", _below(0.1, 1.0), seeds=SEEDS, display=False)
    book.check("a", "s", _below([0.1, 0.2, 0.3], 1.0, over="seeds"), seeds=SEEDS,
               display=False)
    book.check("b", "s", _below(0.1, 1.0), deterministic="an exact computation", display=False)


def test_seeds_are_judged_on_the_worst_value():
    c = dl.below("ratio", [1e-9, 1e-8, 0.5], 1e-3, over="seeds", origin="decade: t")
    assert not c.passed and c.worst == 0.5 and "worst of 3 seeds" in c.describe()
    assert dl.between("acc", [0.4, 0.6], 0.3, 0.7).passed
    assert dl.between("acc", [0.4, 0.69], 0.3, 0.7).worst == 0.69
    assert not dl.below("nan", float("nan"), 1.0).passed


def test_margins_tell_a_near_miss_from_a_clear_pass():
    near = dl.below("sim", 0.469, 0.5, origin="chance: t")
    clear = dl.below("sim", 0.05, 0.5, origin="chance: t")
    assert near.margin == pytest.approx(0.062, abs=1e-3) and "+6%" in near.describe()
    assert clear.margin == pytest.approx(0.9) and "+90%" in clear.describe()
    log = dl.below("ratio", 1e-9, 1e-6, origin="decade: t", log=True)
    assert log.margin == pytest.approx(3.0) and "decades" in log.describe()
    assert dl.above("acc", 0.4, 0.5, origin="chance: t").margin == pytest.approx(-0.2)
    inside = dl.between("r", 0.25, 0.15, 0.35, origin="theory: t")
    assert inside.margin == pytest.approx(0.5)
    assert math.isinf(dl.below("r", 0.0, 1e-3, origin="decade: t", log=True).margin)


def test_html_shows_statement_numbers_verdict_kind_and_note():
    book = dl.ClaimBook("test")
    book.check("e", "ratio <vanishes>", dl.below("ratio", 3.2e-9, 1e-6, origin="decade: t"),
               kind="identity", note="a note", display=False)
    html = book.verdicts["e"].to_html()
    assert "holds" in html and "3.20e-09" in html and "&lt;vanishes&gt;" in html
    assert "a note" in html and "identity" in html and "decade: t" in html


def test_ledger_keeps_kind_note_margins_seeds_and_verdict(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    monkeypatch.setenv("DEPTHLAB_SEED_OFFSET", "2")
    book = dl.ClaimBook("ch1", ledger=str(path))
    book.check("a", "one", _below([0.1, 0.2, 0.3], 1, over="seeds"), seeds=[1, 2, 3],
               note="hedge", display=False)
    book.check("b", "two", _below(1, 2), kind="identity", display=False)
    book.check("a", "one again", _below([0.1, 0.2, 0.4], 1, over="seeds"), seeds=[1, 2, 3],
               display=False)
    other = dl.ClaimBook("ch2", ledger=str(path))
    other.check("z", "other", _above(1, 2), against=_below(1, 2), expect="refuted",
                kind="identity", display=False)
    recs = read_ledger(path)
    assert [(r["chapter"], r["claim_id"]) for r in recs] == [("ch1", "a"), ("ch1", "b"),
                                                             ("ch2", "z")]
    a = recs[0]
    assert a["statement"] == "one again" and a["evidence"][0]["values"] == [0.1, 0.2, 0.4]
    assert a["kind"] == "finding" and a["seeds"] == [1, 2, 3] and a["seed_offset"] == 2
    assert a["evidence"][0]["margin"] == pytest.approx(0.6) and a["evidence"][0]["origin"]
    assert recs[1]["kind"] == "identity"
    assert recs[2]["label"] == "refuted (a myth)" and recs[2]["against"][0]["role"] == "against"
    dl.ClaimBook("ch1", ledger=str(path))            # the chapter runs again from the top
    assert [r["chapter"] for r in read_ledger(path)] == ["ch2"]
    json.loads(path.read_text())                     # valid JSON


def test_ledger_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "env.json"
    monkeypatch.setenv("DEPTHLAB_LEDGER", str(path))
    dl.ClaimBook("ch").check("a", "s", _below(1, 2), kind="identity", display=False)
    assert read_ledger(path)[0]["verdict"] == "holds"


def test_check_displays_the_box_once_and_returns_nothing(capsys):
    book = dl.ClaimBook("test")
    assert book.check("f", "shown", _below(1, 2), kind="identity") is None
    assert capsys.readouterr().out.count("[HOLDS] (identity) shown") == 1


def test_bad_expectation_or_kind_is_rejected():
    with pytest.raises(ValueError, match="expect"):
        dl.ClaimBook("t").check("a", "s", _below(1, 2), expect="maybe", kind="identity")
    with pytest.raises(ValueError, match="kind"):
        dl.ClaimBook("t").check("a", "s", _below(1, 2), kind="law")


def test_span_prints_the_range_over_seeds():
    from depthlab.claims import span

    assert span([0.61, 0.573, 0.6]) == "0.57–0.61"
    assert span(0.5) == "0.50"
    assert span([1e-7, 3e-6], fmt="{:.0e}") == "1e-07–3e-06"


def test_verdict_table_cites_checked_claims_only():
    from depthlab.claims import verdict_table

    book = dl.ClaimBook("t", ledger=None)
    book.check("a", "s", _below(1.0, 2.0), kind="identity", display=False)
    table = verdict_table([{"remedy": "clip", "verdict": "does nothing", "claim": "a"}], book)
    assert table.splitlines()[0] == "| remedy | verdict | checked claim |"
    assert "`a` (holds)" in table
    with pytest.raises(KeyError, match="not checked"):
        verdict_table([{"remedy": "x", "claim": "missing"}], book)


def test_verdict_table_refuses_a_flipped_claim_except_in_the_seed_audit(monkeypatch):
    """A row whose claim did not come out as stated stops the chapter; under the seed audit
    (DEPTHLAB_CLAIMS_RAISE=0) the table marks the row and the chapter goes on, as check does."""
    from depthlab.claims import RAISE_ENV, verdict_table

    monkeypatch.setenv(RAISE_ENV, "0")
    book = dl.ClaimBook("t", ledger=None)
    book.check("a", "s", _below(3.0, 2.0), kind="identity", display=False)   # fails: recorded
    rows = [{"remedy": "clip", "claim": "a"}]
    assert "`a` (NOT AS STATED:" in verdict_table(rows, book)
    monkeypatch.setenv(RAISE_ENV, "1")
    with pytest.raises(AssertionError, match="did not come out as stated"):
        verdict_table(rows, book)
