"""Outlier detection on planted photos: 10 images of other classes among 300 of one class; how
many of the 10 does `filterkit outliers` rank in its top 10?

    python benchmarks/outlier_quality.py [--data DIR] [--model models/filterkit-vit-mini] \
        [--sets imagenette cifar10] [--draws 3] [--base 300 --planted 10]

Per draw and set (Imagenette train at 224 px, as collection_quality.py: its held-out split
has under 300 photos per class, and the shipped model saw most of these photos, without labels,
in pretraining; CIFAR-10 test at 32 px): one class gives
``--base`` images (another class each draw), every other class contributes to ``--planted``
images drawn at random. Each
encoder embeds the same images: the model, the same architecture at random init and raw 32x32
pixels (benchmarks/_encoders.py); ``outliers.rank_outliers`` scores them (mean cosine distance to
the k = 10 nearest others) in raw cosine for every encoder, and for the model also in the model
directory's reference mean (the command's default, reference.py), centred on a reference mean
taken here from ``--cross-reference`` images of the *other* set only (CIFAR-10 train for
Imagenette, Imagenette train for CIFAR-10: whether the gain needs photos like the collection's;
every encoder centred on its own mean of the same images),
centred and whitened on the collection (``--normalize center | whiten``), and with
``--alternatives`` other scores of the model's vectors (``alternative_scores``). Printed: planted
images in the top ``--planted`` (the goal: >= 7 of 10) and the AUROC of the score for planted vs
base images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _data import add_data_argument, cifar10, data_root, imagenette_train  # benchmarks/_data.py
from _encoders import compared_encoders, embed_paths
from sklearn.metrics import roc_auc_score

from filterkit.images import discover_images
from filterkit.normalize import Normalizer
from filterkit.outliers import outlier_scores, rank_outliers


def draw(paths: list[Path], labels: list[str], seed: int, base: int, planted: int):
    """(class, paths, is_planted): ``base`` images of one class (a different one per seed, in a
    fixed shuffled order) and ``planted`` of the others."""
    classes = sorted(set(labels))
    target = classes[np.random.default_rng(1234).permutation(len(classes))[seed % len(classes)]]
    rng = np.random.default_rng(seed)
    labels = np.array(labels)
    inside, outside = np.flatnonzero(labels == target), np.flatnonzero(labels != target)
    chosen = np.concatenate([rng.choice(inside, base, replace=False), rng.choice(outside, planted, replace=False)])
    return target, [paths[i] for i in chosen], np.arange(len(chosen)) >= base


def alternative_scores(vectors: np.ndarray) -> dict[str, np.ndarray]:
    """Other outlier scores of the same raw unit vectors (higher = more unusual), to compare with
    the command's k-NN distance: k = 1 and 50; cosine distance to the collection's mean; the
    Mahalanobis distance under a Ledoit-Wolf covariance; the local outlier factor (20
    neighbours); an isolation forest (seed 0)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor

    v = vectors.astype(np.float64)
    mean = v.mean(axis=0)
    out = {f"k-NN k={k}": outlier_scores(vectors, k)[0] for k in (1, 50)}
    out["distance to the mean"] = 1.0 - v @ (mean / np.linalg.norm(mean))
    out["Mahalanobis (Ledoit-Wolf)"] = LedoitWolf().fit(v).mahalanobis(v)
    out["local outlier factor"] = -LocalOutlierFactor(20).fit(v).negative_outlier_factor_
    out["isolation forest"] = -IsolationForest(random_state=0).fit(v).score_samples(v)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--model", type=Path, default=Path("models/filterkit-vit-mini"))
    parser.add_argument("--sets", nargs="+", default=["imagenette", "cifar10"])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--base", type=int, default=300)
    parser.add_argument("--planted", type=int, default=10)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--cross-reference", type=int, default=2048,
                        help="images of the other set to take the cross-set reference mean of (0: skip)")
    parser.add_argument("--alternatives", action="store_true",
                        help="also score the model's vectors with other outlier scores (scikit-learn), side by side")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    root = data_root(args.data)
    encoders = compared_encoders(args.model, "vit-mini-8-64")
    model = dict(encoders).get("model")
    shipped = model.reference() if model is not None else None
    for name in args.sets:
        folder = imagenette_train(root) if name == "imagenette" else cifar10(root) / "test"
        cross = {}  # per encoder: its own mean over the same images of the other set
        if args.cross_reference:
            other = discover_images(cifar10(root) / "train" if name == "imagenette" else imagenette_train(root))
            pick = np.sort(np.random.default_rng(0).choice(len(other), min(args.cross_reference, len(other)), replace=False))
            cross = {label: Normalizer.fit(embed_paths(encoder, [other[i] for i in pick]), "center")
                     for label, encoder in encoders}
        paths = discover_images(folder)
        labels = [p.parent.name for p in paths]
        rows: dict[str, list[tuple[int, float]]] = {}
        for seed in range(args.draws):
            target, chosen, planted = draw(paths, labels, seed, args.base, args.planted)
            line = []
            for label, encoder in encoders:
                vectors = embed_paths(encoder, chosen, workers=0)
                spaces = [("none", None, label)]
                if label == "model" and shipped:
                    spaces += [("reference", shipped, "model, the model's reference (the default)")]
                if label in cross:
                    spaces += [("reference", cross[label], f"{label}, a reference from the other set only")]
                if label == "model":
                    spaces += [("center", None, f"{label}, centred"), ("whiten", None, f"{label}, whitened")]
                if label == "model" and args.alternatives:
                    for key, score in alternative_scores(vectors).items():
                        hits = int(planted[np.argsort(-score, kind="stable")[:args.planted]].sum())
                        auroc = roc_auc_score(planted, score)
                        rows.setdefault(f"model, {key}", []).append((hits, auroc))
                        line.append(f"model, {key} {hits}/{args.planted} (AUROC {auroc:.3f})")
                for space, reference, key in spaces:
                    result = rank_outliers(chosen, vectors, top=args.planted, k=args.k, normalize=space,
                                           reference=reference)
                    score = {str(o.path): o.score for o in result.ranked}
                    hits = sum(planted[chosen.index(o.path)] for o in result.outliers)
                    auroc = roc_auc_score(planted, [score[str(p)] for p in chosen])
                    rows.setdefault(key, []).append((hits, auroc))
                    line.append(f"{key} {hits}/{args.planted} (AUROC {auroc:.3f})")
            print(f"{name} draw {seed} (class {target}, {args.base} + {args.planted} planted): " + "; ".join(line),
                  flush=True)
        print(f"{name}, {args.draws} draws: planted in the top {args.planted} (mean, min-max) and AUROC (mean ± std):")
        for key, values in rows.items():
            hits, auc = np.array([v[0] for v in values]), np.array([v[1] for v in values])
            print(f"  {key}: {hits.mean():.1f} ({hits.min()}-{hits.max()}); AUROC {auc.mean():.3f} ± {auc.std():.3f}")


if __name__ == "__main__":
    main()
