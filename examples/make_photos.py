"""Regenerate the example photos from sample images that PyPI packages ship.

    pip install scikit-image scikit-learn matplotlib   # only needed to regenerate
    python examples/make_photos.py

The photos and their licences are listed in examples/LICENSES.md. Layout:
  exemplars/  photos to keep more of (a cat, a cup of coffee)
  negatives/  photos to reject more of (a deep-space image)
  incoming/   the folder to filter: edited copies of the exemplars (crops, resizes, a flip,
              recompression) among unrelated photos, and near-duplicate pairs for dedup
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageEnhance

HERE = Path(__file__).parent


def package_file(package: str, *parts: str) -> Image.Image:
    """A data file of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install {package}")
    return Image.open(Path(list(spec.submodule_search_locations)[0], *parts)).convert("RGB")


def skimage_photo(name: str) -> Image.Image:
    return Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")


def save(im: Image.Image, folder: str, name: str, quality: int = 90) -> None:
    (HERE / folder).mkdir(exist_ok=True)
    im.save(HERE / folder / name, quality=quality)


def crop_fraction(im: Image.Image, f: float, dx: float = 0.5, dy: float = 0.5) -> Image.Image:
    w, h = int(im.width * f), int(im.height * f)
    x, y = int((im.width - w) * dx), int((im.height - h) * dy)
    return im.crop((x, y, x + w, y + h))


def resized(im: Image.Image, f: float) -> Image.Image:
    return im.resize((int(im.width * f), int(im.height * f)), Image.Resampling.LANCZOS)


def main() -> None:
    cat, cup = skimage_photo("chelsea"), skimage_photo("coffee")
    save(cat, "exemplars", "cat.jpg")
    save(cup, "exemplars", "coffee.jpg")
    save(skimage_photo("hubble_deep_field"), "negatives", "deep_field.jpg")

    # Edited copies of the exemplars: what a keep-like filter must catch.
    save(crop_fraction(cat, 0.7, 0.3, 0.4), "incoming", "cat_cropped.jpg")
    save(resized(cat, 0.5).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "incoming", "cat_small_flipped.jpg", 75)
    save(crop_fraction(cup, 0.75, 0.6, 0.5), "incoming", "coffee_cropped.jpg")
    save(ImageEnhance.Color(resized(cup, 0.6)).enhance(0.6), "incoming", "coffee_faded.jpg", 80)
    # Unrelated photos, two of them with a near-duplicate (resized / recompressed) copy.
    astronaut, rocket = skimage_photo("astronaut"), skimage_photo("rocket")
    save(astronaut, "incoming", "astronaut.jpg")
    save(resized(astronaut, 0.5), "incoming", "astronaut_small.jpg", 70)
    save(rocket, "incoming", "rocket.jpg")
    save(crop_fraction(rocket, 0.9), "incoming", "rocket_trimmed.jpg", 85)
    save(skimage_photo("retina"), "incoming", "retina.jpg")
    save(skimage_photo("camera"), "incoming", "cameraman.jpg")
    save(skimage_photo("immunohistochemistry"), "incoming", "tissue.jpg")
    save(package_file("sklearn", "datasets", "images", "china.jpg"), "incoming", "temple.jpg")
    save(package_file("sklearn", "datasets", "images", "flower.jpg"), "incoming", "flower.jpg")
    save(package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"), "incoming", "grace_hopper.jpg")


if __name__ == "__main__":
    main()
