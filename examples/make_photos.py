"""Regenerate the example photos from the sample images that scikit-image ships.

    python examples/make_photos.py     # needs scikit-image (the `test` extra)

Licences (from scikit-image's data documentation): astronaut, rocket and hubble_deep_field
are public domain (NASA / SpaceX); chelsea and coffee are CC0.
"""

from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

HERE = Path(__file__).parent


def main() -> None:
    photos = {n: Image.fromarray(np.asarray(getattr(skimage.data, n)())).convert("RGB")
              for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")}
    for name, im in photos.items():
        im.save(HERE / "photos" / f"{name}.jpg", quality=90)
    # Near-duplicate queries: a flipped, shrunk cat and a cropped coffee cup.
    cat = photos["chelsea"]
    cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((cat.width * 2 // 3, cat.height * 2 // 3)) \
        .save(HERE / "queries" / "chelsea_flipped_small.jpg", quality=80)
    cup = photos["coffee"]
    cup.crop((60, 40, cup.width - 60, cup.height - 40)).save(HERE / "queries" / "coffee_cropped.jpg", quality=85)


if __name__ == "__main__":
    main()
