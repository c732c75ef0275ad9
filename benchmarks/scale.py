"""Dedup and search at 10^5..10^6 vectors in bounded memory, against exact and dense baselines.

    python benchmarks/scale.py [--sizes 100000 300000 1000000] [--dense-sizes 10000 30000]
        [--flat-sizes 10000 30000 100000] [--dim 384]

Vectors: synthetic clustered unit vectors (D = 384) with 1 % planted near-duplicate pairs
(cosine ~0.98-0.995). Each measurement runs in a fresh subprocess so its peak RSS is its own:
  dense  the N x N similarity matrix at once (what imagededup does), then pairs >= threshold;
  flat   filterkit's exact FAISS range search in query chunks (index kind "flat");
  ivf    filterkit's IVF range search (kind "ivf": nlist = 4 sqrt N, nprobe tuned for
         recall@10 >= 0.99), the default past index.EXACT_MAX;
reporting wall time, peak RSS and the recall of the planted pairs, and for search the
queries/s and recall@10 against exact search.

    python benchmarks/scale.py --sizes --flat-sizes --dense-sizes --ivf-small --verify-sizes 2000 10000 [--data DIR]

Verification (``--verify-sizes``): what verified dedup adds to a cosine dedup of the same
images, on N CIFAR-10 train photos (every 50000/N-th file, all classes) embedded by the shipped
model (``--model``) beforehand: the cosine range search at the model's threshold, then
``dedup.verified_groups`` (thumbnail views of every image, the dihedral candidate search,
pair scores, the calibration's synthetic copies), wall time and peak RSS of each. Verification
decodes every image once; its time per image grows with N (the rotation candidates' searches),
and its memory is mostly a ``verify.ViewTable`` (3.3 kB per image).
The normaliser is not in dedup (benchmarks/README.md: centring the cosine of the pair score
cost recall), so it adds nothing there.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _data import add_data_argument

THRESHOLD = 0.97


def make_vectors(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors; the last 1 % are noisy copies of random earlier ones."""
    rng = np.random.default_rng(seed)
    planted = n // 100
    base = n - planted
    centres = rng.standard_normal((max(10, int(np.sqrt(n))), d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, base, 100_000):  # in chunks: bounded temporaries
        m = min(100_000, base - start)
        x[start:start + m] = centres[rng.integers(0, len(centres), m)] + 0.6 * rng.standard_normal((m, d), dtype=np.float32)
    x[:base] /= np.linalg.norm(x[:base], axis=1, keepdims=True)
    src = rng.choice(base, planted, replace=False)
    noise = rng.uniform(0.005, 0.012, (planted, 1)).astype(np.float32)
    x[base:] = x[src] + noise * rng.standard_normal((planted, d), dtype=np.float32)
    x[base:] /= np.linalg.norm(x[base:], axis=1, keepdims=True)
    return x, src


def child(method: str, n: int, d: int) -> dict:
    import faiss

    from filterkit.index import build_index, range_pairs

    x, src = make_vectors(n, d)
    base = n - len(src)
    t0 = time.perf_counter()
    if method == "dense":
        sims = x @ x.T  # the N x N matrix
        rows, cols = np.nonzero(np.triu(sims >= THRESHOLD, 1))
        build_s = 0.0
    else:
        index = build_index(x, kind=method)
        build_s = time.perf_counter() - t0
        rows, cols, _ = range_pairs(x, THRESHOLD, index=index)
    dedup_s = time.perf_counter() - t0
    found = set(zip(rows.tolist(), cols.tolist()))
    planted = {(int(s), base + i) for i, s in enumerate(src)}
    out = {"method": method, "n": n, "dedup_s": round(dedup_s, 2), "build_s": round(build_s, 2),
           "pairs_found": len(found), "planted_recall": len(planted & found) / len(planted)}
    if method != "dense":
        q = x[np.random.default_rng(1).choice(n, 1000, replace=False)]
        t = time.perf_counter()
        _, approx = index.search(q, 10)
        out["search_qps"] = round(len(q) / (time.perf_counter() - t), 1)
        _, exact = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        out["recall_at_10"] = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))
        out["nprobe"] = getattr(index, "nprobe", None)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def verify_child(n: int, data: str | None, model: str) -> dict:
    import tempfile

    from _data import cifar10, data_root

    from filterkit import Encoder
    from filterkit.cache import EmbeddingCache
    from filterkit.dedup import model_threshold, verified_groups
    from filterkit.index import range_pairs
    from filterkit.pipeline import embed_paths

    files = sorted((cifar10(data_root(data)) / "train").rglob("*.jpg"))
    paths = files[::max(1, len(files) // n)][:n]
    encoder = Encoder.load(model)
    with tempfile.TemporaryDirectory() as tmp, EmbeddingCache(Path(tmp) / "cache.sqlite") as cache:
        found = embed_paths(paths, encoder, cache, progress=False)
    embedded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    rows, _, _ = range_pairs(found.vectors, model_threshold(encoder))
    cosine_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    groups, calibration = verified_groups(found.paths, found.hashes, found.vectors, encoder)
    verify_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"method": "verify", "n": len(found.paths), "cosine_dedup_s": round(cosine_s, 2),
            "cosine_pairs": len(rows), "verify_s": round(verify_s, 2),
            "verify_ms_per_image": round(1e3 * verify_s / len(found.paths), 3),
            "groups": len(groups), "threshold": round(calibration.threshold, 4),
            "rss_gb_after_embedding": round(embedded_rss, 2), "peak_rss_gb": round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--flat-sizes", type=int, nargs="*", default=[10_000, 30_000, 100_000])
    parser.add_argument("--dense-sizes", type=int, nargs="*", default=[10_000, 30_000])
    parser.add_argument("--ivf-small", type=int, nargs="*", default=[10_000, 30_000],
                        help="extra IVF sizes, beside the flat ones, for the crossover")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--verify-sizes", type=int, nargs="*", default=[],
                        help="CIFAR-10 photos to run verified dedup on (see above); none by default")
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "filterkit-vit-mini"))
    add_data_argument(parser)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, n = args.child[0], int(args.child[1])
        print(json.dumps(verify_child(n, args.data, args.model) if method == "verify" else child(method, n, args.dim)))
        return
    runs = [("dense", n) for n in args.dense_sizes] + [("flat", n) for n in args.flat_sizes]
    runs += [("ivf", n) for n in sorted(set(args.ivf_small) | set(args.sizes))]
    runs += [("verify", n) for n in args.verify_sizes]
    print(f"threshold {THRESHOLD}, D={args.dim}; one subprocess per row")
    for method, n in sorted(runs, key=lambda r: (r[1], r[0])):
        extra = ["--model", args.model] + (["--data", str(args.data)] if args.data else [])
        done = subprocess.run([sys.executable, __file__, "--child", method, str(n), "--dim", str(args.dim)] + extra,
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(json.dumps({"method": method, "n": n, "error": done.stderr.strip().splitlines()[-1:]}))
        else:
            print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
