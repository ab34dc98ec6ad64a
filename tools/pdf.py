"""The book as PDF files, printed from the built website by the browser the site tests use.

    python3 tools/pdf.py          (tasks.py book runs it after the website is built)

writes ``_build/html/pdf/``: one PDF per chapter (``00_tour.pdf`` ...) and the whole book
(``deep-and-stable.pdf``: the landing page, the chapters and the reference pages in the order
of ``_toc.yml``, merged with pypdf, one bookmark per page). The website links them: each
chapter's download menu has its chapter's PDF and the book's (``_ext/depthlab_book.py``), the
landing page has the book's.

Each page is opened in headless Chromium (Debian's ``chromium``, driven by Playwright, as in
tests/test_site.py) from a local server, with every request that leaves the site refused: the
PDF shows only what the site itself serves (MathJax included, see _config.yml). The page waits
for MathJax to typeset, then prints with the print rules of ``_static/depthlab.css``: no
navigation, header, sidebars or buttons; figures, claim boxes, tables and displayed formulas
are never split across pages (``break-inside: avoid``). Solutions stay folded, as on the page.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
BOOK_PDF = "deep-and-stable.pdf"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
FOOTER = ("<div style='font-size:8px;width:100%;text-align:center;color:#555;"
          "font-family:sans-serif'><span class='title'></span> · "
          "<span class='pageNumber'></span> / <span class='totalPages'></span></div>")


def pages(root: Path = ROOT) -> list[str]:
    """The book's pages (docnames) in the order of the table of contents."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    names = [toc["root"]]
    for part in toc.get("parts", []):
        names += [c["file"] for c in part.get("chapters", [])]
    return names


def is_chapter(docname: str) -> bool:
    return docname.startswith("chapters/")


def pdf_name(docname: str) -> str:
    return docname.rsplit("/", 1)[-1] + ".pdf"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(directory: Path):
    """A local server for ``directory`` on a free port: (base URL, server)."""
    handler = functools.partial(_Quiet, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}", httpd


def chromium() -> str:
    found = shutil.which("chromium")
    if not found:
        raise SystemExit("the PDFs need Debian's chromium: apt-get install chromium")
    return found


def print_page(context, url: str, target: Path) -> str:
    """Print one page to ``target``; returns its title."""
    page = context.new_page()
    try:
        page.goto(url, wait_until="load")
        page.evaluate("() => (window.MathJax && MathJax.startup && MathJax.startup.promise)"
                      " ? MathJax.startup.promise.then(() => true) : true")
        page.emulate_media(media="print")
        title = page.title().split("—")[0].split(" | ")[0].strip()
        # scale 0.8: the page as a 860-pixel-wide window would show it (the widest formula
        # of the book fits; 1.0 would print 690 pixels to the line)
        page.pdf(path=str(target), format="A4", print_background=True, scale=0.8,
                 margin={"top": "16mm", "bottom": "16mm", "left": "14mm", "right": "14mm"},
                 display_header_footer=True, header_template="<span></span>",
                 footer_template=FOOTER)
        return title
    finally:
        page.close()


def build(html: Path = HTML, log=print) -> Path:
    """Print every page, merge the book; returns the book's PDF."""
    from playwright.sync_api import sync_playwright
    from pypdf import PdfWriter

    out = html / "pdf"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base, httpd = serve(html)
    printed: list[tuple[str, Path]] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
            context = browser.new_context()
            context.route("**/*", lambda route: route.continue_()
                          if route.request.url.startswith(base) else route.abort())
            for doc in pages():
                target = out / pdf_name(doc) if is_chapter(doc) else out / "pages" / pdf_name(doc)
                target.parent.mkdir(exist_ok=True)
                printed.append((print_page(context, f"{base}/{doc}.html", target), target))
            browser.close()
    finally:
        httpd.shutdown()
    writer = PdfWriter()
    for title, path in printed:
        writer.append(str(path), outline_item=title)
    writer.add_metadata({"/Title": "Deep & Stable", "/Author": "The Deep & Stable authors"})
    book = out / BOOK_PDF
    with book.open("wb") as f:
        writer.write(f)
    shutil.rmtree(out / "pages", ignore_errors=True)
    log(f"wrote {book.relative_to(html.parent.parent) if html == HTML else book} and "
        f"{sum(is_chapter(d) for d in pages())} chapter PDFs in "
        f"{time.perf_counter() - start:.0f} s")
    return book


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else HTML)
