"""The book's Sphinx extension on a two-exercise book built in a temporary folder (seconds):
exercises numbered per chapter, nbgrader markers hidden, and a course build without solutions.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHAPTER = """# 5. Demo

````{exercise} First
:label: ex-a

Do it.
````

````{solution-start} ex-a
:class: dropdown
````

```python
### BEGIN SOLUTION
answer = 42
### END SOLUTION
```

````{solution-end}
````

````{exercise} Second
:label: ex-b

Again.
````
"""


def _build(tmp_path: Path, no_solutions: bool) -> str:
    src = tmp_path / "src"
    (src / "chapters").mkdir(parents=True)
    (src / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / '_ext')!r})\n"
        "extensions = ['myst_nb', 'sphinx_exercise', 'depthlab_book']\n"
        "numfig = True\nnb_execution_mode = 'off'\n")
    (src / "index.md").write_text("# Book\n\n```{toctree}\nchapters/05_demo\n```\n")
    (src / "chapters" / "05_demo.md").write_text(CHAPTER)
    env = dict(os.environ)
    env.pop("DEPTHLAB_NO_SOLUTIONS", None)
    if no_solutions:
        env["DEPTHLAB_NO_SOLUTIONS"] = "1"
    subprocess.run([sys.executable, "-m", "sphinx", "-q", "-W", "-b", "html", str(src),
                    str(tmp_path / "out")], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    return (tmp_path / "out" / "chapters" / "05_demo.html").read_text()


@pytest.mark.parametrize("no_solutions", [False, True], ids=["public", "course"])
def test_exercises_numbered_per_chapter_and_solutions(tmp_path, no_solutions):
    page = _build(tmp_path, no_solutions)
    assert "Exercise 5.1" in page and "Exercise 5.2" in page
    assert "BEGIN SOLUTION" not in page and "END SOLUTION" not in page
    assert ("Solution to" in page) is not no_solutions
    assert ("42" in page) is not no_solutions
