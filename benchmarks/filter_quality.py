"""Keep-like filtering quality on Imagenette (224 px) or CIFAR-10 (32 px, --set cifar10), with the baselines measured in the same run.

    python benchmarks/filter_quality.py [--data DIR] [--model models/x] [--exemplars 16 --incoming-per-class 50] \
        [--normalize none center whiten] [--scoring topm-centroid topm prototypes linear topm+knn linear+knn]

Each class folder, sorted by file name, gives an exemplar pool (its first 20 %) and incoming
images (its last ``--incoming-per-class``). For each class: 16 exemplars from its pool, the
incoming set of all classes scored against them; reported: mean over classes of the AUROC of
the keep-like score (this class vs the rest), and precision / recall of the keep decisions at
``--threshold auto`` (the threshold alone, review counted as kept at or above it), the review
band's share of the images and how often the threshold is wrong inside and outside it. Then the
same with 16 reject-like exemplars drawn from the other classes' pools. One row per
normalisation and scoring. Encoders: the model given (if any), the same architecture at random init,
and raw 32x32 pixels.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from _data import add_data_argument, cifar10, data_root, imagenette_train  # benchmarks/_data.py

from filterkit import Encoder
from filterkit.augment import eval_transform
from filterkit.evaluate import RAW_PIXEL_SIZE, features, labelled_images, raw_pixel_embed
from filterkit.filtering import DEFAULT_PROTOTYPES, DEFAULT_SCORING, filter_vectors


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


def binomial_floor(recall: float, n: int, m: int | None = None) -> float:
    """E|K/n - r|, K ~ Binomial(n, r), r the true recall: the recall error an estimator that knew
    each class's expected recall exactly would still make against ``n`` incoming positives (the
    true recall is itself a sample of n). With ``m``: E|J/m - K/n|, J ~ Binomial(m, r), the error
    of an unbiased estimate that sees m exemplars kept or not (their kept share). The realised
    recall stands in for r."""
    from scipy.stats import binom

    k = np.arange(n + 1)
    pk = binom.pmf(k, n, recall)
    if m is None:
        return float((pk * np.abs(k / n - recall)).sum())
    j = np.arange(m + 1)
    pj = binom.pmf(j, m, recall)
    return float((pj[:, None] * pk[None, :] * np.abs(j[:, None] / m - k[None, :] / n)).sum())


def evaluate(name, vectors, labels, draws, incoming, args, normalizations, scorings):
    """Rows per (setting, normalisation, scoring): one value per exemplar draw, each the mean over classes."""
    n_classes = len(draws[0])
    settings = ("no negatives", "with negatives")
    table = {(s, n, sc): [] for s in settings for n in normalizations for sc in scorings
             if s == "with negatives" or not sc.startswith("linear")}  # a classifier needs both sets
    classes = {key: [] for key in table}  # per draw: [classes, 6] stated / true recall, precision, prevalence
    for drawn in draws:
        per_class = {key: [] for key in table}
        for c, (ex, neg) in enumerate(drawn):
            truth = labels[incoming] == c
            paths = [Path(str(i)) for i in incoming]
            for setting, norm, scoring in table:
                negatives = neg if setting == "with negatives" else None
                result = filter_vectors(paths, vectors[incoming], [Path(str(i)) for i in ex], vectors[ex],
                                        None if negatives is None else [Path(str(i)) for i in negatives],
                                        None if negatives is None else vectors[negatives], normalize=norm,
                                        target_precision=args.target_precision, target_recall=args.target_recall,
                                        scoring=scoring, review_band=args.review_band,
                                        prototypes=args.prototypes if scoring.startswith("prototypes") else None)
                score = np.array([d.score for d in result.decisions])
                rscore = np.array([-np.inf if d.reject_score is None else d.reject_score for d in result.decisions])
                t = result.threshold
                # The threshold alone (what est. recall / precision describe): review counted as kept
                # at or above the threshold, as rejected below it.
                kept = (score >= t.value) & (score > rscore)
                review = np.array([d.decision == "review" for d in result.decisions])
                sure_keep = np.array([d.decision == "keep" for d in result.decisions])
                margin = score - np.where(np.isfinite(rscore), rscore, 0.0)
                tp = (kept & truth).sum()
                precision, recall = tp / max(kept.sum(), 1), tp / truth.sum()
                wrong = kept != truth
                # Is the band the threshold's error? Without negatives the threshold aims at a recall,
                # so the one that reaches it on this incoming set is known: is it within the band?
                ideal = np.quantile(score[truth], 1 - args.target_recall, method="lower")
                covered = abs(t.value - ideal) <= t.review_band if t.target_recall is not None and negatives is None \
                    else np.nan
                est_r = np.nan if t.est_recall is None else t.est_recall
                est_p = np.nan if t.est_precision is None else t.est_precision
                per_class[(setting, norm, scoring)].append(
                    (auroc(margin, truth), precision, recall, est_r, est_p, abs(est_r - recall),
                     abs(est_p - precision), review.mean(), wrong[review].mean() if review.any() else np.nan,
                     wrong[~review].mean(), (sure_keep & truth).sum() / max(sure_keep.sum(), 1),
                     (sure_keep & truth).sum() / truth.sum(), t.review_band, covered,
                     binomial_floor(recall, int(truth.sum())), binomial_floor(recall, int(truth.sum()), len(ex))))
                est_pi = np.nan if t.est_prevalence is None else t.est_prevalence
                if c == 0:
                    classes[(setting, norm, scoring)].append([])
                classes[(setting, norm, scoring)][-1].append((est_r, recall, est_p, precision, est_pi, truth.mean()))
        for key, rows in per_class.items():
            with warnings.catch_warnings():  # est. precision is NaN for every class without negatives
                warnings.simplefilter("ignore", RuntimeWarning)
                table[key].append(np.nanmean(np.array(rows, dtype=float), axis=0))
    if args.per_class:
        for (setting, norm, scoring), got in classes.items():
            a = np.array(got, dtype=float)  # [draws, classes, 6]
            mean, spread = a.mean(axis=0), a.std(axis=0)
            for c in range(n_classes):
                m, s = mean[c], spread[c]
                print(f"  {name:>12} | {setting:14s} | {norm:6s} | {scoring:15s} | class {c}: recall stated "
                      f"{m[0]:.3f} ± {s[0]:.3f}, true {m[1]:.3f} ± {s[1]:.3f}; precision stated {m[2]:.3f} ± "
                      f"{s[2]:.3f}, true {m[3]:.3f} ± {s[3]:.3f}; prevalence stated {m[4]:.3f} ± {s[4]:.3f}, "
                      f"true {m[5]:.3f}")
    for (setting, norm, scoring), got in table.items():
        a = np.array(got)  # [draws, 16]
        mean, spread = a.mean(axis=0), a.std(axis=0)
        # Paired over the same draws: the difference to the setting's first scoring.
        reference = next(sc for (s, n, sc) in table if (s, n) == (setting, norm))
        delta = a[:, 0] - np.array(table[(setting, norm, reference)])[:, 0]
        paired = f" (vs {reference}: {delta.mean():+.3f} ± {delta.std():.3f} paired)" if scoring != reference else ""
        in_band = f"{mean[8]:.1%}" if np.isfinite(mean[8]) else "-"
        covered = f", the recall target's threshold on the incoming set within it for {mean[13]:.0%} of the classes" \
            if np.isfinite(mean[13]) else ""
        est_p = f", est. precision {mean[4]:.3f}" if np.isfinite(mean[4]) else ""
        errors = (f"; |stated - true| recall {mean[5]:.3f} (floors: {mean[14]:.3f} knowing each class's recall, "
                  f"{mean[15]:.3f} from the exemplars' kept share)"
                  + (f", precision {mean[6]:.3f}" if np.isfinite(mean[6]) else ""))
        print(f"  {name:>12} | {setting:14s} | {norm:6s} | {scoring:15s}: AUROC {mean[0]:.3f} ± {spread[0]:.3f}{paired}; "
              f"auto threshold: precision {mean[1]:.3f} ± {spread[1]:.3f}, recall {mean[2]:.3f} ± {spread[2]:.3f} "
              f"(est. recall {mean[3]:.3f}{est_p}{errors}); review band ±{mean[12]:.3f}: {mean[7]:.1%} of the "
              f"images{covered}, wrong by the threshold {in_band} of them vs {mean[9]:.1%} outside; keep decisions "
              f"alone: precision {mean[10]:.3f}, recall {mean[11]:.3f} (mean over classes)")
        # the pool precision is withheld where the mixture (or, with negatives, the adjusted count) is not pinned
        c = np.array(classes[(setting, norm, scoring)], dtype=float).reshape(-1, 6)
        stated = np.isfinite(c[:, 2])
        err = f", mean |stated - true| {np.abs(c[stated, 2] - c[stated, 3]).mean():.3f}" if stated.any() else ""
        print(f"  {name:>12} | {setting:14s} | {norm:6s} | {scoring:15s}: precision stated for {stated.sum()} of "
              f"{len(c)} class-draws{err}")


def split(set_name: str, root: Path, args):
    """(labelled images, exemplar pool per class, incoming indices, words on the split). Imagenette:
    each class folder sorted by file name, the pool its first 20 %, incoming its last
    ``--incoming-per-class``. CIFAR-10: the pool is the first 20 % of each train class, incoming
    the last ``--incoming-per-class`` of each test class (another split, as a user's exemplars
    come from another batch than the incoming images)."""
    if set_name == "imagenette":
        data = labelled_images(args.imagenette or imagenette_train(root))
        pool_data, where = data, "Imagenette train (224 px)"
        words = "the first 20 % of each class by file name; incoming: the last {n} of each class"
    else:
        folder = cifar10(root)
        pool_data, test = labelled_images(folder / "train"), labelled_images(folder / "test")
        assert pool_data.classes == test.classes
        # One index space: train images first, then test.
        data = type(test)(pool_data.paths + test.paths, np.concatenate([pool_data.labels, test.labels]),
                          test.classes)
        where = "CIFAR-10 (32 px)"
        words = "the first 20 % of each train class by file name; incoming: the last {n} of each test class"
    offset = len(pool_data.paths) if data is not pool_data else 0
    pools, incoming = [], []
    for c in range(len(data.classes)):
        members = np.flatnonzero(pool_data.labels == c)  # sorted by path
        pools.append(members[: len(members) // 5])
        incoming_of = np.flatnonzero(data.labels[offset:] == c) + offset if offset else members
        incoming.append(incoming_of[-args.incoming_per_class:])
    return data, pools, np.concatenate(incoming), where, words.format(n=args.incoming_per_class)


def draw_exemplars(pools, n_classes: int, args) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per draw (seed), per class: (keep-like exemplars, reject-like exemplars from the other classes' pools)."""
    draws = []
    for draw in range(args.draws):
        rng = np.random.default_rng(draw)
        per_class = []
        for c in range(n_classes):
            ex = rng.choice(pools[c], args.exemplars, replace=False)
            others = np.concatenate([pools[o] for o in range(n_classes) if o != c])
            per_class.append((ex, rng.choice(others, args.exemplars, replace=False)))
        draws.append(per_class)
    return draws


