"""The website built with -W from the chapters executed once (the ``book`` fixture), then
every page opened in headless Chromium."""

import functools
import html
import http.server
import itertools
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
    # every chapter was executed once, by tools/execute.py, and found in the cache
    assert "Executing notebook" not in log, "the build executed a chapter again"


def test_claims_ledger_lists_every_chapter(build):
    ledger = json.loads((ROOT / "_build" / "claims" / "ledger.json").read_text())["claims"]
    chapters = {r["chapter"] for r in ledger}
    assert chapters == set(CHAPTERS)
    assert all(r["as_expected"] for r in ledger)
    page = (HTML / "claims_ledger.html").read_text()
    for r in ledger:
        assert r["claim_id"] in page
    by_paper = page.split("id='by-paper'", 1)[1]         # the view by paper
    for r in ledger:
        if r.get("kind") == "finding" and r.get("source"):
            first = r["source"].split(";")[0].strip()
            assert html.escape(first, quote=True) in by_paper and r["claim_id"] in by_paper


def test_the_status_page_shows_every_chapters_measured_time(build):
    page = (HTML / "status.html").read_text()
    measured = json.loads((ROOT / "benchmarks" / "budget.json").read_text())["chapters"]
    assert "reference steps" in page
    for stem, entry in measured.items():
        assert stem in page and f"{entry['reference_steps']:,}" in page


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


def _open(browser, url, width=1280):
    page = browser.new_page(viewport={"width": width, "height": 900})
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


# The book's own elements: claim boxes (and every line inside), verdict chips, tables the
# chapters print. Each text's colour against the first opaque background behind it.
_CONTRAST_JS = """
() => {
  const rgba = (s) => { const m = s.match(/[\\d.]+/g).map(Number);
                        return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1]; };
  const lum = ([r, g, b]) => { const f = (c) => { c /= 255;
      return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c[3] > 0.5) return c;
    }
    return rgba(getComputedStyle(document.body).backgroundColor);
  };
  const out = [];
  const sel = ".depthlab-claim, .depthlab-claim *, .depthlab-chip, main table td, main table th";
  document.querySelectorAll(sel).forEach((el) => {
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !el.offsetParent) return;
    const fg = rgba(getComputedStyle(el).color), bg = background(el);
    const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    out.push({text: el.textContent.trim().slice(0, 40), ratio: (a + 0.05) / (b + 0.05)});
  });
  return out;
}
"""


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_text_the_book_draws_is_readable_in_both_themes(server, browser, chapter, theme):
    """WCAG AA: contrast of at least 4.5 for every text inside claim boxes, chips and tables."""
    page, errors = _open(browser, f"{server}/chapters/{chapter}.html")
    page.evaluate(f"document.documentElement.dataset.theme = '{theme}';"
                  f"document.documentElement.dataset.mode = '{theme}'")
    page.wait_for_timeout(100)
    measured = page.evaluate(_CONTRAST_JS)
    assert measured, "no claim box or table found"
    low = [m for m in measured if m["ratio"] < 4.5]
    assert not low, low[:5]
    page.close()


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_an_explorer_responds_without_a_kernel(server, browser, chapter):
    """Every chapter has an explorer with at least two frames drawn at build time; choosing
    another drawn setting changes the figure on the static page."""
    page, errors = _open(browser, f"{server}/chapters/{chapter}.html")
    box = page.locator(".depthlab-explorer").first
    assert box.count() == 1, "no explorer on the page"
    frames = json.loads(box.get_attribute("data-frames"))
    names = json.loads(box.get_attribute("data-names"))
    assert len(frames) >= 2, "only one frame was drawn"
    img = box.locator("img.depthlab-explorer-frame")
    before = img.get_attribute("src")
    default = img.get_attribute("data-key") or next(k for k, v in frames.items() if v == before)
    target = next(k for k in frames if k != default)
    for pair in target.split("|"):
        name, value = pair.split("=", 1)
        box.locator(f"select[data-control='{name}']").select_option(value)
    assert names and img.get_attribute("src") == frames[target] != before
    assert img.is_visible()
    # the note says which settings were not drawn, and why; choosing one says so too
    options = {n: box.locator(f"select[data-control='{n}'] option").all_inner_texts()
               for n in names}
    total = 1
    for values in options.values():
        total *= len(values)
    note = box.locator(".depthlab-explorer-note").inner_text()
    if len(frames) == total:
        assert f"All {total} settings drawn" in note, note
    else:
        assert f"{len(frames)} of {total} settings drawn" in note and "Why:" in note, note
        undrawn = next(dict(zip(names, combo)) for combo in itertools.product(*options.values())
                       if "|".join(f"{n}={v}" for n, v in zip(names, combo)) not in frames)
        for name, value in undrawn.items():
            box.locator(f"select[data-control='{name}']").select_option(value)
        assert box.locator(".depthlab-explorer-missing").is_visible() and not img.is_visible()
        assert "not drawn for the website (" in box.locator(".depthlab-explorer-missing")\
            .inner_text()
    assert not errors, errors
    page.close()


def test_one_search_box_and_a_real_landing_page(server, browser):
    """index.html is the book's first page itself (not a redirect), and one search box or
    button shows, at a laptop's width and at a phone's or tablet's."""
    head = (HTML / "index.html").read_text().split("<body")[0].lower()
    assert 'http-equiv="refresh"' not in head
    for width in (800, 1280):
        page, errors = _open(browser, f"{server}/index.html", width)
        assert "Deep & Stable" in page.locator("main").inner_text()
        visible = page.eval_on_selector_all(
            ".search-button__button, input[type=search]",
            "els => els.filter(e => e.offsetParent !== null).length")
        assert visible == 1, f"{visible} search boxes visible at {width} px"
        assert not errors, errors
        page.close()


