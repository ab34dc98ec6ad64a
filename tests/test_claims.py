import json

import pytest

import depthlab as dl
from depthlab.claims import read_ledger


def test_holds_and_refuted():
    book = dl.ClaimBook("test", ledger=None)
    book.check("a", "x is small", dl.below("x", 0.1, 1.0), display=False)
    v = book.verdicts["a"]
    assert v.verdict == "holds" and v.as_expected
    book.check("b", "myth: x is big", dl.above("x", 0.1, 1.0), expect="refuted",
                   display=False)
    v = book.verdicts["b"]
    assert v.verdict == "refuted" and v.as_expected


def test_unexpected_verdict_raises_with_the_numbers():
    book = dl.ClaimBook("test")
    with pytest.raises(AssertionError, match="0.1"):
        book.check("c", "x is big", dl.above("x", 0.1, 1.0), display=False)


def test_seeds_are_judged_on_the_worst_value():
    c = dl.below("ratio", [1e-9, 1e-8, 0.5], 1e-3, over="seeds")
    assert not c.passed and "over 3 seeds" in c.describe()
    assert "over 2 values" in dl.above("x", [1, 2], 0).describe()
    assert dl.between("acc", [0.4, 0.6], 0.3, 0.7).passed
    assert not dl.below("nan", float("nan"), 1.0).passed


def test_all_comparisons_must_pass():
    book = dl.ClaimBook("test")
    book.check("d", "two things", [dl.below("a", 1, 2), dl.above("b", 1, 2)],
                   expect="refuted", display=False)
    assert book.verdicts["d"].verdict == "refuted"


def test_html_shows_statement_numbers_and_verdict():
    book = dl.ClaimBook("test")
    book.check("e", "ratio <vanishes>", dl.below("ratio", 3.2e-9, 1e-6), display=False)
    html = book.verdicts["e"].to_html()
    assert "holds" in html and "3.20e-09" in html and "&lt;vanishes&gt;" in html


def test_ledger_upserts_and_a_rerun_clears_the_chapter(tmp_path):
    path = tmp_path / "ledger.json"
    book = dl.ClaimBook("ch1", ledger=str(path))
    book.check("a", "one", dl.below("x", 1, 2), display=False)
    book.check("b", "two", dl.below("x", 1, 2), display=False)
    book.check("a", "one again", dl.below("x", 1.5, 2), display=False)
    other = dl.ClaimBook("ch2", ledger=str(path))
    other.check("z", "other chapter", dl.below("x", 1, 2), display=False)
    recs = read_ledger(path)
    assert [(r["chapter"], r["claim_id"]) for r in recs] == [("ch1", "a"), ("ch1", "b"),
                                                             ("ch2", "z")]
    assert recs[0]["statement"] == "one again" and recs[0]["evidence"][0]["values"] == [1.5]
    dl.ClaimBook("ch1", ledger=str(path))            # the chapter runs again from the top
    assert [r["chapter"] for r in read_ledger(path)] == ["ch2"]
    json.loads(path.read_text())                     # valid JSON


def test_ledger_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "env.json"
    monkeypatch.setenv("DEPTHLAB_LEDGER", str(path))
    dl.ClaimBook("ch").check("a", "s", dl.below("x", 1, 2), display=False)
    assert read_ledger(path)[0]["verdict"] == "holds"


def test_check_displays_the_box_once_and_returns_nothing(capsys):
    book = dl.ClaimBook("test")
    assert book.check("f", "shown", dl.below("x", 1, 2)) is None
    assert capsys.readouterr().out.count("[HOLDS] shown") == 1   # outside IPython: printed


def test_bad_expectation_is_rejected():
    with pytest.raises(ValueError, match="expect"):
        dl.ClaimBook("t").check("a", "s", dl.below("x", 1, 2), expect="maybe")


def test_span_prints_the_range_over_seeds():
    from depthlab.claims import span

    assert span([0.61, 0.573, 0.6]) == "0.57–0.61"
    assert span(0.5) == "0.50"
    assert span([1e-7, 3e-6], fmt="{:.0e}") == "1e-07–3e-06"


def test_verdict_table_cites_checked_claims_only():
    from depthlab.claims import verdict_table

    book = dl.ClaimBook("t", ledger=None)
    book.check("a", "s", dl.below("x", 1.0, 2.0), display=False)
    table = verdict_table([{"remedy": "clip", "verdict": "does nothing", "claim": "a"}], book)
    assert table.splitlines()[0] == "| remedy | verdict | checked claim |"
    assert "`a` (holds)" in table
    with pytest.raises(KeyError, match="not checked"):
        verdict_table([{"remedy": "x", "claim": "missing"}], book)
