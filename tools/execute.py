"""Execute the chapters once, with nbval, for the website, the tests and the seed audit.

Each chapter runs as nbval runs it (``pytest --nbval-lax``: every code cell a test, in one
kernel), in its own pytest process, two chapters at a time, longest first. A small pytest plugin
(tools/nbval_capture.py) keeps what that run produced: every cell's outputs and execution
count, written as an executed notebook. The book's build (MyST-NB, ``execute_notebooks:
cache``) looks each notebook up in a jupyter-cache by a hash of its code cells and executes only
what it does not find; this module stores the executed notebooks in that cache, so that:

- the website build finds every chapter there and executes nothing again: the pages show the
  outputs of nbval's run;
- the tests check those same runs (tests/test_chapters.py: nbval's verdict, and no error
  output in any cell) instead of running every chapter a second time;
- the seed audit can run the chapters under other seed offsets, into a scratch ledger.

nbval runs with ``-x``: as with nbclient (the build's own executor), a chapter stops at its
first failing cell, the cells after it are reported as never run, and a failing chapter does not
go on spending minutes on cells that cannot work. The executed notebooks carry no timing
metadata in their cells: jupyter-cache hashes all cell metadata, and a timing stamp would make
the build miss the chapter in the cache and execute it a second time (``_store`` checks).

Freshness: the cache cannot see a change in ``lib/depthlab`` (only code cells are hashed), so
a hash of the library is stored beside it (the book extension's ``library_hash``). When it
differs, the cache, the claims ledger and Sphinx's saved environment are cleared first, and
every chapter runs again.

Each kernel inherits: ``DEPTHLAB_LEDGER`` (claims log), ``DEPTHLAB_STATIC=1`` (explorers draw
static frames), ``DEPTHLAB_QUIET=1`` (no progress bars), ``DEPTHLAB_FIGURE_CHECK=1`` (a
defective figure fails its chapter); with ``jobs`` > 1 also one torch thread and
``DEPTHLAB_WORKERS=1`` per chapter (two chapters side by side, each on one core, instead of
four processes fighting over two).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
CACHE = BUILD / ".jupyter_cache"
LEDGER = BUILD / "claims" / "ledger.json"
EXECUTED = BUILD / "executed"
STAMP = BUILD / "depthlab-library.sha256"
TOOLS = ROOT / "tools"
TIMEOUT = 600                       # seconds per cell; chapters are budgeted at 90 s in all


def chapters(selectors: list[str] | None = None) -> list[Path]:
    """Chapter notebooks, all or those whose name contains one of ``selectors``."""
    every = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
    if not selectors:
        return every
    return [p for p in every if any(s in p.name for s in selectors)]


def stated_seconds(path: Path) -> float:
    """The running time a chapter states in its opening cell ("⏱ about 45 s"), or 0.

    ``execute`` starts the longest chapters first: two at a time in file order, the last long
    chapter would start when the others are done and run alone on one core (with 8 chapters
    that made the book as built 60 s longer than the longest-first order)."""
    import re

    nb = json.loads(Path(path).read_text())
    first = "".join(nb["cells"][0]["source"]) if nb.get("cells") else ""
    found = re.search(r"⏱ about (\d+(?:\.\d+)?) s", first)
    return float(found.group(1)) if found else 0.0


def library_hash() -> str:
    sys.path.insert(0, str(ROOT / "_ext"))
    try:
        from depthlab_book import library_hash as _hash
    finally:
        sys.path.pop(0)
    return _hash(ROOT)


@dataclass
class Result:
    chapter: str
    seconds: float
    error: str | None          # the failing cell's traceback, or None
    executed: Path             # the executed notebook (outputs included)
    cached: bool = False       # taken from the cache, not executed now


def kernel_env(ledger: Path | None, *, offset: int | None = None, jobs: int = 1,
               raise_claims: bool = True) -> dict[str, str]:
    # DEPTHLAB_FIGURE_CHECK: a figure with clipped or overlapping text, an unlabelled axis or a
    # legend over its data fails the chapter (plots.check_figure), so every figure of the book
    # is checked every time it is drawn
    env = dict(os.environ, DEPTHLAB_STATIC="1", DEPTHLAB_QUIET="1", DEPTHLAB_FIGURE_CHECK="1")
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env.pop("DEPTHLAB_LEDGER", None)
    if ledger is not None:
        env["DEPTHLAB_LEDGER"] = str(ledger)
    if offset is not None:
        env["DEPTHLAB_SEED_OFFSET"] = str(offset)
    if not raise_claims:
        env["DEPTHLAB_CLAIMS_RAISE"] = "0"
    if jobs > 1:
        env.update(DEPTHLAB_WORKERS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def nbval_command(path: str | Path, capture: str | Path) -> list[str]:
    """The pytest command that runs one notebook with nbval and captures it into ``capture``
    (the plugin is found through PYTHONPATH, see ``_execute_one``)."""
    return [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env",
            f"--nbval-cell-timeout={TIMEOUT}", "-p", "nbval_capture",
            f"--nbval-capture={capture}", "-p", "no:cacheprovider", "-x", "-q", "--color=no",
            str(path)]


def _execute_one(path: str, env: dict[str, str]) -> tuple[str, float, str | None]:
    """Run one notebook with nbval in its own pytest process; its JSON, time and error.

    The JSON is the executed notebook (nbval's outputs, see tools/nbval_capture.py). The time is
    the chapter's own: from just before nbval starts the kernel to the end of its last cell
    (kernel start-up, every cell, nbval's handling of each cell's messages), without pytest's
    start-up and collection (about a second) or the kernel's shut-down. The error is nbval's
    report of the failing cell, or None."""
    import nbformat

    path = Path(path)
    # the outer pytest's settings (PYTEST_ADDOPTS="-k ...", PYTEST_PLUGINS, ...) are not the
    # chapter's: a -k meant for the test session would deselect the notebook's cells
    env = {k: v for k, v in env.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TOOLS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("NBVAL_CAPTURE", None)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nbval-") as tmp:
        done = subprocess.run(nbval_command(path, tmp), env=env, cwd=path.parent,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        executed = Path(tmp) / f"{path.stem}.ipynb"
        report_path = Path(tmp) / f"{path.stem}.nbval.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else None
        if executed.exists():
            nb = nbformat.read(executed, as_version=4)
        else:                                  # nothing ran: no cell has outputs or a count
            nb = nbformat.read(path, as_version=4)
            for cell in nb.cells:
                if cell.cell_type == "code":
                    cell.outputs, cell.execution_count = [], None
    error = None
    never = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()
             and c.execution_count is None]
    if report and report["failures"]:
        error = "\n".join(report["failures"])
    elif done.returncode not in (0, 5) or never:    # 5: no test, fine if no cell to run
        # pytest itself failed (a notebook that does not load, a plugin error), or cells were
        # deselected or skipped: never store such a notebook as the chapter's run
        error = (f"pytest exited with {done.returncode}; cells never run: {never}\n"
                 f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    seconds = report["seconds"] if report else wall
    return nbformat.writes(nb), seconds, error


def execute(selected: list[Path] | None = None, *, jobs: int = 2, ledger: Path | None = LEDGER,
            offset: int | None = None, raise_claims: bool = True, use_cache: bool = True,
            out: Path = EXECUTED, log=print) -> list[Result]:
    """Execute ``selected`` chapters (default all), ``jobs`` at a time; see the module text.

    With ``use_cache`` the results go into the book's jupyter-cache, and chapters already there
    (same code, same library) are not executed again. Without it (the seed audit), everything
    runs and nothing touches the book's cache.
    """
    import nbformat

    selected = chapters() if selected is None else selected
    out.mkdir(parents=True, exist_ok=True)
    cache = None
    if use_cache:
        cache = _fresh_cache()
    results: list[Result] = []
    todo = []
    for path in selected:
        if cache is not None:
            nb = nbformat.read(path, as_version=4)
            try:
                cache.match_cache_notebook(nb)
            except KeyError:
                todo.append(path)
                continue
            _, merged = cache.merge_match_into_notebook(nb)
            target = out / path.name
            nbformat.write(merged, target)
            results.append(Result(path.stem, 0.0, None, target, cached=True))
            log(f"  {path.stem}: in the cache")
        else:
            todo.append(path)
    env = kernel_env(ledger, offset=offset, jobs=jobs, raise_claims=raise_claims)
    where = None
    if todo:
        log(f"executing {len(todo)} chapter(s), {jobs} at a time")
        todo.sort(key=stated_seconds, reverse=True)          # longest first (see above)
        # threads are enough: each chapter runs in its own pytest process (and kernel)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {path: pool.submit(_execute_one, str(path), env) for path in todo}
            for path, future in futures.items():
                text, seconds, error = future.result()
                target = out / path.name
                target.write_text(text)
                results.append(Result(path.stem, seconds, error, target))
                log(f"  {path.stem}: {seconds:.1f} s" + (" FAILED" if error else ""))
                if cache is not None and error is None:
                    where = where or machine(jobs)
                    _store(cache, path, nbformat.reads(text, as_version=4), seconds, where)
                    # Sphinx re-reads a page only when its source changed: forget the saved
                    # environment so that every page is read again from the cache (cheap:
                    # nothing executes).
                    shutil.rmtree(BUILD / ".doctrees", ignore_errors=True)
    order = {p.stem: i for i, p in enumerate(selected)}
    return sorted(results, key=lambda r: order[r.chapter])


def _fresh_cache():
    """The book's jupyter-cache, emptied (with the ledger and Sphinx's environment) when the
    library changed since it was filled."""
    from jupyter_cache import get_cache

    current = library_hash()
    if not STAMP.exists() or STAMP.read_text().strip() != current:
        shutil.rmtree(CACHE, ignore_errors=True)
        shutil.rmtree(BUILD / ".doctrees", ignore_errors=True)
        if LEDGER.exists():
            LEDGER.unlink()
        STAMP.parent.mkdir(parents=True, exist_ok=True)
        STAMP.write_text(current)
    return get_cache(str(CACHE))


def machine(jobs: int) -> dict:
    """What a chapter ran on, stored with its time in the cache (the landing page says it:
    _ext/depthlab_book.py's ``book-runtime``)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": " ".join(cpu.split()), "cores": os.cpu_count(), "jobs": jobs,
            "threads": 1 if jobs > 1 else torch.get_num_threads(), "gpu": gpu,
            "system": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(), "torch": torch.__version__}


def _store(cache, path: Path, executed, seconds: float, where: dict | None = None) -> None:
    """Add an executed notebook to the cache exactly as MyST-NB itself would (its time, as
    MyST-NB stores it, and the machine it ran on)."""
    import nbformat
    from jupyter_cache.base import CacheBundleIn

    record = cache.add_nb_to_project(str(path))
    data = {"execution_seconds": seconds, "machine": where or {}}
    stored = cache.cache_notebook_bundle(CacheBundleIn(executed, record.uri, data=data),
                                         check_validity=False, overwrite=True)
    # The build looks the chapter up by the hash of its source; if that is not what was just
    # stored, it would execute the chapter again without a word: say so here instead.
    try:
        found = cache.match_cache_notebook(nbformat.read(path, as_version=4)).pk
    except KeyError:
        found = None
    if found != stored.pk:
        raise RuntimeError(f"{path.name}: the executed notebook does not hash like its source")


def cell_errors(executed: Path) -> list[str]:
    """The error outputs of an executed notebook, and code cells that never ran."""
    nb = json.loads(executed.read_text())
    problems = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        if cell.get("execution_count") is None and "".join(cell["source"]).strip():
            problems.append(f"cell {i} never ran")
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                problems.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
    return problems
