"""Search and clustering quality per normaliser (none, center, whiten), with the baselines
measured in the same run.

    python benchmarks/collection_quality.py [--data DIR] [--model models/x] [--per-class 200 --draws 3]

A collection is ``--per-class`` images drawn at random from each class of Imagenette train
(224-px photos) and of CIFAR-10 test (32-px photos), a new draw per seed. The normaliser is
fitted on the collection itself, as ``search`` and ``cluster`` fit it. Reported per encoder and
normaliser, mean ± std over ``--draws`` draws:

- search precision@10: for every image as the query, the fraction of its 10 nearest other
  images (cosine) that share its class;
- clustering NMI: spherical k-means (filterkit's ``cluster_vectors``) with k = the number of
  classes, normalised mutual information with the classes (scikit-learn).

Encoders: the model given (else only the baselines), the same architecture at random init, and
raw 32x32 pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _data import add_data_argument, cifar10, data_root, imagenette_train  # benchmarks/_data.py
from _encoders import compared_encoders, embed_paths  # benchmarks/_encoders.py

from filterkit.cluster import cluster_vectors
from filterkit.evaluate import labelled_images
from filterkit.normalize import Normalizer

K = 10


def precision_at_k(vectors: np.ndarray, labels: np.ndarray, k: int = K) -> float:
    sims = vectors @ vectors.T  # a few thousand rows: small
    np.fill_diagonal(sims, -np.inf)  # the query itself is not a neighbour
    nearest = np.argpartition(-sims, k, axis=1)[:, :k]
    return float((labels[nearest] == labels[:, None]).mean())


def nmi(vectors: np.ndarray, labels: np.ndarray, seed: int) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    clustering = cluster_vectors(vectors, int(labels.max()) + 1, seed=seed)
    return float(normalized_mutual_info_score(labels, clustering.assignment))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--model", type=Path, help="trained model directory (else only the baselines)")
    parser.add_argument("--preset", default="vit-tiny-16-224", help="architecture of the random-init baseline without --model")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--normalize", nargs="+", default=["none", "center", "whiten"])
    parser.add_argument("--sets", nargs="+", default=["imagenette", "cifar10"])
    args = parser.parse_args()
    root = data_root(args.data)
    folders = {"imagenette": lambda: imagenette_train(root), "cifar10": lambda: cifar10(root) / "test"}

    encoders = compared_encoders(args.model, args.preset)

    for name in args.sets:
        data = labelled_images(folders[name]())
        draws = []
        for seed in range(args.draws):
            rng = np.random.default_rng(seed)
            draws.append(np.sort(np.concatenate([rng.choice(np.flatnonzero(data.labels == c), args.per_class,
                                                            replace=False) for c in range(len(data.classes))])))
        needed = np.unique(np.concatenate(draws))
        print(f"\n{name}: {len(data.classes)} classes, {args.per_class} random images per class per draw "
              f"({args.per_class * len(data.classes)} per collection), {args.draws} draws; "
              f"precision@{K} of search and k-means NMI (k = {len(data.classes)}), mean ± std over draws")
        print(f"  {'encoder':12s} {'normalise':9s} {'precision@10':>16s} {'NMI':>16s}")
        paths = [data.paths[i] for i in needed]
        for enc_name, enc in encoders:
            vecs = embed_paths(enc, paths, args.workers)
            row_of = {int(i): r for r, i in enumerate(needed)}
            for kind in args.normalize:
                if enc is None and kind == "whiten":
                    continue  # 3,072-d raw pixels: minutes of eigendecomposition per draw
                prec, mi = [], []
                for seed, draw in enumerate(draws):
                    x = vecs[[row_of[int(i)] for i in draw]]
                    x = Normalizer.fit(x, kind)(x)
                    labels = data.labels[draw]
                    prec.append(precision_at_k(x, labels))
                    mi.append(nmi(x, labels, seed))
                print(f"  {enc_name:12s} {kind:9s} {np.mean(prec):9.3f} ± {np.std(prec):.3f} "
                      f"{np.mean(mi):9.3f} ± {np.std(mi):.3f}", flush=True)


if __name__ == "__main__":
    main()
