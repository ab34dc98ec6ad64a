"""Sphinx extension for the book: execution environment, cache freshness, claims ledger page.

1. Sets the environment the notebook kernels inherit: ``DEPTHLAB_LEDGER`` (where claim checks
   are logged), ``DEPTHLAB_STATIC`` (explorers draw a static figure: the website has no
   kernel) and ``DEPTHLAB_QUIET`` (no progress bars in the pages).
2. Keeps the execution cache honest. Jupyter-cache hashes only the code cells, so a change in
   ``lib/depthlab`` would leave pages computed by the old library. We store a hash of the
   library's source beside the cache and clear the cache when it differs.
3. Removes duplicate <script> tags from pages (see ``on_html_page_context``).
4. Provides the ``coursework-table`` directive (the instructor guide's per-chapter goals and
   exercises, read from the notebooks).
5. Provides the ``claims-ledger`` directive, and makes the page that uses it be read after
   every chapter (so the chapters have run and logged their claims) and re-read on every build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

LEDGER_DOCNAME = "claims_ledger"


def library_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted((root / "lib" / "depthlab").rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _ledger_path(app) -> Path:
    return Path(app.outdir).parent / "claims" / "ledger.json"


def on_config_inited(app, config) -> None:
    root = Path(app.srcdir)
    ledger = _ledger_path(app)
    os.environ["DEPTHLAB_LEDGER"] = str(ledger)
    os.environ["DEPTHLAB_STATIC"] = "1"
    os.environ["DEPTHLAB_QUIET"] = "1"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    cache = Path(config.nb_execution_cache_path or Path(app.outdir).parent / ".jupyter_cache")
    if not cache.is_absolute():
        cache = root / cache
    stamp = cache.parent / "depthlab-library.sha256"
    current = library_hash(root)
    if not stamp.exists() or stamp.read_text().strip() != current:
        # The library changed since the cached pages were computed: run everything again.
        # Clearing the cache is not enough: Sphinx re-reads only the notebooks whose files
        # changed, so ``on_env_get_outdated`` also marks every chapter as outdated.
        app.depthlab_library_changed = True
        shutil.rmtree(cache, ignore_errors=True)
        if ledger.exists():
            ledger.unlink()
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(current)


def on_env_before_read_docs(app, env, docnames: list[str]) -> None:
    if LEDGER_DOCNAME in docnames:                 # read the ledger page last
        docnames.remove(LEDGER_DOCNAME)
        docnames.append(LEDGER_DOCNAME)


def on_env_get_outdated(app, env, added, changed, removed) -> list[str]:
    """Re-read the ledger page on every build, and every notebook after a library change."""
    again = [LEDGER_DOCNAME] if LEDGER_DOCNAME in env.found_docs else []
    if getattr(app, "depthlab_library_changed", False):
        again += [d for d in env.found_docs if str(env.doc2path(d)).endswith(".ipynb")]
    return again



class ClaimsLedger(SphinxDirective):
    """Renders the ledger: one section per chapter, a table of claim, verdict and evidence."""

    def run(self):
        path = _ledger_path(self.env.app)
        records = json.loads(path.read_text())["claims"] if path.exists() else []
        records.sort(key=lambda r: (r["chapter"], r.get("order", 0)))
        if not records:
            return [nodes.paragraph(text="No claims have been checked in this build yet.")]
        counts: dict[str, int] = {}
        for r in records:
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
        out = [nodes.paragraph(text=(
            f"{len(records)} claims checked in this build: "
            + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
            + ". Every verdict matched the one its chapter states, or the build would have "
            "failed."))]
        chapters = sorted({r["chapter"] for r in records})
        for chapter in chapters:
            out.append(self._chapter_heading(chapter))
            out.append(self._table([r for r in records if r["chapter"] == chapter]))
        return out

    def _chapter_heading(self, chapter: str) -> nodes.Node:
        docname = f"chapters/{chapter}"
        para = nodes.paragraph()
        title = self.env.titles.get(docname)
        text = title.astext() if title is not None else chapter
        if docname in self.env.found_docs:
            uri = self.env.app.builder.get_relative_uri(self.env.docname, docname)
            para += nodes.strong("", "", nodes.reference("", text, refuri=uri))
        else:
            para += nodes.strong(text=text)
        return para

    def _table(self, records: list[dict]) -> nodes.table:
        table = nodes.table(classes=["claims-ledger"])
        group = nodes.tgroup(cols=3)
        table += group
        for width in (45, 12, 43):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self._row([nodes.paragraph(text=t) for t in
                           ("Claim", "Verdict", "Evidence measured in this build")])
        body = nodes.tbody()
        group += body
        for r in records:
            claim = nodes.paragraph()
            claim += nodes.literal(text=r["claim_id"])
            claim += nodes.Text(f" {r['statement']}")
            if r.get("source"):
                claim += nodes.emphasis(text=f" ({r['source']})")
            verdict = nodes.paragraph(text="holds" if r["verdict"] == "holds"
                                      else "refuted (myth)")
            evidence = nodes.bullet_list()
            for e in r["evidence"]:
                evidence += nodes.list_item("", nodes.paragraph(text=e["text"]))
            body += self._row([claim, verdict, evidence])
        return table

    @staticmethod
    def _row(cells: list[nodes.Node]) -> nodes.row:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += cell
            row += entry
        return row


class CourseworkTable(SphinxDirective):
    """For the instructor guide: each chapter's learning goals and its graded exercises.

    Read from the notebooks themselves (the "## Learning goals" list, the ``{exercise}``
    titles and the nbgrader points), so the guide cannot fall behind the chapters.
    """

    def run(self):
        from docutils.statemachine import StringList

        root = Path(self.env.srcdir)
        lines: list[str] = []
        for path in sorted((root / "chapters").glob("[0-9][0-9]_*.ipynb")):
            cells = json.loads(path.read_text())["cells"]
            text = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
            title = text[0].splitlines()[0].lstrip("# ").strip()
            goals = ""
            for t in text:
                if "## Learning goals" in t:
                    goals = t.split("## Learning goals", 1)[1].split("\n## ", 1)[0].strip()
            titles = [t.split("\n", 1)[0].split("}", 1)[1].strip() for t in text
                      if t.startswith("````{exercise}")]
            points = [c["metadata"]["nbgrader"]["points"] for c in cells
                      if c["metadata"].get("nbgrader", {}).get("grade")]
            lines += [f"### [{title}](chapters/{path.stem}.ipynb)", "", "**Learning goals**",
                      "", goals, "", f"**Exercises** ({sum(points):g} points, nbgrader "
                      f"assignment `{path.stem}`): "
                      + "; ".join(f"{t} ({p:g})" for t, p in zip(titles, points)) + ".", ""]
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source="coursework-table"),
                                self.content_offset, node)
        return node.children


def on_html_page_context(app, pagename, templatename, context, doctree) -> None:
    """Drop repeated <script> entries (an inline script has filename None or "").

    sphinx-thebe 0.3.1 and sphinx-togglebutton register their inline scripts twice under
    Jupyter Book 1 with Sphinx 7; the second THEBE_JS_URL re-declares a const and throws a
    JavaScript error in the reader's browser on every page.
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        attrs = getattr(js, "attributes", {}) or {}
        key = (str(getattr(js, "filename", js) or ""), tuple(sorted((k, str(v)) for k, v in
                                                               attrs.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique          # in place: it is the builder's own list


def setup(app):
    app.connect("config-inited", on_config_inited, priority=100)
    app.connect("env-before-read-docs", on_env_before_read_docs)
    app.connect("env-get-outdated", on_env_get_outdated)
    # early: html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", on_html_page_context, priority=100)
    app.add_directive("claims-ledger", ClaimsLedger)
    app.add_directive("coursework-table", CourseworkTable)
    return {"parallel_read_safe": False, "parallel_write_safe": True, "version": "0.1"}
