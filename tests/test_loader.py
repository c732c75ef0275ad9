"""loader.embed_batches: the one decode + embed loop."""

from __future__ import annotations

import numpy as np
import pytest

from filterkit.errors import ImageError, ImageReadError
from filterkit.loader import embed_all, embed_batches


def test_embed_batches_keeps_input_order_and_tells_unreadable_from_undecodable(photos_dir, small_encoder,
                                                                               tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    photos = sorted(photos_dir.iterdir())[:3]
    paths = [photos[0], tmp_path / "missing.jpg", photos[1], tmp_path / "broken.jpg", photos[2]]
    enc = small_encoder
    batches = list(embed_batches(paths, enc.transform, enc.config.img_size, enc.embed_batch,
                                 batch_size=2, workers=0))
    assert [b.indices for b in batches] == [[0], [2], [4]]
    failures = [f for b in batches for f in b.failures]
    assert [(f.index, f.unreadable) for f in failures] == [(1, True), (3, False)]
    assert failures[0].reason.startswith("cannot read file") and failures[1].reason.startswith("not an image")
    vectors = np.concatenate([b.vectors for b in batches])
    np.testing.assert_allclose(vectors, enc.embed(photos), atol=1e-6)
    # embed_all, on the same loop, returns the same failures; Encoder.embed raises by their kind.
    _, kept, failed = embed_all(paths, enc.transform, enc.config.img_size, enc.embed_batch, 2, 0)
    assert kept == [0, 2, 4] and failed == failures
    with pytest.raises(ImageReadError, match="missing.jpg: cannot read file"):
        enc.embed([photos[0], tmp_path / "missing.jpg"])
    with pytest.raises(ImageError, match="broken.jpg: not an image") as raised:
        enc.embed([photos[0], tmp_path / "broken.jpg"])
    assert not isinstance(raised.value, ImageReadError)
