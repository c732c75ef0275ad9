import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import sample_photo
from filterkit import EmbeddingCache, FilterkitError, embed_folder


def _make_images(folder, start, count):
    """Distinct small images: crops of a real photo at different offsets."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = sample_photo("astronaut")
    for i in range(start, start + count):
        photo.crop((i * 7, i * 5, i * 7 + 128, i * 5 + 96)).save(folder / f"img_{i:03d}.png")


def _run(folder, encoder):
    with EmbeddingCache() as cache:
        return embed_folder(folder, encoder, cache, progress=False, workers=0)


def test_rerun_embeds_only_new_files(tmp_path, small_encoder):
    folder = tmp_path / "images"
    _make_images(folder, 0, 20)
    first = _run(folder, small_encoder)
    assert (first.n_embedded, first.n_cached) == (20, 0)

    again = _run(folder, small_encoder)
    assert (again.n_embedded, again.n_cached) == (0, 20)
    np.testing.assert_array_equal(again.vectors, first.vectors)

    _make_images(folder, 20, 10)
    third = _run(folder, small_encoder)
    assert (third.n_embedded, third.n_cached) == (10, 20)
    assert len(third.paths) == 30


def test_renamed_moved_and_copied_files_are_not_re_embedded(tmp_path, small_encoder):
    folder = tmp_path / "images"
    _make_images(folder, 0, 5)
    before = _run(folder, small_encoder)
    (folder / "img_000.png").rename(folder / "renamed.png")
    (folder / "sub").mkdir()
    shutil.move(folder / "img_001.png", folder / "sub" / "moved.png")
    shutil.copy(folder / "img_002.png", folder / "copy.png")
    after = _run(folder, small_encoder)
    assert after.n_embedded == 0
    assert len(after.paths) == 6
    by_name = dict(zip([p.name for p in after.paths], after.vectors))
    np.testing.assert_array_equal(by_name["renamed.png"], before.vectors[0])
    np.testing.assert_array_equal(by_name["copy.png"], by_name["img_002.png"])


def test_a_changed_file_is_re_hashed_and_re_embedded(tmp_path, small_encoder):
    folder = tmp_path / "images"
    _make_images(folder, 0, 3)
    _run(folder, small_encoder)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "img_001.png")
    assert _run(folder, small_encoder).n_embedded == 1


def test_another_model_gets_its_own_vectors(tmp_path, small_encoder):
    from filterkit import Encoder

    folder = tmp_path / "images"
    _make_images(folder, 0, 4)
    _run(folder, small_encoder)
    other = Encoder.random("vit-tiny-8-64", seed=1, depth=2)
    assert other.model_id != small_encoder.model_id
    assert _run(folder, other).n_embedded == 4


def test_failed_decodes_are_remembered_not_retried(tmp_path, small_encoder, monkeypatch):
    folder = tmp_path / "images"
    _make_images(folder, 0, 2)
    (folder / "broken.jpg").write_bytes(b"garbage")
    first = _run(folder, small_encoder)
    assert [s.path.name for s in first.skipped] == ["broken.jpg"]
    again = _run(folder, small_encoder)
    assert [s.reason for s in again.skipped] == [first.skipped[0].reason]
    assert again.n_embedded == 0 and again.n_cached == 2


def test_cached_vectors_equal_a_fresh_embedding(tmp_path, small_encoder):
    folder = tmp_path / "images"
    _make_images(folder, 0, 3)
    result = _run(folder, small_encoder)
    direct = small_encoder.embed(result.paths)
    np.testing.assert_allclose(result.vectors, direct, atol=1e-6)


def test_cache_that_is_not_sqlite_is_a_clear_error(tmp_path):
    bad = tmp_path / "cache.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(FilterkitError, match="cannot open the embedding cache"):
        EmbeddingCache(bad).count()


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from filterkit.fsutil import atomic_write_text

    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640
    (tmp_path / "a.txt").chmod(0o600)  # a stricter mode chosen by the user survives a rewrite
    atomic_write_text(tmp_path / "a.txt", "y")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o600
