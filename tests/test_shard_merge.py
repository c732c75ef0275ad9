"""Embedding past one machine without Ray: `embed --shard I/N` on each machine, then
`cache merge`; the merged cache equals the cache of one unsharded run."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from filterkit.cache import EmbeddingCache
from filterkit.cli import main
from filterkit.errors import FilterkitError
from filterkit.images import discover_images, parse_shard, shard_of


def _rows(path):
    with sqlite3.connect(path) as db:
        return {(m, h): np.frombuffer(v, "<f4") for m, h, v in db.execute("SELECT model_id, sha256, vector FROM embeddings")}


def test_shards_partition_the_folder_deterministically(photos_dir, tmp_path):
    paths = discover_images(photos_dir)
    parts = [[p for p in paths if shard_of(p, photos_dir, 3) == i] for i in range(3)]
    assert sorted(sum(parts, [])) == paths and sum(map(len, parts)) == len(paths)
    # The same relative layout elsewhere (another mount point) splits identically.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    assert [shard_of(moved / p.name, moved, 3) for p in paths] == [shard_of(p, photos_dir, 3) for p in paths]


def test_sharded_embeds_merged_equal_one_unsharded_run(photos_dir, tmp_path, small_encoder, capsys):
    model = tmp_path / "model"
    small_encoder.save(model)
    assert main(["embed", str(photos_dir), "--model", str(model), "--cache", str(tmp_path / "all.sqlite"), "-q"]) == 0
    for i in range(3):
        assert main(["embed", str(photos_dir), "--shard", f"{i}/3", "--model", str(model),
                     "--cache", str(tmp_path / f"part{i}.sqlite"), "-q"]) == 0
    parts = [_rows(tmp_path / f"part{i}.sqlite") for i in range(3)]
    assert all(parts) and sum(map(len, parts)) == len(_rows(tmp_path / "all.sqlite"))  # disjoint, non-empty
    capsys.readouterr()
    assert main(["cache", "merge", *(str(tmp_path / f"part{i}.sqlite") for i in range(3)),
                 "--out", str(tmp_path / "merged.sqlite")]) == 0
    lines = capsys.readouterr().out.splitlines()  # a line per source, then the total
    assert len(lines) == 4 and lines[0].startswith(f"{tmp_path / 'part0.sqlite'}: +") and "vectors" in lines[-1]
    assert main(["cache", "merge", *(str(tmp_path / f"part{i}.sqlite") for i in range(3)),
                 "--out", str(tmp_path / "quiet.sqlite"), "-q"]) == 0
    assert capsys.readouterr().out.splitlines() == [lines[-1].replace("merged.sqlite", "quiet.sqlite")]  # -q: the total
    merged, single = _rows(tmp_path / "merged.sqlite"), _rows(tmp_path / "all.sqlite")
    assert merged.keys() == single.keys()
    for key in single:  # batches differ, so allow BLAS-level differences only
        np.testing.assert_allclose(merged[key], single[key], atol=1e-5)
    with EmbeddingCache(tmp_path / "merged.sqlite") as cache:
        assert cache.integrity_check() == "ok"
        # Merging again adds nothing and overwrites nothing.
        assert cache.merge_from(tmp_path / "part0.sqlite") == {"embeddings": 0, "files": 0, "failures": 0}


def test_shard_and_merge_errors(tmp_path, capsys):
    with pytest.raises(FilterkitError, match="I/N"):
        parse_shard("2")
    with pytest.raises(FilterkitError, match="0 <= I < N"):
        parse_shard("3/3")
    assert main(["cache", "merge", str(tmp_path / "nope.sqlite"), "--out", str(tmp_path / "c.sqlite")]) == 1
    assert "cache not found" in capsys.readouterr().err
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    assert main(["cache", "merge", str(tmp_path / "junk.sqlite"), "--out", str(tmp_path / "c.sqlite")]) == 1
    assert "cannot merge" in capsys.readouterr().err
    assert not (tmp_path / "c.sqlite").exists()  # a refused merge leaves no empty cache behind
    # a bad source after a good one: refused before --out is touched, not half merged
    good = tmp_path / "good.sqlite"
    with EmbeddingCache(good) as cache:
        cache.put("m", ["a" * 64], np.ones((1, 4), np.float32))
    assert main(["cache", "merge", str(good), str(tmp_path / "nope.sqlite"), "--out", str(tmp_path / "c.sqlite")]) == 1
    assert "cache not found" in capsys.readouterr().err and not (tmp_path / "c.sqlite").exists()
