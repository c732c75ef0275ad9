"""How many rotated copies the rotation candidates of verified dedup put among an image's
neighbours: ``verify.DihedralSearch`` (each image's k nearest under each of the 8
flips/rotations, one FAISS index) over three kinds of thumbnail of the same images:

- ``detail 12x12 grey``: the whole-frame views the pair scores use (minus their 5x5 local mean);
  what the search used before;
- ``plain 6x6 grey``: the 48 x 48 work image area-averaged to 6 x 6, minus its mean, unit norm;
- ``colour 6x6 RGB``: ``verify.colour_thumbnail``, what the search uses now.

The collection: ``--images`` CIFAR-10 train photos drawn at random, plus one edited copy
(``near_duplicate_variant``: crop 70-95 %, resize, flip, colour, JPEG) of each of the first
``--copies``, every copy then turned by 90, 180 or 270 degrees: the copies the embedding does
not find, which only this search can propose. Reported per kind: the share of the copies among
their original's candidates (either way round, no floor), candidate pairs per image, and the
search's seconds (build and 8 searches; flat index up to 20,000 vectors, IVF above).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rotation_candidates.py [--data DIR] [--images 20000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _data import add_data_argument, cifar10, data_root

from filterkit import verify
from filterkit.dedup import ROTATIONS, near_duplicate_variant
from filterkit.images import discover_images, load_image


def plain_grey(work: np.ndarray, side: int = 6) -> np.ndarray:
    cells = work.astype(np.float32).reshape(len(work), side, verify.WORK // side, side, verify.WORK // side)
    flat = cells.mean(axis=(2, 4)).reshape(len(work), -1)
    flat -= flat.mean(axis=1, keepdims=True)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-3)


def grey_transform(thumbs: np.ndarray, t: int, side: int = 6) -> np.ndarray:
    square = thumbs.reshape(-1, side, side)
    if t >= 4:
        square = square[:, :, ::-1]
    return np.ascontiguousarray(np.rot90(square, t % 4, axes=(1, 2)).reshape(thumbs.shape))


def plain_search(thumbs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """DihedralSearch's self-search for thumbnails ``verify.transform`` has no shape for."""
    from filterkit.index import build_index, search

    index, n, found = build_index(thumbs), len(thumbs), []
    for t in range(8):
        hits = search(index, grey_transform(thumbs, t), k + 1)
        i, j = np.repeat(np.arange(n), k + 1), hits.ids.ravel().astype(np.int64)
        keep = (j >= 0) & (j != i)
        found.append(np.stack([np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])], axis=1))
    pairs = np.unique(np.concatenate(found), axis=0)
    return pairs[:, 0], pairs[:, 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("-k", type=int, default=10, help="neighbours per image and transform (dedup's NEIGHBOURS)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    paths = discover_images(cifar10(data_root(args.data)) / "train")
    paths = [paths[i] for i in rng.choice(len(paths), min(args.images, len(paths)), replace=False)]
    images = [load_image(p) for p in paths]
    copies = [near_duplicate_variant(im, rng).transpose(ROTATIONS[int(rng.integers(3))])
              for im in images[:args.copies]]
    table = verify.ViewTable(len(images) + len(copies))
    for row, im in enumerate(images + copies):
        table.set(row, im)
    n, m = len(images), len(copies)
    planted = {(c, n + c) for c in range(m)}
    kinds = {"detail 12x12 grey (before)": lambda: verify.DihedralSearch(table.frames, args.k, -1.0).pairs,
             "plain 6x6 grey": lambda: plain_search(plain_grey(table.work), args.k),
             "colour 6x6 RGB (now)": lambda: verify.DihedralSearch(table.colour, args.k, -1.0).pairs}
    print(f"{n} CIFAR-10 train photos + {m} edited copies, each turned 90/180/270 degrees; k = {args.k}, "
          f"seed {args.seed}")
    for name, run in kinds.items():
        start = time.perf_counter()
        rows, cols = run()
        seconds = time.perf_counter() - start
        found = set(zip(rows.tolist(), cols.tolist())) & planted
        print(f"  {name}: {len(found) / m:.3f} of the copies among the candidates; "
              f"{len(rows) / (n + m):.1f} pairs per image; {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
