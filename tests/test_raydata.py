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
    import json

    local, remote = json.loads(local_out), json.loads(ray_out)
    assert remote["embedded"] == local["embedded"] == len(list(photos_dir.iterdir()))
    assert [s["path"] for s in remote["skipped"]] == [str(folder / "broken.jpg")]
    a, b = _vectors(tmp_path / "local.sqlite"), _vectors(tmp_path / "ray.sqlite")
    assert a.keys() == b.keys()
    for h in a:
        np.testing.assert_allclose(a[h], b[h], atol=1e-5)
    # A second run finds everything in the cache and starts no work.
    assert main(["embed", str(folder), "--ray", "auto", "--model", str(model),
                 "--cache", str(tmp_path / "ray.sqlite"), "--json", "-q"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["embedded"] == 0 and again["cached"] == local["embedded"]
