"""`filterkit embed --ray`: Ray Data map_batches over an actor pool on a local Ray instance
started by the test; the cache it fills equals the one a local run fills."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest
import ray  # the ray extra; `make test` installs it

from filterkit.cli import main


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def _vectors(path):
    with sqlite3.connect(path) as db:
        return {h: np.frombuffer(v, "<f4") for h, v in db.execute("SELECT sha256, vector FROM embeddings")}


def _json(out: str) -> dict:
    """The command's JSON document. Ray's core worker can print a line of its own to stdout (e.g.
    "(raylet) A worker died or was killed ...", seen once in CI) even with log_to_driver=False;
    the document is what this test checks."""
    import json

    return json.JSONDecoder().raw_decode(out, out.index("{\n"))[0]


def test_ray_embed_equals_local_embed(local_ray, photos_dir, small_encoder, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(photos_dir, folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    model = tmp_path / "model"
    small_encoder.save(model)
    assert main(["embed", str(folder), "--model", str(model), "--cache", str(tmp_path / "local.sqlite"),
                 "--json", "-q"]) == 0
    local_out = capsys.readouterr().out
    assert main(["embed", str(folder), "--ray", "auto", "--ray-actors", "2", "--batch-size", "3", "--model",
                 str(model), "--cache", str(tmp_path / "ray.sqlite"), "--json", "-q"]) == 0
    ray_out = capsys.readouterr().out

    local, remote = _json(local_out), _json(ray_out)
    assert remote["embedded"] == local["embedded"] == len(list(photos_dir.iterdir()))
    assert [s["path"] for s in remote["skipped"]] == [str(folder / "broken.jpg")]
    a, b = _vectors(tmp_path / "local.sqlite"), _vectors(tmp_path / "ray.sqlite")
    assert a.keys() == b.keys()
    for h in a:
        np.testing.assert_allclose(a[h], b[h], atol=1e-5)
    # A second run finds everything in the cache and starts no work.
    assert main(["embed", str(folder), "--ray", "auto", "--model", str(model),
                 "--cache", str(tmp_path / "ray.sqlite"), "--json", "-q"]) == 0
    again = _json(capsys.readouterr().out)
    assert again["embedded"] == 0 and again["cached"] == local["embedded"]


def test_a_file_a_worker_cannot_read_is_retried_a_decode_failure_is_remembered(local_ray, photos_dir,
                                                                              small_encoder, tmp_path):
    from filterkit.cache import EmbeddingCache
    from filterkit.pipeline import embed_paths
    from filterkit.raydata import ray_runner

    folder = tmp_path / "photos"
    shutil.copytree(photos_dir, folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    paths = sorted(folder.iterdir())
    flaky = folder / "coffee.jpg"
    ray_run = ray_runner("auto", actors=1)
    sent = []

    def runner(todo, *args, missing_on_worker=()):
        sent.append(sorted(p.name for p in todo))
        # A node that lacks the file: same path, nothing to read there.
        todo = [p.with_name("absent.jpg") if p in missing_on_worker else p for p in todo]
        return ray_run(todo, *args)

    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        first = embed_paths(paths, small_encoder, cache, batch_size=3, progress=False,
                            runner=lambda *a: runner(*a, missing_on_worker={flaky}))
        reasons = {s.path.name: s.reason for s in first.skipped}
        assert reasons["coffee.jpg"].startswith("on a Ray worker: cannot read file")
        assert reasons["broken.jpg"].startswith("not an image")
        assert first.n_embedded == len(paths) - 2
        again = embed_paths(paths, small_encoder, cache, batch_size=3, progress=False, runner=runner)
    assert sent[1] == ["coffee.jpg"]  # the unreadable file is retried, the undecodable one is not
    assert again.n_embedded == 1
    assert [(s.path.name, s.reason) for s in again.skipped] == [("broken.jpg", reasons["broken.jpg"])]
