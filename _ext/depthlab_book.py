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
6. Provides the ``budget-table`` directive (the status page: each chapter's measured time
   alone, from ``benchmarks/budget.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform
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
    os.environ["DEPTHLAB_FIGURE_CHECK"] = "1"
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



VERDICT_COLOURS = {"holds": "#1b6e36", "refuted": "#8a4b00", "not shown here": "#3d4f66"}


class ClaimsLedger(SphinxDirective):
    """Renders the ledger: findings and identities in two tables, one row per claim, with a
    verdict chip, the evidence with its margin and the origin of each bound, and the note.
    Filters (chapter, verdict, kind) work in the browser (``_static/depthlab.js``)."""

    def run(self):
        path = _ledger_path(self.env.app)
        records = json.loads(path.read_text())["claims"] if path.exists() else []
        records.sort(key=lambda r: (r["chapter"], r.get("order", 0)))
        if not records:
            return [nodes.paragraph(text="No claims have been checked in this build yet.")]
        findings = [r for r in records if r.get("kind", "finding") == "finding"]
        identities = [r for r in records if r.get("kind") == "identity"]
        counts: dict[str, int] = {}
        for r in findings:
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
        summary = (f"{len(findings)} findings checked in this build: "
                   + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
                   + f". Besides them, {len(identities)} identities (parity checks and "
                   "properties true by construction) were checked; they test the code, not "
                   "a scientific claim, and are not counted. Every verdict matched the one "
                   "its chapter states, or the build would have failed.")
        chapters = sorted({r["chapter"] for r in records})
        html_parts = [f"<p>{_esc(summary)}</p>", self._filters(chapters)]
        html_parts.append("<h2 id='findings'>Findings</h2>")
        html_parts.append(self._table(findings))
        html_parts.append("<h2 id='identities'>Identities</h2>")
        html_parts.append(self._table(identities))
        html_parts.append("<h2 id='by-paper'>By paper</h2>")
        html_parts.append(self._by_paper(findings))
        return [nodes.raw("", "\n".join(html_parts), format="html")]

    def _by_paper(self, findings: list[dict]) -> str:
        """Every finding that cites a paper, grouped under that paper: what the book tested of
        each paper, and with which verdict (a finding citing two papers is under both)."""
        papers: dict[str, list[dict]] = {}
        for r in findings:
            for paper in (r.get("source") or "").split(";"):
                if paper.strip():
                    papers.setdefault(paper.strip(), []).append(r)
        if not papers:
            return "<p>No finding cites a paper.</p>"
        parts = ["<p>The findings that test a published result, under the paper they test. "
                 "“Not shown here” says that our scale did not reach the paper's regime, not "
                 "that the paper is wrong; each chapter's replication table says what "
                 "differs.</p>", "<table class='depthlab-ledger-papers table'><thead><tr>"
                 "<th>Paper</th><th>Claim</th><th>Verdict</th><th>Chapter</th></tr></thead>"
                 "<tbody>"]
        for paper in sorted(papers):
            rows = papers[paper]
            for i, r in enumerate(rows):
                verdict = r["verdict"]
                head = (f"<td rowspan='{len(rows)}'>{_esc(paper)}</td>" if i == 0 else "")
                parts.append(
                    f"<tr>{head}<td><span class='depthlab-id'>{_esc(r['claim_id'])}</span> "
                    f"{_esc(r['statement'])}</td><td><span class='depthlab-chip "
                    f"depthlab-chip-{verdict.replace(' ', '-')}'>"
                    f"{_esc(r.get('label', verdict))}</span></td>"
                    f"<td>{self._link(r['chapter'])}</td></tr>")
        parts.append("</tbody></table>")
        return "".join(parts)

    def _filters(self, chapters: list[str]) -> str:
        def select(name: str, options: list[tuple[str, str]]) -> str:
            opts = "".join(f"<option value='{_esc(v)}'>{_esc(t)}</option>" for v, t in options)
            return (f"<label>{name.capitalize()} <select data-ledger-filter='{name}'>"
                    f"<option value=''>all</option>{opts}</select></label>")
        chapter_opts = [(c, self._title(c)) for c in chapters]
        verdicts = [(v, v) for v in VERDICT_COLOURS]
        return ("<div class='depthlab-ledger-filters'>"
                + select("chapter", chapter_opts) + select("verdict", verdicts)
                + select("kind", [("finding", "finding"), ("identity", "identity")])
                + "<span class='depthlab-ledger-count'></span></div>")

    def _title(self, chapter: str) -> str:
        title = self.env.titles.get(f"chapters/{chapter}")
        return title.astext() if title is not None else chapter

    def _link(self, chapter: str) -> str:
        docname = f"chapters/{chapter}"
        if docname in self.env.found_docs:
            uri = self.env.app.builder.get_relative_uri(self.env.docname, docname)
            return f"<a href='{_esc(uri)}'>{_esc(self._title(chapter))}</a>"
        return _esc(self._title(chapter))

    def _table(self, records: list[dict]) -> str:
        rows = []
        for r in records:
            verdict = r["verdict"]
            label = r.get("label", verdict)
            evidence = "".join(self._comparison(c) for c in r["evidence"])
            against = "".join(self._comparison(c) for c in r.get("against", []))
            if against:
                evidence += ("<li class='depthlab-against-head'>decisive evidence against:"
                             f"<ul>{against}</ul></li>")
            source = f" <em>({_esc(r['source'])})</em>" if r.get("source") else ""
            note = _esc(r.get("note", ""))
            seeds = r.get("seeds") or []
            basis = (f"{len(seeds)} seeds" if seeds
                     else _esc(r.get("deterministic", "")) or "—")
            rows.append(
                f"<tr data-chapter='{_esc(r['chapter'])}' data-verdict='{_esc(verdict)}' "
                f"data-kind='{_esc(r.get('kind', 'finding'))}'>"
                f"<td>{self._link(r['chapter'])}</td>"
                f"<td><span class='depthlab-id'>{_esc(r['claim_id'])}</span> "
                f"{_esc(r['statement'])}{source}</td>"
                f"<td><span class='depthlab-chip depthlab-chip-{verdict.replace(' ', '-')}'>"
                f"{_esc(label)}</span></td>"
                f"<td><ul class='depthlab-evidence'>{evidence}</ul></td>"
                f"<td>{note}<div class='depthlab-basis'>measured over: {basis}</div></td></tr>")
        head = ("<thead><tr><th>Chapter</th><th>Claim</th><th>Verdict</th>"
                "<th>Evidence measured in this build (margin; where the bound comes from)</th>"
                "<th>Note</th></tr></thead>")
        return (f"<table class='depthlab-ledger table'>{head}<tbody>{''.join(rows)}"
                "</tbody></table>")

    @staticmethod
    def _comparison(c: dict) -> str:
        mark = "✓" if c["passed"] else "✗"
        return (f"<li><span class='depthlab-quantity'>{_esc(c['text'])}</span>"
                f" <span class='depthlab-origin'>[bound: {_esc(c.get('origin', ''))}]</span>"
                f"<span class='sr-only'>{mark}</span></li>")


def _esc(text) -> str:
    import html as _html

    return _html.escape(str(text), quote=True)


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


class BudgetTable(SphinxDirective):
    """For the status page: each chapter's time alone on 2 cores as ``benchmarks/budget.py``
    last measured it (seconds, reference steps, the share of it that is arithmetic), and the
    book's total against its budget. The chapters' opening lines state the same numbers."""

    def run(self):
        from docutils.statemachine import StringList

        path = Path(self.env.srcdir) / "benchmarks" / "budget.json"
        self.env.note_dependency(str(path))
        if not path.exists():
            return [nodes.paragraph(text="No measurement yet: run benchmarks/budget.py.")]
        data = json.loads(path.read_text())
        lines = [f"Measured on {data['measured']} ({data['machine']}); one reference step "
                 f"took {data['reference_step_ms']} ms there, and one core multiplied "
                 f"matrices at {data['matmul_gflops']} GFLOP/s.", "",
                 "| chapter | seconds alone, 2 cores | reference steps | runs trained "
                 "(in groups) | arithmetic share |", "|---|---|---|---|---|"]
        for stem, e in data["chapters"].items():
            lines.append(f"| [{stem}](chapters/{stem}.ipynb) | {e['seconds']:.0f} | "
                         f"{e['reference_steps']:,} | {e['runs']} ({e['grouped_runs']}) | "
                         f"{e['arithmetic_share']:.0%} |")
        total = sum(e["seconds"] for e in data["chapters"].values())
        lines += ["", f"**The book**, every chapter alone one after another: {total:.0f} s, "
                  f"{data['book_reference_steps']:,} reference steps (budget 45,000; 7,500 "
                  "per chapter)."]
        if "book_as_built_seconds" in data:
            lines.append(f" As the build runs it (two chapters at a time, one core each): "
                         f"{data['book_as_built_seconds']:.0f} s.")
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source="budget-table"), self.content_offset,
                                node)
        return node.children


