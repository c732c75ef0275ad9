"""The short version of benchmarks/faults.py: SIGKILL embed, filter --action move and
pretrain once each at a random moment, rerun, and check nothing was lost or corrupted;
then two embeds on one cache at once."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import faults  # noqa: E402


def test_kills_lose_nothing_and_corrupt_nothing(tmp_path):
    lines = []
    totals = faults.run_all(tmp_path / "work", n=1, n_photos=40, seed=3, say=lines.append)
    assert totals.get("faults", 0) >= 1, lines  # at least one run was really killed mid-work
    assert totals.get("lost", 0) == 0, lines
    assert totals.get("corrupted", 0) == 0, lines
    assert len(lines) == 4
