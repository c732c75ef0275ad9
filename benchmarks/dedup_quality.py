"""Near-duplicate detection on real photos: filterkit's dedup at its calibrated threshold
against a perceptual-hash baseline (imagehash pHash), on the same synthetic set.

    pip install imagehash    # benchmark-only (the `bench` extra)
    python benchmarks/dedup_quality.py [--data DIR] [--model models/x]     # DIR/imagenette/train

Photos sorted by name are split: the first ``--calibrate`` calibrate both methods (each picks
its threshold at pair precision 0.99 on originals + one synthetic near-duplicate each), the
next ``--distinct`` form the test collection, a ``--dup-fraction`` of which get one synthetic
near-duplicate (crop 70-95 %, resize, flip, JPEG q 30-90, colour shift). Pair-level precision
and recall of the planted pairs are reported for each method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from filterkit import Encoder, FilterkitError
from filterkit.dedup import near_duplicate_variant, threshold_for_precision
from filterkit.images import discover_images, load_image
from filterkit.index import range_pairs
from _data import add_data_argument, data_root, imagenette_train  # benchmarks/_data.py


def phash_bits(images: list[Image.Image]) -> np.ndarray:
    import imagehash

    return np.array([imagehash.phash(im).hash.flatten() for im in images], dtype=bool)


def pair_scores(kind: str, reps, n: int):
    """All pairs (i<j) with a similarity: cosine, or 64 - Hamming distance for pHash."""
    i, j = np.triu_indices(n, k=1)
    if kind == "cosine":
        return i, j, np.einsum("nd,nd->n", reps[i], reps[j])
    return i, j, 64 - (reps[i] != reps[j]).sum(axis=1)


def collection(images, rng, dup_fraction):
    n = len(images)
    chosen = rng.choice(n, int(round(dup_fraction * n)), replace=False)
    variants = [near_duplicate_variant(images[k], rng) for k in chosen]
    planted = {(int(k), n + m) for m, k in enumerate(chosen)}
    return images + variants, planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--imagenette", type=Path, help="photo folder (default: DATA/imagenette/train)")
    parser.add_argument("--model", type=Path, help="model directory (default: random-init vit-tiny-16-224)")
    parser.add_argument("--calibrate", type=int, default=200)
    parser.add_argument("--distinct", type=int, default=600)
    parser.add_argument("--dup-fraction", type=float, default=0.5)
    parser.add_argument("--precision", type=float, default=0.99)
    args = parser.parse_args()
    args.imagenette = args.imagenette or imagenette_train(data_root(args.data))

    rng = np.random.default_rng(0)
    paths = discover_images(args.imagenette)
    picked = [paths[i] for i in np.sort(rng.choice(len(paths), args.calibrate + args.distinct, replace=False))]
    calib_imgs = [load_image(p) for p in picked[:args.calibrate]]
    test_imgs = [load_image(p) for p in picked[args.calibrate:]]
    encoder = Encoder.load(args.model) if args.model else Encoder.random("vit-tiny-16-224")
    name = str(args.model) if args.model else "random-init vit-tiny-16-224"

    calib_all, calib_planted = collection(calib_imgs, rng, 1.0)
    test_all, planted = collection(test_imgs, rng, args.dup_fraction)
    print(f"calibration: {len(calib_imgs)} photos + {len(calib_planted)} near-duplicates; test: "
          f"{len(test_imgs)} photos + {len(planted)} planted near-duplicates ({len(test_all)} images)")

    for method, represent, kind in (
        (f"filterkit ({name})", lambda ims: encoder.embed(ims), "cosine"),
        ("pHash (imagehash)", phash_bits, "hamming"),
    ):
        reps = represent(calib_all)
        i, j, s = pair_scores(kind, reps, len(calib_all))
        truth = np.array([(a, b) in calib_planted for a, b in zip(i, j)])
        try:
            t, cal_p, cal_r = threshold_for_precision(s.astype(np.float64), truth, args.precision)
        except FilterkitError:
            print(f"  {method}: no threshold reaches precision {args.precision} on the calibration set "
                  "(recall 0 at that precision)")
            continue
        reps = represent(test_all)
        if kind == "cosine":  # the way `filterkit dedup` finds pairs: FAISS range search
            a, b, _ = range_pairs(reps, t)
            found = set(zip(a.tolist(), b.tolist()))
        else:
            i, j, s = pair_scores(kind, reps, len(test_all))
            found = {(int(x), int(y)) for x, y in zip(i[s >= t], j[s >= t])}
        hits = len(found & planted)
        precision = hits / max(len(found), 1)
        recall = hits / len(planted)
        unit = f"cosine >= {t:.4f}" if kind == "cosine" else f"Hamming <= {64 - int(t)} bits"
        print(f"  {method}: threshold {unit} (calibration precision {cal_p:.3f}, recall {cal_r:.3f}) -> "
              f"test precision {precision:.3f}, recall {recall:.3f} ({hits}/{len(planted)} planted pairs, "
              f"{len(found)} pairs reported)")


if __name__ == "__main__":
    main()