def test_code_stays_within_the_page(server, browser):
    page, _ = _open(browser, f"{server}/chapters/05_pre_ln_vs_post_ln.html")
    wide = page.eval_on_selector_all(
        "main div.cell_input pre",
        "els => els.filter(e => e.scrollWidth > e.clientWidth + 2).length")
    assert wide == 0, f"{wide} code blocks scroll sideways at 1280 px"
    page.close()


# --------------------------------------------------------------------------------------------
# No network: everything a page needs comes from the site itself
# --------------------------------------------------------------------------------------------

_TYPESET = ("() => (window.MathJax && MathJax.startup && MathJax.startup.promise)"
            " ? MathJax.startup.promise.then(() => true) : false")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_math_renders_with_every_request_outside_the_site_blocked(server, browser, chapter):
    """A reader offline, on an intranet or under a strict content-security policy: every
    formula is typeset by the MathJax the site serves, no raw TeX is left, and the page asks
    nothing of any other server (fonts, scripts, styles, images)."""
    context = browser.new_context()
    outside: list[str] = []

    def route(r):
        if r.request.url.startswith(server):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.goto(f"{server}/chapters/{chapter}.html", wait_until="load")
    assert page.evaluate(_TYPESET), "MathJax did not load from the site"
    typeset = page.locator("main mjx-container").count()
    text = page.locator("main").inner_text()
    raw = [m for m in ("\\[", "\\(", "$$", "\\begin{") if m in text]
    print(f"{chapter}: {typeset} formulas typeset; requests outside the site: {outside}")
    assert typeset >= 5, "the chapter's formulas were not typeset"
    assert not raw, f"raw TeX left on the page: {raw}"
    assert not outside, f"the page asks other servers for {outside}"
    context.close()


def test_the_math_renderer_is_the_sites_own_copy(build):
    page = (HTML / "chapters" / "01_vanishing_gradients.html").read_text()
    assert 'src="../_static/mathjax/tex-chtml.js' in page
    assert "cdn.jsdelivr" not in page and "mathjax@" not in page
    assert (HTML / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()


# --------------------------------------------------------------------------------------------
# The book as PDF (tools/pdf.py)
# --------------------------------------------------------------------------------------------


def test_the_book_pdf_has_every_chapter_its_claims_and_its_figures(pdfs):
    from pypdf import PdfReader

    book = PdfReader(str(pdfs))
    titles = [o.title for o in book.outline]
    assert titles[0] == "Deep & Stable" and len(titles) >= 1 + len(CHAPTERS), titles
    chapter_pdfs = {c: PdfReader(str(HTML / "pdf" / f"{c}.pdf")) for c in CHAPTERS}
    assert len(book.pages) > sum(len(r.pages) for r in chapter_pdfs.values()) >= 5 * len(CHAPTERS)
    first = chapter_pdfs[CHAPTERS[0]]
    text = " ".join(p.extract_text() for p in first.pages)
    ledger = json.loads((ROOT / "_build" / "claims" / "ledger.json").read_text())["claims"]
    claim = next(r for r in ledger if r["chapter"] == CHAPTERS[0])
    assert claim["claim_id"] in text, "a claim box of chapter 0 is not in its PDF"
    assert claim["statement"].split()[0] in text
    assert sum(len(p.images) for p in first.pages) >= 1, "no figure in chapter 0's PDF"
    # no navigation, buttons or controls: the theme's print rules hide the header and the
    # sidebars; the book's (_static/depthlab.css) hide the rest, e.g. an explorer's controls
    nav = [t for t in ("Search", "Ctrl+K", "Skip to main content", ".ipynb") if t in text]
    assert not nav, nav
    page = (HTML / "chapters" / f"{CHAPTERS[0]}.html").read_text()
    key = page.split("depthlab-explorer-frame", 1)[1].split("data-key='", 1)[1].split("'")[0]
    controls = " ".join(pair.replace("=", " ") for pair in key.split("|"))   # "depth 12 ..."
    assert controls not in " ".join(text.split()), "the explorer's controls were printed"


def test_each_chapter_and_the_landing_page_link_the_pdfs(pdfs):
    for chapter in CHAPTERS:
        page = (HTML / "chapters" / f"{chapter}.html").read_text()
        for href in (f"../pdf/{chapter}.pdf", f"../pdf/{pdfs.name}"):
            assert f'href="{href}"' in page, f"{chapter} does not link {href}"
            assert (HTML / "chapters" / href).resolve().is_file()
    index = (HTML / "index.html").read_text()
    assert f'href="pdf/{pdfs.name}"' in index


def test_the_landing_page_says_how_long_the_book_takes_from_the_execution_records(build):
    """The sentence is made from the cache's records (times and machine), never typed."""
    from jupyter_cache import get_cache

    records = get_cache(str(ROOT / "_build" / ".jupyter_cache")).list_cache_records()
    seconds = {Path(r.uri).stem: r.data["execution_seconds"] for r in records
               if Path(r.uri).stem in CHAPTERS}
    index = (HTML / "index.html").read_text()
    sentence = index.split('class="depthlab-runtime"', 1)[1].split("</p>", 1)[0]
    assert f"{sum(seconds.values()) / 60:.0f} min of computing" in sentence
    assert f"{max(seconds.values()):.0f} s ({max(seconds, key=seconds.get)})" in sentence
    machine = next(r.data.get("machine") for r in records)
    if machine:
        assert f"{machine['cores']}-core" in sentence and machine["torch"] in sentence
