"""The repository passes its own `ruff check` (settings in pyproject.toml), so an unused import
or a shadowed loop variable fails CI instead of waiting for a reader."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "filterkit", "tests", "benchmarks",
                           "scripts", "examples"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_python_examples_of_the_readme_and_the_package_docstring_define_what_they_use(tmp_path):
    import re
    import textwrap

    import filterkit

    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S | re.M)
    blocks.append(textwrap.dedent(filterkit.__doc__.split("\n\n")[1]))  # the indented example
    assert len(blocks) >= 3 and all("enc" in b for b in blocks)
    for i, block in enumerate(blocks):
        (tmp_path / f"example{i}.py").write_text(block, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select", "F821",
                           str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr  # F821: an undefined name, e.g. enc without Encoder.load()