class RuntimeNode(nodes.General, nodes.Element):
    """Where the landing page says how long the book takes to run (``book-runtime``)."""


class BookRuntime(SphinxDirective):
    """How long the whole book took to run when this site was built, and on what.

    Taken from the execution records, never typed: each chapter's time is the one MyST-NB
    reads from the execution cache (the same numbers as the execution statistics page), and
    the machine is the one tools/execute.py stored beside it. The paragraph is made after
    every page was read, and the page is re-written whenever a chapter ran again (MyST-NB
    does that for pages it marks as having an execution table)."""

    def run(self):
        from myst_nb.sphinx_ import NbMetadataCollector

        NbMetadataCollector.set_doc_data(self.env, self.env.docname, "has_exec_table", True)
        return [RuntimeNode()]


def _machines(app) -> dict[str, dict]:
    """{chapter stem: the machine its cached execution ran on}."""
    from jupyter_cache import get_cache

    path = Path(app.config.nb_execution_cache_path or Path(app.outdir).parent / ".jupyter_cache")
    if not path.is_absolute():
        path = Path(app.srcdir) / path
    if not path.exists():
        return {}
    return {Path(r.uri).stem: (r.data or {}).get("machine") or {}
            for r in get_cache(str(path)).list_cache_records()}


def runtime_text(runtimes: dict[str, float | None], machines: dict[str, dict]) -> str:
    """The landing page's sentence: total, range, machine, and the time from start to end."""
    measured = {c: t for c, t in runtimes.items() if t}
    if not measured:
        return "No chapter's running time was recorded in this build."
    total = sum(measured.values())
    fastest, slowest = min(measured, key=measured.get), max(measured, key=measured.get)
    known = [m for c, m in machines.items() if c in measured and m]
    text = (f"When this website was built, its {len(measured)} chapters took "
            f"{total / 60:.0f} min of computing in all, from {measured[fastest]:.0f} s "
            f"({fastest}) to {measured[slowest]:.0f} s ({slowest})")
    if len(measured) < len(runtimes):
        missing = sorted(set(runtimes) - set(measured))
        text += f" (not recorded: {', '.join(missing)})"
    if known:
        m = known[0]
        gpu = f"a {m['gpu']} GPU" if m.get("gpu") else "no GPU"
        text += (f", on a {m.get('cores')}-core {m.get('cpu')} CPU with {gpu} ({m.get('system')}, "
                 f"Python {m.get('python')}, PyTorch {m.get('torch')})")
        jobs = int(m.get("jobs") or 1)
        if jobs > 1:
            text += (f", {jobs} chapters at a time with {m.get('threads')} torch thread each: "
                     f"about {total / jobs / 60:.0f} min from start to end")
        if any(k != m for k in known):
            text += " (not every chapter ran on this machine)"
    else:
        text += " (the machine was not recorded)"
    return text + ". "


