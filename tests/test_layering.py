"""The library's layers, read from its imports (static: nothing of the modules is executed).

``depthlab.LAYERS`` lists the modules by layer, bottom first. A module may import only modules
of lower layers, directly or through the modules it imports (transitively): so there are no
cycles, nothing low knows anything high (the training loop knows no model, no measurement
knows training), and each module can be read knowing only the layers beneath it. Imports sit
at the top of a module; one inside a function must say why (a heavy optional import).
"""

import ast
import sys
import types
from pathlib import Path

import pytest

import depthlab as dl

LIB = Path(__file__).resolve().parents[1] / "lib" / "depthlab"
LAYER_OF = {name: i for i, layer in enumerate(dl.LAYERS) for name in layer}


def _imports(source: str) -> set[str]:
    """The depthlab modules a module's source imports ("*" for the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("depthlab"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "*")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("depthlab"):
                    found.add("*")
    return found


def _graph(sources: dict[str, str]) -> dict[str, set[str]]:
    return {name: _imports(src) for name, src in sources.items()}


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return seen


def _violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module in graph:
        for dep in sorted(_closure(graph, module)):
            if dep == "*" or dep not in LAYER_OF:
                out.append(f"{module} imports {dep!r}, which is not a module of LAYERS")
            elif LAYER_OF[dep] >= LAYER_OF[module]:
                out.append(f"{module} (layer {LAYER_OF[module]}) imports {dep} "
                           f"(layer {LAYER_OF[dep]})")
    return out


SOURCES = {p.stem: p.read_text() for p in LIB.glob("*.py") if p.stem != "__init__"}


def test_every_module_is_in_exactly_one_layer():
    assert sorted(SOURCES) == sorted(LAYER_OF), "LAYERS and lib/depthlab/*.py disagree"
    assert len(dl.MODULES) == len(set(dl.MODULES))


def test_every_import_goes_down_the_layers_transitively():
    assert _violations(_graph(SOURCES)) == []


def test_a_canary_import_upward_is_caught_also_through_another_module():
    """The check can fail: an upward import added to a bottom module is reported, for that
    module and for every module above that imports it."""
    canary = dict(SOURCES, devices=SOURCES["devices"] + "\nfrom .training import train\n")
    found = _violations(_graph(canary))
    assert any(v.startswith("devices (layer 0) imports training") for v in found)
    assert any(v.startswith("models (layer 2) imports training") for v in found)   # through


def test_imports_inside_functions_say_why():
    """A function-level import is for a heavy optional dependency or a cycle, and its line
    says so in a comment; every other import sits at the top of the module."""
    bare = []
    for name, src in SOURCES.items():
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        if "#" not in lines[inner.lineno - 1]:
                            bare.append(f"{name}.py:{inner.lineno}")
    assert bare == [], "imports inside functions without a reason: " + ", ".join(bare)


def test_no_module_is_shadowed_by_a_function_of_the_same_name():
    """``import depthlab.train`` once returned the function ``train``: module and function
    names must differ, so that ``dl.<name>`` is always the same thing. A module may be a
    ``ModuleType`` subclass that is also callable (``dl.doctor(model, batch)``): it is still
    the module, with everything in it."""
    for name in dl.MODULES:
        mod = getattr(dl, name)
        assert isinstance(mod, types.ModuleType), name
        assert mod is sys.modules[f"depthlab.{name}"], name


@pytest.mark.parametrize("module", dl.MODULES)
def test_every_module_says_what_it_holds_and_names_its_chapter(module):
    doc = ast.get_docstring(ast.parse(SOURCES[module])) or ""
    assert len(doc) > 80, module


def test_the_readme_layout_describes_every_module():
    readme = (LIB.parents[1] / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    assert [m for m in dl.MODULES if f"  {m}.py" not in layout] == []
    assert [f for f in ("ensemble.py", "parallel.py", "hooks.py", "remedies.py",
                        "diagnostics.py") if f in layout] == []
