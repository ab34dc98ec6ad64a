"""depthlab against Colab's package versions (Aug 2026 list), torch aside.

Colab ships Python 3.13, torch 2.11, ipywidgets 7.7.1, matplotlib 3.10, numpy 2.1,
scikit-learn 1.6 and ipykernel 6.17, and the chapters tell Colab users to install only
depthlab. This test builds a fresh virtual environment that already has torch and those pins,
installs depthlab into it the way the setup cell does (a plain ``pip install`` of the
repository), checks that torch was left untouched, then runs the library's model and explorer
tests and executes chapter 0 with live ipywidgets 7 widgets.

The torch here is this machine's 2.13.0 CPU wheel (no 2.11 CPU wheel is available to us) and
the Python is this machine's; depthlab uses no torch API newer than 2.11 (see models.py).
"""

import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLAB_PINS = ["ipywidgets==7.7.1", "matplotlib==3.10.*", "numpy==2.1.*",
              "scikit-learn==1.6.*", "ipykernel==6.17.*"]


def _pip(python: Path, *args: str) -> str:
    proc = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _torch_fingerprint(python: Path) -> str:
    return subprocess.run(
        [str(python), "-c", "import torch, os; print(torch.__version__, "
         "os.path.getmtime(torch.__file__), torch.__file__)"],
        capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def colab_python(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("colab") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    _pip(python, "install", "--quiet", "torch==2.13.0", *COLAB_PINS,
         "nbclient", "nbformat", "pytest")
    return python


def test_installing_depthlab_keeps_the_existing_torch(colab_python):
    before = _torch_fingerprint(colab_python)
    out = _pip(colab_python, "install", str(ROOT))
    installed = [line for line in out.splitlines() if line.startswith("Successfully installed")]
    assert installed and "depthlab" in installed[0]
    assert "torch" not in installed[0].replace("depthlab", "")
    assert _torch_fingerprint(colab_python) == before
    versions = subprocess.run(
        [str(colab_python), "-c",
         "import ipywidgets, matplotlib, numpy, sklearn; print(ipywidgets.__version__, "
         "matplotlib.__version__, numpy.__version__, sklearn.__version__)"],
        capture_output=True, text=True, check=True).stdout.split()
    assert versions[0] == "7.7.1" and versions[1].startswith("3.10")
    assert versions[2].startswith("2.1.") and versions[3].startswith("1.6")


def test_library_tests_pass_with_colab_pins(colab_python):
    proc = subprocess.run(
        [str(colab_python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_models.py", "tests/test_plots_and_explore.py", "tests/test_claims.py"],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # the live-widget tests must have run, not been skipped for want of ipywidgets
    assert "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-500:]


def test_chapter_zero_runs_with_live_ipywidgets_7(colab_python, tmp_path):
    script = (
        "import nbformat, sys\n"
        "from nbclient import NotebookClient\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "NotebookClient(nb, timeout=300, kernel_name='python3',\n"
        "               resources={'metadata': {'path': sys.argv[2]}}).execute()\n"
        "views = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs\n"
        "         if 'application/vnd.jupyter.widget-view+json' in o.get('data', {})]\n"
        "print('widget views:', len(views))\n"
    )
    env = dict(os.environ, DEPTHLAB_STATIC="", MPLBACKEND="module://matplotlib_inline."
               "backend_inline", PATH=f"{colab_python.parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("DEPTHLAB_LEDGER", None)
    proc = subprocess.run(
        [str(colab_python), "-c", script, str(ROOT / "chapters" / "00_tour.ipynb"),
         str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    views = int(proc.stdout.split("widget views:")[1].split()[0])
    assert views >= 1, "the explorer did not produce a live widget"
