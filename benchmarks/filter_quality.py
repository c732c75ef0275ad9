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
import warnings
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


def evaluate(name, vectors, labels, pools, incoming, args, normalizations):
    """Rows per (setting, normalisation): one value per exemplar draw, each the mean over classes."""
    n_classes = labels.max() + 1
    settings = ("no negatives", "with negatives")
    table = {(s, n): [] for s in settings for n in normalizations}
    for draw in range(args.draws):
        rng = np.random.default_rng(draw)
        per_class = {key: [] for key in table}
        for c in range(n_classes):
            ex = rng.choice(pools[c], args.exemplars, replace=False)
            others = np.concatenate([pools[o] for o in range(n_classes) if o != c])
            neg = rng.choice(others, args.exemplars, replace=False)
            truth = labels[incoming] == c
            paths = [Path(str(i)) for i in incoming]
            for setting, negatives in (("no negatives", None), ("with negatives", neg)):
                for norm in normalizations:
                    result = filter_vectors(paths, vectors[incoming], [Path(str(i)) for i in ex], vectors[ex],
                                            None if negatives is None else [Path(str(i)) for i in negatives],
                                            None if negatives is None else vectors[negatives], normalize=norm,
                                            target_precision=args.target_precision)
                    keep = np.array([d.decision == "keep" for d in result.decisions])
                    score = np.array([d.score for d in result.decisions])
                    margin = score - np.array([d.reject_score or 0.0 for d in result.decisions]) \
                        if negatives is not None else score
                    tp = (keep & truth).sum()
                    t = result.threshold
                    precision, recall = tp / max(keep.sum(), 1), tp / truth.sum()
                    est_r = np.nan if t.est_recall is None else t.est_recall
                    est_p = np.nan if t.est_precision is None else t.est_precision
                    per_class[(setting, norm)].append(
                        (auroc(margin, truth), precision, recall, est_r, est_p, abs(est_r - recall),
                         abs(est_p - precision)))
                    if args.per_class and draw == 0:
                        print(f"  {name:>12} | {setting:14s} | {norm:6s} | class {c}: recall {recall:.3f} "
                              f"(stated {est_r:.3f}), precision {precision:.3f} (stated {est_p:.3f})")
        for key, rows in per_class.items():
            with warnings.catch_warnings():  # est. precision is NaN for every class without negatives
                warnings.simplefilter("ignore", RuntimeWarning)
                table[key].append(np.nanmean(np.array(rows, dtype=float), axis=0))
    for (setting, norm), draws in table.items():
        a = np.array(draws)  # [draws, 5]
        mean, spread = a.mean(axis=0), a.std(axis=0)
        est_p = f", est. precision {mean[4]:.3f}" if np.isfinite(mean[4]) else ""
        errors = f"; |stated - true| recall {mean[5]:.3f}" + (f", precision {mean[6]:.3f}" if np.isfinite(mean[6]) else "")
        print(f"  {name:>12} | {setting:14s} | {norm:6s}: AUROC {mean[0]:.3f} ± {spread[0]:.3f}; auto threshold: "
              f"precision {mean[1]:.3f} ± {spread[1]:.3f}, recall {mean[2]:.3f} ± {spread[2]:.3f} "
              f"(est. recall {mean[3]:.3f}{est_p}{errors}, mean over classes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--imagenette", type=Path, help="class folders (default: DATA/imagenette/train)")
    parser.add_argument("--model", type=Path, help="trained model directory (else only the baselines)")
    parser.add_argument("--preset", default="vit-tiny-16-224", help="architecture of the random-init baseline without --model")
    parser.add_argument("--exemplars", type=int, default=16)
    parser.add_argument("--incoming-per-class", type=int, default=50)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--draws", type=int, default=3, help="exemplar draws (seeds); ± is the std over them")
    parser.add_argument("--per-class", action="store_true", help="stated vs true recall and precision per class (first draw)")
    parser.add_argument("--target-precision", type=float, default=None, help="--threshold auto's target instead of recall 0.95")
    parser.add_argument("--normalize", nargs="+", default=["none", "center", "whiten"],
                        help="normalisations to compare side by side")
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
          f"{sum(len(p) for p in pools)} (the first 20 % of each class by file name), {len(incoming)} incoming "
          f"images (the last {args.incoming_per_class} of each class: {100 / len(data.classes):.0f} % positives "
          f"per class); {args.draws} exemplar draws; embedding {len(needed)} images")

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
        # Whitening 3,072-d raw pixels costs minutes of eigendecompositions per class: skipped.
        normalizations = [n for n in args.normalize if enc is not None or n != "whiten"]
        evaluate(name, full, data.labels, pools, incoming, args, normalizations)


if __name__ == "__main__":
    main()