def embed(name: str, enc, paths: list[Path], args, tag: str) -> np.ndarray:
    """Vectors of ``paths``; with ``--vectors-cache DIR`` kept there as .npy between runs."""
    import hashlib

    cached = None
    if args.vectors_cache:
        key = hashlib.sha256("\n".join([tag, name, *map(str, paths)]).encode()).hexdigest()[:16]
        cached = args.vectors_cache / f"filter_quality-{name.replace(' ', '_')}-{key}.npy"
        if cached.is_file():
            return np.load(cached)
    if enc is None:
        vecs, kept = features(paths, eval_transform(RAW_PIXEL_SIZE), RAW_PIXEL_SIZE, raw_pixel_embed,
                              workers=args.workers)
    else:
        vecs, kept = features(paths, enc.transform, enc.config.img_size, enc.embed_batch, workers=args.workers)
    assert len(kept) == len(paths), "an image failed to decode"
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, vecs)
    return vecs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--set", default="imagenette", choices=("imagenette", "cifar10"),
                        help="imagenette: 224-px photos, exemplars and incoming from train; cifar10: 32-px, "
                             "exemplars from train, incoming from test")
    parser.add_argument("--imagenette", type=Path, help="class folders (default: DATA/imagenette/train)")
    parser.add_argument("--model", type=Path, help="trained model directory (else only the baselines)")
    parser.add_argument("--preset", default="vit-tiny-16-224", help="architecture of the random-init baseline without --model")
    parser.add_argument("--exemplars", type=int, default=16)
    parser.add_argument("--incoming-per-class", type=int, default=50)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--draws", type=int, default=3, help="exemplar draws (seeds); ± is the std over them")
    parser.add_argument("--per-class", action="store_true",
                        help="stated vs true recall, precision and prevalence per class (mean ± std over draws)")
    parser.add_argument("--target-precision", type=float, default=None, help="--threshold auto's target instead of --target-recall")
    parser.add_argument("--target-recall", type=float, default=0.95, help="--threshold auto's recall target")
    parser.add_argument("--review-band", default="auto",
                        help="auto (the threshold's bootstrap spread) or a width; 0 skips the bootstrap, which "
                             "refits the pool mixture 100 times per class with --target-precision")
    parser.add_argument("--normalize", nargs="+", default=["none", "center", "whiten"],
                        help="normalisations to compare side by side")
    parser.add_argument("--scoring", nargs="+", default=[DEFAULT_SCORING],
                        help="scorings to compare side by side (filtering.SCORINGS, each optionally +knn); "
                             "linear only with negatives")
    parser.add_argument("--prototypes", type=int, default=DEFAULT_PROTOTYPES, help="K of --scoring prototypes")
    parser.add_argument("--vectors-cache", type=Path, default=None, metavar="DIR",
                        help="keep the embeddings as .npy files in DIR between runs")
    parser.add_argument("--encoders", nargs="+", default=["model", "random init", "raw pixels"],
                        help="which of model, 'random init', 'raw pixels' to run")
    args = parser.parse_args()
    args.review_band = args.review_band if args.review_band == "auto" else float(args.review_band)

    data, pools, incoming, where, words = split(args.set, data_root(args.data), args)
    n_classes = len(data.classes)
    draws = draw_exemplars(pools, n_classes, args)
    # Only the images some draw uses are embedded.
    needed = np.unique(np.concatenate([incoming] + [a for d in draws for pair in d for a in pair]))
    print(f"{where}: {n_classes} classes, {args.exemplars} keep-like exemplars per class (and {args.exemplars} "
          f"reject-like from the other classes) drawn from a pool of {sum(len(p) for p in pools)} ({words}): "
          f"{len(incoming)} incoming images, {100 / n_classes:.0f} % positives per class; {args.draws} exemplar "
          f"draws; embedding {len(needed)} images")

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
        if name not in args.encoders:
            continue
        vecs = embed(name, enc, paths, args, enc.model_id if enc is not None else f"raw{RAW_PIXEL_SIZE}")
        full = np.zeros((len(data.paths), vecs.shape[1]), dtype=np.float32)
        full[needed] = vecs
        # Whitening 3,072-d raw pixels costs minutes of eigendecompositions per class: skipped.
        normalizations = [n for n in args.normalize if enc is not None or n != "whiten"]
        evaluate(name, full, data.labels, draws, incoming, args, normalizations, args.scoring)


if __name__ == "__main__":
    main()
