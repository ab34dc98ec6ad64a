"""A pytest plugin that keeps what nbval's run of a notebook produced: the executed notebook.

nbval (``pytest --nbval-lax``) runs every code cell of a notebook in one kernel, one test per
cell, and throws the outputs away. With this plugin loaded (``-p nbval_capture``, this folder on
``sys.path``) and a folder given (``--nbval-capture=DIR`` or ``NBVAL_CAPTURE=DIR``), it writes,
for every notebook nbval ran:

- ``DIR/<name>.ipynb``: the notebook as executed (nbformat v4), each code cell with the outputs
  and execution count of nbval's run, in place; no timing metadata in the cells (jupyter-cache
  hashes all cell metadata, so the executed notebook hashes like its source); the kernel's
  ``language_info`` in the notebook's metadata, as nbclient would put it there. A cell that
  never ran (after a failure with ``-x``, or a dead kernel) has no outputs and no count.
- ``DIR/<name>.nbval.json``: ``seconds`` (from just before nbval starts the kernel to the end
  of the last cell it ran: kernel start-up, every cell and nbval's handling of its messages; not
  pytest's own start, collection, or the kernel's shut-down), ``cells_run`` and ``failures``
  (nbval's report of each failed cell, colour codes removed).

The outputs are nbval's own (``IPyNbCell.test_outputs``, set in ``runtest`` even when the cell
fails, the error output included). nbval merges each cell's stdout (and stderr) into one stream
output, as the book's build does anyway (``nb_merge_streams``); it ignores ``clear_output`` and
display updates, which no chapter uses. Its kernel runs cells with ``store_history=False`` (the
kernel's counter does not move), so the counts are numbered here: 1, 2, ... over the non-empty
cells that ran, as Jupyter shows them after "Run all".

One more thing the plugin adds to nbval: a kernel that dies in a cell is noticed within a second
(the cell fails with "Kernel died", an error output in that cell) instead of after the whole
``--nbval-cell-timeout``.

Used by tools/execute.py, one notebook per pytest process; it works for a folder as well:

    PYTHONPATH=tools pytest --nbval-lax --nbval-current-env -p nbval_capture \\
        --nbval-capture=_build/nbval chapters/
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from pathlib import Path
from queue import Empty

import nbformat
import pytest

HERE = str(Path(__file__).resolve().parent)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def pytest_addoption(parser):
    parser.getgroup("nbval").addoption(
        "--nbval-capture", default=os.environ.get("NBVAL_CAPTURE"), metavar="DIR",
        help="write every notebook nbval runs, executed, into DIR (with a .nbval.json report)")


def pytest_configure(config):
    directory = config.getoption("nbval_capture")
    if directory:
        config.pluginmanager.register(Capture(Path(directory)), "nbval-capture")
        # This folder was put on PYTHONPATH only to load the plugin: kernels started from here
        # inherit the environment, and should see the sys.path they would see without it.
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if p and os.path.abspath(p) != HERE]
        if paths:
            os.environ["PYTHONPATH"] = os.pathsep.join(paths)
        else:
            os.environ.pop("PYTHONPATH", None)


class _Notebook:
    """What was captured of one notebook's run."""

    def __init__(self, nbfile):
        self.name = Path(str(nbfile.fspath)).stem
        self.nb = copy.deepcopy(nbfile.nb)
        for cell in self.nb.cells:
            if cell.cell_type == "code":
                cell.outputs = []
                cell.execution_count = None
        # nbval's cells are the cells of nbfile.nb: find each one's copy by identity
        self.index = {id(cell): i for i, cell in enumerate(nbfile.nb.cells)}
        self.start = time.perf_counter()          # before the kernel starts (see the docstring)
        self.end = self.start
        self.count = 0
        self.cells_run = 0
        self.failures: list[str] = []
        self.kernel_died = False
        self.asked_language = False
        self.written = False


class Capture:
    def __init__(self, directory: Path):
        self.directory = directory
        self.notebooks: dict[int, _Notebook] = {}          # id(IPyNbFile) -> its capture

    def _of(self, item):
        from nbval.plugin import IPyNbCell

        if not isinstance(item, IPyNbCell):
            return None
        key = id(item.parent)
        if key not in self.notebooks:
            self.notebooks[key] = _Notebook(item.parent)
        return self.notebooks[key]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):
        self._of(item)                 # the first cell's setup starts the notebook's kernel
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        state = self._of(item)
        if state is None:
            return (yield)
        kernel = item.parent.kernel
        if kernel is not None and not state.asked_language:
            self._language_info(kernel, state)
        if kernel is not None:
            _watch(kernel, item, state)
        try:
            return (yield)
        finally:
            state.end = time.perf_counter()
            self._record(item, state)

    def _language_info(self, kernel, state):
        """The kernel's language_info, as nbclient puts it into the notebook's metadata (the
        book's build takes its code lexer from there)."""
        state.asked_language = True
        try:
            reply = kernel.kc.kernel_info(reply=True, timeout=30)
            state.nb.metadata["language_info"] = reply["content"]["language_info"]
        except Exception:            # keep the source's language_info; nbval runs on
            pass

    def _record(self, item, state):
        cell = state.nb.cells[state.index[id(item.cell)]]
        outputs = item.test_outputs
        if state.kernel_died:                    # it died in this cell: say so in the cell
            outputs = list(outputs or []) + [nbformat.v4.new_output(
                "error", ename="DeadKernelError", evalue="Kernel died while executing the cell",
                traceback=[])]
            state.kernel_died = False
        if outputs is None:                      # skipped, or the kernel was already dead
            return
        state.cells_run += 1
        if cell.source.strip():
            state.count += 1
            cell.execution_count = state.count
        cell.outputs = []
        for out in outputs:
            out = nbformat.from_dict(copy.deepcopy(dict(out)))
            if out.output_type == "execute_result":
                out.execution_count = cell.execution_count
            cell.outputs.append(out)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        state = self.notebooks.get(id(getattr(item, "parent", None)))
        if state is not None and report.failed:
            state.failures.append(ANSI.sub("", report.longreprtext))
        return report

    def pytest_runtest_teardown(self, item, nextitem):
        state = self.notebooks.get(id(getattr(item, "parent", None)))
        if state is not None and (nextitem is None or nextitem.parent is not item.parent):
            self._write(state)                    # the notebook's last cell has run

    def pytest_sessionfinish(self, session):
        for state in self.notebooks.values():     # stopped early (-x, an interrupt)
            self._write(state)

    def _write(self, state):
        if state.written:
            return
        state.written = True
        self.directory.mkdir(parents=True, exist_ok=True)
        nbformat.write(state.nb, str(self.directory / f"{state.name}.ipynb"))
        report = {"seconds": state.end - state.start, "cells_run": state.cells_run,
                  "failures": state.failures}
        (self.directory / f"{state.name}.nbval.json").write_text(json.dumps(report, indent=1))


def _watch(kernel, item, state):
    """Make nbval's waits for kernel messages notice a dead kernel within a second.

    nbval waits for a cell's reply for the whole cell timeout; if the kernel dies meanwhile
    (killed for memory, a crash in native code) it would wait that long and then report a
    timeout. Every wait is cut into one-second slices, the kernel's process checked between."""
    from nbval.plugin import NbCellError

    original = kernel.__dict__.get("_nbval_capture_original") or kernel.get_message
    kernel._nbval_capture_original = original

    def get_message(stream, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                return original(stream, timeout=step)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if not kernel.is_alive():
                    state.kernel_died = True
                    raise NbCellError(item.cell_num, "Kernel died while executing the cell",
                                      item.cell.source) from None

    kernel.get_message = get_message
