"""Keep-like filtering quality on Imagenette, with the baselines measured in the same run.

    python benchmarks/filter_quality.py [--data DIR] \
        [--model models/x] [--exemplars 16 --incoming-per-class 50]

Each class folder, sorted by file name, gives an exemplar pool (its first 20 %) and incoming
images (its last ``--incoming-per-class``). For each class: 16 exemplars from its pool, the
incoming set of all classes scored against them; reported: mean over classes of the AUROC of
the keep-like score (this class vs the rest), and precision / recall of the keep decisions at
``--threshold auto``. Then the same with 16 reject-like exemplars drawn from the other
classes' pools. Encoders: the model given (if any), the same architecture at random init,
and raw 32x32 pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from filterkit import Encoder
from filterkit.augment import eval_transform
from filterkit.evaluate import RAW_PIXEL_SIZE, features, labelled_images, raw_pixel_embed
from filterkit.filtering import filter_vectors
from _data import add_data_argument, data_root, imagenette_train  # benchmarks/_data.py


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    allv = np.concatenate([pos, neg])
    for v in np.unique(allv):  # average ranks of ties
        tied = allv == v
        ranks[tied] = ranks[tied].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate(name, vectors, labels, pools, incoming, args, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    n_classes = labels.max() + 1
    rows = {"no negatives": [], "with negatives": []}
    for c in range(n_classes):
        ex = rng.choice(pools[c], args.exemplars, replace=False)
        others = np.concatenate([pools[o] for o in range(n_classes) if o != c])
        neg = rng.choice(others, args.exemplars, replace=False)
        truth = labels[incoming] == c
        paths = [Path(str(i)) for i in incoming]
        for setting, negatives in (("no negatives", None), ("with negatives", neg)):
            result = filter_vectors(paths, vectors[incoming], [Path(str(i)) for i in ex], vectors[ex],
                                    None if negatives is None else [Path(str(i)) for i in negatives],
                                    None if negatives is None else vectors[negatives])
            keep = np.array([d.decision == "keep" for d in result.decisions])
            score = np.array([d.score for d in result.decisions])
            margin = score - np.array([d.reject_score or 0.0 for d in result.decisions]) if negatives is not None else score
            tp = (keep & truth).sum()
            rows[setting].append((auroc(margin, truth), tp / max(keep.sum(), 1), tp / truth.sum(),
                                  result.threshold.est_recall, result.threshold.est_precision))
    for setting, r in rows.items():
        a = np.array([[x if x is not None else np.nan for x in row] for row in r], dtype=float)
        est_p = f", est. precision {np.nanmean(a[:, 4]):.3f}" if setting == "with negatives" else ""
        print(f"  {name:>14} | {setting:14s}: AUROC {a[:, 0].mean():.3f}; auto threshold: precision "
              f"{a[:, 1].mean():.3f}, recall {a[:, 2].mean():.3f} (est. recall {np.nanmean(a[:, 3]):.3f}{est_p})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--imagenette", type=Path, help="class folders (default: DATA/imagenette/train)")
    parser.add_argument("--model", type=Path, help="trained model directory (else only the baselines)")
    parser.add_argument("--preset", default="vit-tiny-16-224", help="architecture of the random-init baseline without --model")
    parser.add_argument("--exemplars", type=int, default=16)
    parser.add_argument("--incoming-per-class", type=int, default=50)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    args.imagenette = args.imagenette or imagenette_train(data_root(args.data))

    data = labelled_images(args.imagenette)
    pools, incoming = [], []
    for c in range(len(data.classes)):
        members = np.flatnonzero(data.labels == c)  # sorted by path
        pools.append(members[: len(members) // 5])
        incoming.append(members[-args.incoming_per_class:])
    incoming = np.concatenate(incoming)
    needed = np.unique(np.concatenate(pools + [incoming]))
    print(f"Imagenette: {len(data.classes)} classes, {args.exemplars} exemplars per class from a pool of "
          f"{sum(len(p) for p in pools)}, {len(incoming)} incoming images; embedding {len(needed)} images")

    encoders = []
    if args.model:
        trained = Encoder.load(args.model)
        encoders.append(("model", trained))
        cfg = trained.config
    else:
        from filterkit.modeldir import ModelConfig

        cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    from filterkit.encoder import build_backbone

    encoders.append(("random init", Encoder(build_backbone(cfg), cfg)))
    paths = [data.paths[i] for i in needed]
    for name, enc in encoders + [("raw pixels", None)]:
        if enc is None:
            vecs, kept = features(paths, eval_transform(RAW_PIXEL_SIZE), RAW_PIXEL_SIZE, raw_pixel_embed,
                                  workers=args.workers)
        else:
            vecs, kept = features(paths, enc.transform, enc.config.img_size, enc.embed_batch, workers=args.workers)
        assert len(kept) == len(paths), "an Imagenette image failed to decode"
        full = np.zeros((len(data.paths), vecs.shape[1]), dtype=np.float32)
        full[needed] = vecs
        evaluate(name, full, data.labels, pools, incoming, args)


if __name__ == "__main__":
    main()