class RuntimePostTransform(SphinxPostTransform):
    default_priority = 8                # as MyST-NB's execution table: after every page ran

    def run(self, **kwargs) -> None:
        from myst_nb.sphinx_ import NbMetadataCollector

        if not any(True for _ in self.document.findall(RuntimeNode)):
            return
        data = NbMetadataCollector.get_doc_data(self.env)
        chapters = sorted(d for d in self.env.found_docs if d.startswith("chapters/"))
        runtimes = {d.split("/")[-1]: (data.get(d, {}).get("exec_data") or {}).get("runtime")
                    for d in chapters}
        text = runtime_text(runtimes, _machines(self.app))
        for node in list(self.document.findall(RuntimeNode)):
            para = nodes.paragraph(classes=["depthlab-runtime"])
            para += nodes.strong(text="How long the whole book takes. ")
            para += nodes.Text(text + "Each chapter's time is on the ")
            uri = self.app.builder.get_relative_uri(self.env.docname, "status")
            para += nodes.reference("", "execution statistics", refuri=uri, internal=True)
            para += nodes.Text(" page.")
            node.replace_self(para)


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


# --------------------------------------------------------------------------------------------
# Exercises and solutions on the website
# --------------------------------------------------------------------------------------------

SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")
NO_SOLUTIONS_ENV = "DEPTHLAB_NO_SOLUTIONS"


