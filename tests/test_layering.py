"""The library's layer rules, read from its imports (static: nothing is executed).

The rules keep each module usable on its own and the dependency graph a readable tree:
config needs nothing of ours; models know neither training nor plots; the generic hooks work
on any nn.Module, so they import no model code; claims are about numbers, not about models or
training; the training loop draws nothing.
"""

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib" / "depthlab"
ALL = {p.stem for p in LIB.glob("*.py") if p.stem != "__init__"} | {"*"}   # "*": the package

RULES = {                     # module: the depthlab modules it must not import
    "seeding": ALL,
    "config": ALL - {"seeding"},
    "models": {"training", "plots", "hooks", "probes", "callbacks", "remedies", "claims",
               "explore"},
    "hooks": {"models", "probes", "interop", "reference", "plots", "claims", "explore"},
    "claims": {"models", "training", "hooks", "probes", "callbacks", "remedies"},
    "training": {"plots", "hooks", "probes", "callbacks", "remedies", "claims", "explore"},
    "callbacks": {"models", "plots", "claims"},
    "plots": {"models", "training", "hooks", "probes", "callbacks", "remedies"},
    # the process plumbing knows nothing of what runs in it (training imports it, not back)
    "parallel": ALL,
}


def _imports(module: str) -> set[str]:
    tree = ast.parse((LIB / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
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


@pytest.mark.parametrize("module", sorted(RULES))
def test_module_respects_the_layer_rules(module):
    wrong = _imports(module) & (RULES[module] - {module})
    assert not wrong, f"{module} imports {sorted(wrong)}"


def test_no_module_is_shadowed_by_a_function_of_the_same_name():
    """``import depthlab.train`` once returned the function ``train``: module and function
    names must differ, so that ``dl.<name>`` is always the same thing."""
    import depthlab as dl

    for name in ALL - {"*"}:
        obj = getattr(dl, name, None)
        assert obj is None or type(obj).__name__ == "module", name


def test_the_rules_can_fail():
    assert "training" in _imports("hooks")      # a real import is seen
    assert "config" in _imports("models")
