"""Shared fixtures: real sample photos shipped by scikit-image, tiny random encoders, and a
private cache location so tests never touch ~/.cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Colour photos shipped inside scikit-image (no download).
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
               "motorcycle_left", "immunohistochemistry")


def sample_photo(name: str) -> Image.Image:
    import skimage.data

    if name == "motorcycle_left":
        arr = skimage.data.stereo_motorcycle()[0]
    else:
        arr = getattr(skimage.data, name)()
    return Image.fromarray(np.asarray(arr)).convert("RGB")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "embeddings.sqlite"
    monkeypatch.setenv("FILTERKIT_CACHE", str(path))
    monkeypatch.delenv("FILTERKIT_MODEL", raising=False)  # the shipped default model, not the user's
    return path


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """Eight distinct real photos as JPEGs (longer side 256 px)."""
    root = tmp_path_factory.mktemp("photos")
    for name in PHOTO_NAMES:
        im = sample_photo(name)
        im.thumbnail((256, 256))
        im.save(root / f"{name}.jpg", quality=92)
    return root


@pytest.fixture(scope="session")
def small_encoder():
    """A fast random-init encoder (64 px, patch 8, 2 blocks) for pipeline tests."""
    from filterkit import Encoder

    return Encoder.random("vit-tiny-8-64", seed=0, depth=2)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, small_encoder) -> Path:
    path = tmp_path_factory.mktemp("models") / "small"
    small_encoder.save(path)
    return path


def _strings(value):
    """Every string in a JSON document, keys included."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def assert_no_machine_path(doc, *folders):
    """No string of ``doc`` is an absolute or home path, and none of ``folders`` appears in it."""
    import json

    for text in _strings(doc):
        assert not text.startswith(("/", "~")) and ":\\" not in text, text
    dumped = json.dumps(doc)
    for folder in folders:
        assert str(folder) not in dumped


@pytest.fixture(scope="session")
def train_dir(tmp_path_factory):
    """A pretraining folder: 24 crops of one photo in 3 sub-folders (SupCon's classes)."""
    root = tmp_path_factory.mktemp("train")
    photo = sample_photo("astronaut")
    for i in range(24):
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        photo.crop((i * 15, i * 9, i * 15 + 120, i * 9 + 120)).resize((40, 40)).save(sub / f"{i}.png")
    return root


def write_edited_copies(root: Path, astronaut, chelsea) -> None:
    """Near copies that dedup must link, and look-alikes it must not, written into ``root``:
    a 90-degree rotation of ``astronaut``; ``chelsea`` flipped, at 3/5 size, JPEG quality 40;
    and two far-apart halves of one coffee scene (the look-alikes)."""
    import io

    from PIL import Image

    astronaut.transpose(Image.Transpose.ROTATE_90).save(root / "astronaut_rot90.png")
    small = chelsea.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((chelsea.width * 3 // 5, chelsea.height * 3 // 5))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=40)
    Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").save(root / "chelsea_flip_small_q40.png")
    coffee = sample_photo("coffee")
    w, h = coffee.size
    coffee.crop((0, 0, int(w * 0.45), h)).resize((128, 200)).save(root / "coffee_left.jpg", quality=90)
    coffee.crop((int(w * 0.55), 0, w, h)).resize((128, 200)).save(root / "coffee_right.jpg", quality=90)