def number_exercises_per_chapter(app, env) -> list[str]:
    """Number exercises 5.1, 5.2, ... in chapter 5 (sphinx-exercise numbers them through the
    whole book). Runs after Sphinx has assigned the figure numbers; the chapter number is the
    notebook's prefix (chapters/05_pre_ln_vs_post_ln)."""
    for docname, numbers in env.toc_fignumbers.items():
        exercises = numbers.get("exercise")
        stem = docname.rsplit("/", 1)[-1]
        if not exercises or not stem[:2].isdigit():
            continue
        for k, node_id in enumerate(sorted(exercises, key=lambda i: exercises[i]), start=1):
            exercises[node_id] = (int(stem[:2]), k)
    return []


def tidy_solutions(app, doctree) -> None:
    """Drop the nbgrader marker lines from solution code on the pages (they are for the
    grading tools), and, for a course build (``tasks.py book --no-solutions``), every
    solution."""
    for block in list(doctree.findall(nodes.literal_block)):
        text = block.astext()
        if any(m in text for m in SOLUTION_MARKERS):
            kept = "\n".join(line for line in text.split("\n")
                             if line.strip() not in SOLUTION_MARKERS)
            block.children = [nodes.Text(kept)]
            block.rawsource = kept
    if app.config.depthlab_no_solutions:
        from sphinx_exercise.nodes import solution_node

        for node in list(doctree.findall(solution_node)):
            node.parent.remove(node)


PDF_FOLDER = "pdf"                     # tools/pdf.py writes the PDFs into _build/html/pdf/
BOOK_PDF = "deep-and-stable.pdf"


def adjust_buttons(app, pagename, templatename, context, doctree) -> None:
    """The Colab button opens colab/NN_name.ipynb, the chapter converted for reading outside
    the book (tools/notebooks.py). A course build has no launch or download buttons: those
    would give students the notebook with its solutions.

    The download menu's ".pdf" printed the page with the browser; it now links the PDFs that
    tools/pdf.py prints from the built site (``tasks.py book``): on a chapter, the chapter's,
    and on every page the whole book's."""
    buttons = context.get("header_buttons") or []
    pathto = context.get("pathto")
    for group in buttons:
        if group.get("label") != "download-buttons" or pathto is None:
            continue
        kept = [b for b in group.get("buttons", []) if b.get("label") != "download-pdf-button"]
        if pagename.startswith("chapters/"):
            kept.append({"type": "link", "text": "chapter .pdf", "icon": "fas fa-file-pdf",
                         "url": pathto(f"{PDF_FOLDER}/{pagename.split('/')[-1]}.pdf", 1),
                         "tooltip": "This chapter as a PDF", "label": "download-chapter-pdf"})
        kept.append({"type": "link", "text": "book .pdf", "icon": "fas fa-book",
                     "url": pathto(f"{PDF_FOLDER}/{BOOK_PDF}", 1),
                     "tooltip": "The whole book as a PDF", "label": "download-book-pdf"})
        group["buttons"] = kept
    for group in buttons:
        if group.get("label") == "launch-buttons":
            for b in group.get("buttons", []):
                if "colab" in b.get("url", ""):
                    b["url"] = b["url"].replace("/blob/main/chapters/", "/blob/main/colab/")
    if app.config.depthlab_no_solutions:
        buttons[:] = [g for g in buttons if g.get("label") != "launch-buttons"]
        for g in buttons:
            if g.get("label") == "download-buttons":
                g["buttons"] = [b for b in g.get("buttons", [])
                                if b.get("label") != "download-notebook-button"]


def setup(app):
    app.add_config_value("depthlab_no_solutions", bool(os.environ.get(NO_SOLUTIONS_ENV)), "env")
    app.connect("env-get-updated", number_exercises_per_chapter, priority=900)
    app.connect("doctree-read", tidy_solutions, priority=900)
    app.connect("html-page-context", adjust_buttons, priority=900)
    app.connect("config-inited", on_config_inited, priority=100)
    app.connect("env-before-read-docs", on_env_before_read_docs)
    app.connect("env-get-outdated", on_env_get_outdated)
    # early: html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", on_html_page_context, priority=100)
    app.add_directive("claims-ledger", ClaimsLedger)
    app.add_directive("coursework-table", CourseworkTable)
    app.add_directive("budget-table", BudgetTable)
    app.add_node(RuntimeNode)
    app.add_directive("book-runtime", BookRuntime)
    app.add_post_transform(RuntimePostTransform)
    return {"parallel_read_safe": False, "parallel_write_safe": True, "version": "0.1"}
