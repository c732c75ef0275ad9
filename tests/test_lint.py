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
