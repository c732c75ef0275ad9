"""Cross-set dedup (train/test leakage) on planted copies: `filterkit dedup NEW --against
REFERENCE` with `--threshold auto`, its stated precision and recall beside the true ones.

    python benchmarks/leakage_quality.py [--data DIR] [--model models/filterkit-vit-mini] \
        [--seeds 0 1 2] [--originals 100 --distractors 900]

Per seed, from CIFAR-10 train (32 px), with dedup_quality.py's helpers (imported, not copied):
``--originals`` images drawn at random, one synthetic copy of each (dedup.synthetic_copy: crop
70-95 %, resize 50-100 %, maybe a flip, colour shift, JPEG q30-90, and one time in four a
90/180/270-degree rotation), each original's look-alike (the nearest other image of its class
by the model's embedding, probable real copies left out) and ``--distractors`` random images.
The reference holds the originals and half the distractors; the new folder holds the copies,
the look-alikes and the other half. True cross-set pairs: each copy with its original. A link
counts as right only when it names the copy's own original. For context, the oracle recall at
precision 0.90 of each new image's best reference image by embedding cosine (a threshold no
method could pick without labels). The goal: recall >= 0.80 at true precision >= 0.90.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _data import add_data_argument, cifar10, data_root  # benchmarks/_data.py
from dedup_quality import build, recall_at_precision  # benchmarks/dedup_quality.py

from filterkit import Encoder
from filterkit.images import discover_images
from filterkit.leakage import find_cross_duplicates


def evaluate(paths, labels, encoder, seed: int, args) -> dict:
    rng = np.random.default_rng(seed)
    images, copies, left_out = build(paths, labels, encoder, rng, args.originals, args.distractors)
    m = len(copies)
    originals, look, others = images[:m], images[m:2 * m], images[2 * m:]
    half = len(others) // 2
    reference = originals + others[:half]
    new = copies + look + others[half:]
    root = Path(tempfile.mkdtemp(prefix="fk-leakage-"))
    try:
        for folder, members, prefix in ((root / "reference", reference, "r"), (root / "new", new, "n")):
            folder.mkdir()
            for k, im in enumerate(members):
                im.save(folder / f"{prefix}{k:05d}.png")
        truth = {f"n{k:05d}.png": f"r{k:05d}.png" for k in range(m)}  # copy k of original k
        start = time.perf_counter()
        result = find_cross_duplicates(root / "new", root / "reference", encoder, seed=seed, workers=0,
                                       target_precision=args.target_precision)
        seconds = time.perf_counter() - start
        right = sum(truth.get(d.path.name) == d.duplicate_of.name for d in result.duplicates)
        new_v, ref_v = encoder.embed(new), encoder.embed(reference)
        sims = new_v @ ref_v.T
        best = sims.argmax(axis=1)
        oracle = recall_at_precision(sims.max(axis=1), np.arange(len(new)) < m, m) if m else 0.0
        oracle_right = float(np.mean(best[:m] == np.arange(m)))  # the best reference is the original
        c = result.calibration
        return {"precision": right / max(len(result.duplicates), 1), "recall": right / m, "links": len(result.duplicates),
                "stated_precision": c.precision, "stated_bound": c.precision_bound, "stated_recall": c.recall,
                "threshold": c.threshold, "seconds": seconds, "oracle": oracle, "oracle_best": oracle_right,
                "sizes": (len(reference), len(new)), "left_out": left_out}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--model", type=Path, default=Path("models/filterkit-vit-mini"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--originals", type=int, default=100)
    parser.add_argument("--distractors", type=int, default=900)
    parser.add_argument("--target-precision", type=float, default=0.90)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    encoder = Encoder.load(args.model)
    folder = cifar10(data_root(args.data)) / "train"
    paths = discover_images(folder)
    labels = [p.parent.name for p in paths]
    rows = []
    for seed in args.seeds:
        r = evaluate(paths, labels, encoder, seed, args)
        rows.append(r)
        print(f"seed {seed}: reference {r['sizes'][0]}, new {r['sizes'][1]} ({args.originals} planted copies; "
              f"{r['left_out']} probable real copies left out of the look-alikes): {r['links']} links, "
              f"true P {r['precision']:.3f} R {r['recall']:.3f}; stated P {r['stated_precision']:.3f} "
              f"(bound {r['stated_bound']:.3f}) R {r['stated_recall']:.3f}; pair score >= {r['threshold']:.4f}; "
              f"{r['seconds']:.1f} s; cosine oracle recall at P 0.90 {r['oracle']:.3f} "
              f"(best reference = original for {r['oracle_best']:.2f})", flush=True)

    def spread(key):
        values = [r[key] for r in rows]
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}"
    print(f"{len(rows)} seeds (mean ± std): true precision {spread('precision')}, recall {spread('recall')}; "
          f"stated precision {spread('stated_precision')} (bound {spread('stated_bound')}), recall "
          f"{spread('stated_recall')}; cosine oracle recall at P 0.90 {spread('oracle')}; "
          f"{np.mean([r['seconds'] for r in rows]):.1f} s per run")


if __name__ == "__main__":
    main()
