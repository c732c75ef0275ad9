"""`filterkit index build`: an IVF index trained once, filled cache by cache, lists merged on
disk; searched with `filterkit search --index`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from filterkit.cache import EmbeddingCache
from filterkit.cli import main
from filterkit.errors import FilterkitError
from filterkit.index import build_index, default_nlist
from filterkit.ondisk import build_index_dir, load_index_dir


def _unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sharded_caches_make_one_on_disk_index(tmp_path):
    rng = np.random.default_rng(0)
    x = _unit(rng, 3000)
    hashes = [f"{i:064x}" for i in range(len(x))]
    # Two shards that overlap by 500 contents: each content must be indexed once.
    for name, rows in (("a", slice(0, 2000)), ("b", slice(1500, 3000))):
        with EmbeddingCache(tmp_path / f"{name}.sqlite") as cache:
            cache.put("m", hashes[rows], x[rows])
    meta = build_index_dir([tmp_path / "a.sqlite", tmp_path / "b.sqlite"], "m", tmp_path / "idx", nlist=16)
    assert meta["vectors"] == 3000 and meta["nlist"] == 16 and meta["recall_at_10"] >= 0.99
    assert not (tmp_path / "idx" / ".build").exists()
    index, sha256_of, _ = load_index_dir(tmp_path / "idx")
    assert index.ntotal == 3000 and sorted(sha256_of) == hashes
    _, ids = index.search(x[:50], 1)
    assert [sha256_of[i] for i in ids[:, 0]] == hashes[:50]  # each vector finds itself
    with pytest.raises(FilterkitError, match="not an empty folder"):
        build_index_dir([tmp_path / "a.sqlite"], "m", tmp_path / "idx")
    with pytest.raises(FilterkitError, match="no vectors of model"):
        build_index_dir([tmp_path / "a.sqlite"], "other-model", tmp_path / "idx2")


def test_on_disk_index_is_sized_and_tuned_like_the_in_memory_one(tmp_path):
    rng = np.random.default_rng(2)
    x = _unit(rng, 3000)
    with EmbeddingCache(tmp_path / "a.sqlite") as cache:  # sha256 order = row order
        cache.put("m", [f"{i:064x}" for i in range(len(x))], x)
    meta = build_index_dir([tmp_path / "a.sqlite"], "m", tmp_path / "idx", target_recall=0.9)
    in_memory = build_index(x, kind="ivf", target_recall=0.9)
    assert meta["nlist"] == in_memory.nlist == default_nlist(len(x))
    assert meta["nprobe"] == in_memory.nprobe > 1


def test_cli_index_build_then_search_matches_folder_search(photos_dir, small_encoder, tmp_path, capsys):
    model = tmp_path / "model"
    small_encoder.save(model)
    for i in range(2):
        assert main(["embed", str(photos_dir), "--shard", f"{i}/2", "--model", str(model),
                     "--cache", str(tmp_path / f"p{i}.sqlite"), "-q"]) == 0
    # Centred on the 8 photos (auto would leave so few raw): the index stores the normaliser
    # and applies it to the queries, so it ranks and scores as the folder search does.
    capsys.readouterr()
    assert main(["index", "build", "--cache", str(tmp_path / "p0.sqlite"), "--cache", str(tmp_path / "p1.sqlite"),
                 "--out", str(tmp_path / "idx"), "--nlist", "2", "--model", str(model), "--normalize", "center",
                 "--json"]) == 0
    captured = capsys.readouterr()
    built = json.loads(captured.out)  # --json: meta.json and where it is; the progress goes to stderr
    assert "training 2 lists" in captured.err
    assert built == {"index": str(tmp_path / "idx"), **json.loads((tmp_path / "idx" / "meta.json").read_text())}
    assert built["vectors"] == 8 and built["nlist"] == 2
    query = str(photos_dir / "chelsea.jpg")
    assert main(["search", query, "--index", str(tmp_path / "idx"), "-k", "3", "--model", str(model), "--json", "-q"]) == 0
    indexed = json.loads(capsys.readouterr().out)
    from_index = indexed["queries"][0]["results"]
    assert main(["search", query, "--in", str(photos_dir), "-k", "3", "--model", str(model), "--normalize", "center",
                 "--json", "-q"]) == 0
    folder = json.loads(capsys.readouterr().out)
    from_folder = folder["queries"][0]["results"]
    assert indexed["normalize"] == folder["normalize"] == {"kind": "center", "fitted_on": 8}
    assert from_index[0]["path"].endswith("chelsea.jpg")
    assert [r["path"] for r in from_index] == [r["path"] for r in from_folder]
    np.testing.assert_allclose([r["score"] for r in from_index], [r["score"] for r in from_folder], atol=1e-5)
    assert main(["search", query, "--in", str(photos_dir), "-k", "3", "--model", str(model), "--normalize", "none",
                 "--json", "-q"]) == 0
    raw = json.loads(capsys.readouterr().out)["queries"][0]["results"]
    assert raw[1]["score"] > from_folder[1]["score"] + 0.05  # raw cosines crowd near 1; centred ones do not
    # Another model's queries are refused.
    other = tmp_path / "other"
    from filterkit import Encoder

    Encoder.random("vit-tiny-8-64", seed=1, depth=1).save(other)
    assert main(["search", query, "--index", str(tmp_path / "idx"), "--model", str(other), "-q"]) == 1
    assert "pass the --model it was built with" in capsys.readouterr().err


def test_an_index_is_built_in_its_normalised_space_and_older_indexes_read_as_raw(tmp_path):
    from filterkit.ondisk import load_normalizer

    rng = np.random.default_rng(3)
    common = rng.standard_normal(16).astype(np.float32)
    x = _unit(rng, 1000) + 2 * common / np.linalg.norm(common)  # anisotropic: one shared direction
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with EmbeddingCache(tmp_path / "a.sqlite") as cache:
        cache.put("m", [f"{i:064x}" for i in range(len(x))], x)
    meta = build_index_dir([tmp_path / "a.sqlite"], "m", tmp_path / "idx", nlist=4)
    norm = load_normalizer(tmp_path / "idx", meta)
    assert meta["normalize"]["kind"] == norm.kind == "center"
    np.testing.assert_allclose(norm.mean, x.mean(axis=0), atol=0.05)  # the mean of the training sample
    index, _, _ = load_index_dir(tmp_path / "idx")
    index.nprobe = 4
    scores, ids = index.search(norm(x[:20]), 1)
    assert list(ids[:, 0]) == list(range(20)) and np.allclose(scores[:, 0], 1.0, atol=1e-4)
    raw = build_index_dir([tmp_path / "a.sqlite"], "m", tmp_path / "raw", nlist=4, normalize="none")
    assert raw["normalize"]["kind"] == "none" and load_normalizer(tmp_path / "raw", raw).kind == "none"
    old = dict(raw)
    del old["normalize"]  # an index from before normalisers were stored: raw cosine
    assert load_normalizer(tmp_path / "raw", old).kind == "none"
    (tmp_path / "idx" / "normalizer_mean.npy").unlink()  # meta.json says centred: refuse, never guess raw
    with pytest.raises(FilterkitError, match="normaliser.s arrays are missing"):
        load_normalizer(tmp_path / "idx", meta)


def test_an_index_directory_can_be_moved_and_read_only(tmp_path):
    import shutil

    rng = np.random.default_rng(1)
    x = _unit(rng, 2000)
    hashes = [f"{i:064x}" for i in range(len(x))]
    with EmbeddingCache(tmp_path / "a.sqlite") as cache:
        cache.put("m", hashes, x)
    build_index_dir([tmp_path / "a.sqlite"], "m", tmp_path / "idx", nlist=8)
    moved = tmp_path / "elsewhere" / "idx"
    moved.parent.mkdir()
    shutil.move(tmp_path / "idx", moved)
    for f in moved.iterdir():
        f.chmod(0o444)
    moved.chmod(0o555)
    try:
        index, sha256_of, _ = load_index_dir(moved)
        _, ids = index.search(x[:20], 1)
        assert [sha256_of[i] for i in ids[:, 0]] == hashes[:20]
    finally:
        moved.chmod(0o755)
