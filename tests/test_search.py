import numpy as np
import pytest
from PIL import Image

from conftest import PHOTO_NAMES
from filterkit import EmbeddingCache, Encoder, FilterkitError, build_index, embed_folder, search


@pytest.mark.parametrize("preset", ["vit-tiny-16-224", "vit-tiny-8-64"])
def test_flipped_resized_copy_finds_its_original_first(tmp_path, photos_dir, preset):
    # A random-init ViT already maps an image and its flipped, resized copy close together
    # (its CLS token averages patch features, which a flip permutes), and distinct photos
    # apart: enough for near-duplicate search on real photos.
    encoder = Encoder.random(preset, seed=0)
    with EmbeddingCache() as cache:
        folder = embed_folder(photos_dir, encoder, cache, progress=False, workers=0)
    index = build_index(folder.vectors)
    queries = []
    for name in PHOTO_NAMES:
        im = Image.open(photos_dir / f"{name}.jpg")
        copy = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((im.width * 7 // 10, im.height * 7 // 10))
        copy.save(tmp_path / f"{name}_copy.jpg", quality=85)
        queries.append(tmp_path / f"{name}_copy.jpg")
    found = search(index, encoder.embed(queries), k=2)
    top1 = [folder.paths[i].stem for i in found.ids[:, 0]]
    assert top1 == list(PHOTO_NAMES)
    assert np.all(found.scores[:, 0] > found.scores[:, 1])


def test_search_returns_at_most_the_indexed_count_and_checks_dimensions():
    vectors = np.eye(3, 4, dtype=np.float32)
    index = build_index(vectors)
    found = search(index, vectors[:1], k=10)
    assert found.ids.shape == (1, 3) and found.ids[0, 0] == 0
    assert found.scores[0, 0] == pytest.approx(1.0)
    with pytest.raises(FilterkitError, match="dimension mismatch"):
        search(index, np.ones((1, 5), np.float32), k=1)
