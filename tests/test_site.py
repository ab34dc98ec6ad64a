"""The website built with -W from the chapters executed once (the ``book`` fixture), then
every page opened in headless Chromium."""

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
CHAPTERS = sorted(p.stem for p in (ROOT / "chapters").glob("*.ipynb"))


@pytest.fixture(scope="module")
def build(book):
    return book


def test_book_builds_without_warnings(build):
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-5000:]
    sphinx_warnings = [line for line in log.splitlines()
                       if "WARNING" in line and "IPKernelApp" not in line]
    assert not sphinx_warnings, sphinx_warnings


def test_claims_ledger_lists_every_chapter(build):
    ledger = json.loads((ROOT / "_build" / "claims" / "ledger.json").read_text())["claims"]
    chapters = {r["chapter"] for r in ledger}
    assert chapters == set(CHAPTERS)
    assert all(r["as_expected"] for r in ledger)
    page = (HTML / "claims_ledger.html").read_text()
    for r in ledger:
        assert r["claim_id"] in page


@pytest.fixture(scope="module")
def server(build):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is required: apt-get install chromium"
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))   # JS exceptions, not network
    page.goto(url, wait_until="load")
    return page, errors


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_page_renders_figures_and_no_traceback(server, browser, chapter):
    page, errors = _open(browser, f"{server}/chapters/{chapter}.html")
    main = page.locator("main")
    text = main.inner_text()
    assert "Traceback" not in text and "Error" not in page.title()
    images = page.locator("main .cell_output img")
    assert images.count() >= 1, "no figure rendered"
    widths = page.eval_on_selector_all(
        "main .cell_output img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert all(w > 100 for w in widths), widths
    assert page.locator(".depthlab-claim").count() >= 1
    assert "the book expected" not in text
    shots = ROOT / "_build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{chapter}.png"), full_page=False)
    assert not errors, errors
    page.close()


@pytest.mark.parametrize("name", ["index", "claims_ledger", "status", "bibliography"])
def test_other_pages_render(server, browser, name):
    page, errors = _open(browser, f"{server}/{name}.html")
    assert "Traceback" not in page.locator("main").inner_text()
    assert not errors, errors
    page.close()


@pytest.mark.parametrize("chapter, marker", [("00_tour", "train_and_evaluate"),
                                             ("06_which_fixes_work",
                                              "clipping-cannot-fix-vanishing")])
def test_markdown_tables_printed_by_chapters_render_as_tables(build, chapter, marker):
    """The API table and the verdict table are Markdown printed by code: they must reach the
    page as HTML tables, not as a paragraph of pipes."""
    page = (HTML / "chapters" / f"{chapter}.html").read_text()
    tables = page.split("<table")[1:]
    assert any(marker in t.split("</table>")[0] for t in tables), f"no table with {marker}"
    assert "|---|" not in page and "|—|" not in page
