"""Near-duplicate detection on planted copies: filterkit's verified dedup (``--threshold auto``,
calibrated on the collection itself) against embedding-only cosine, pHash and raw pixels.

    pip install imagehash    # benchmark-only (the `bench` extra)
    python benchmarks/dedup_quality.py [--data DIR] [--model models/filterkit-vit-mini] \
        [--collections cifar10 imagenette] [--seeds 0 1 2]

Per seed and collection (CIFAR-10 train at 32 px, Imagenette train at 224 px): ``--originals``
images drawn at random get one planted copy each (dedup.synthetic_copy: crop 70-95 %, resize
50-100 %, maybe a flip, colour shift, JPEG q30-90, and one time in four a 90/180/270-degree
rotation); each original also brings its look-alike, the nearest other image of its class by
the model's embedding (a hard negative); ``--distractors`` more images drawn at random complete
the collection. Everything is written as PNG to a temporary folder (the copies keep their JPEG
artefacts). Pair precision and recall of the planted pairs, per method:

- embedding cosine at the model directory's threshold (calibrated on other photos);
- embedding cosine, pHash (64-bit, imagehash), per-image-normalised raw pixels (RGB 32x32, zero
  mean, unit norm) at their oracle thresholds: the best recall at precision >= 0.90 on the test
  pairs themselves (no method could pick these without labels);
- ``find_duplicates(folder, encoder, threshold="auto")``: links inside its groups, with the
  precision and recall it states beside the true ones.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _data import add_data_argument, cifar10, data_root, imagenette_train  # benchmarks/_data.py
from PIL import Image

from filterkit import Encoder
from filterkit.dedup import find_duplicates, model_threshold, synthetic_copy
from filterkit.images import discover_images, load_image
from filterkit.index import range_pairs


def phash_bits(images) -> np.ndarray:
    import imagehash

    return np.array([imagehash.phash(im).hash.flatten() for im in images], dtype=bool)


def raw_pixels(images) -> np.ndarray:
    x = np.stack([np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC), np.float32).ravel()
                  for im in images])
    x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def recall_at_precision(scores: np.ndarray, truth: np.ndarray, n_planted: int, precision: float = 0.90) -> float:
    """The best recall of a cut 'score >= t' whose precision reaches ``precision`` (oracle)."""
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(truth[order])
    ok = np.flatnonzero(hits / np.arange(1, len(order) + 1) >= precision)
    return float(hits[ok[-1]] / n_planted) if len(ok) else 0.0


PROBABLE_COPY = 0.80  # shifted RGB correlation at which a would-be look-alike is taken for a real copy


def shifted_correlation(a: Image.Image, b: Image.Image, shift: int = 3) -> float:
    """The largest correlation of ``a``'s central 24x24 RGB pixels (at 32x32) with ``b``'s under
    the 8 flips/rotations and translations of up to ``shift`` pixels: an independent check (not
    filterkit's thumbnails) that keeps real copies out of the hard negatives. CIFAR-10 train
    holds real near-duplicates (the same photo recropped or recoloured), and the nearest
    same-class image by embedding is often one of them."""
    x = np.asarray(a.convert("RGB").resize((32, 32)), np.float32)[4:28, 4:28].ravel()
    x = (x - x.mean()) / (np.linalg.norm(x - x.mean()) + 1e-6)
    y = np.asarray(b.convert("RGB").resize((32, 32)), np.float32)
    best = -1.0
    for view in (np.rot90(f, k) for f in (y, y[:, ::-1]) for k in range(4)):
        for dy in range(-shift, shift + 1):
            for dx in range(-shift, shift + 1):
                w = view[4 + dy:28 + dy, 4 + dx:28 + dx].ravel()
                w = w - w.mean()
                best = max(best, float(x @ w) / (float(np.linalg.norm(w)) + 1e-6))
    return best


def group_pairs(result, index_of) -> set:
    pairs = set()
    for g in result.groups:
        members = sorted(index_of[Path(p).name] for p in [g.keep] + [d.path for d in g.duplicates])
        pairs |= {(a, b) for k, a in enumerate(members) for b in members[k + 1:]}
    return pairs


def build(paths, labels, encoder, rng, n_orig, n_distract):
    """originals, their look-alikes and distractors (as images) and the planted copies."""
    pool = rng.choice(len(paths), min(len(paths), 3000 + n_orig + n_distract), replace=False)
    orig, rest = pool[:n_orig], pool[n_orig:]
    rest_vectors = encoder.embed([load_image(paths[i]) for i in rest[:3000]])
    orig_images = [load_image(paths[i]) for i in orig]
    orig_vectors = encoder.embed(orig_images)
    used, look, real_copies = set(), [], set()
    for k, o in enumerate(orig):
        for j in np.argsort(-(rest_vectors @ orig_vectors[k])):
            c = int(rest[j])
            if labels[c] == labels[o] and c not in used:
                if shifted_correlation(orig_images[k], load_image(paths[c])) >= PROBABLE_COPY:
                    real_copies.add(c)  # a real copy of the original: neither look-alike nor distractor
                    continue
                used.add(c)
                look.append(c)
                break
    others = [int(c) for c in rest if int(c) not in used and int(c) not in real_copies][:n_distract]
    images = orig_images + [load_image(paths[i]) for i in look + others]
    copies = [synthetic_copy(im, rng) for im in orig_images]
    return images, copies, len(real_copies)


def evaluate(name, paths, labels, encoder, seed, args):
    rng = np.random.default_rng(seed)
    images, copies, skipped = build(paths, labels, encoder, rng, args.originals, args.distractors)
    everything = images + copies
    n, m = len(images), len(copies)
    planted = {(k, n + k) for k in range(m)}
    i, j = np.triu_indices(len(everything), k=1)
    truth = np.fromiter(((a, b) in planted for a, b in zip(i.tolist(), j.tolist())), bool, len(i))
    row = {"probable real copies left out": skipped}
    vectors = encoder.embed(everything)
    t = model_threshold(encoder)
    a, b, _ = range_pairs(vectors, t)
    found = set(zip(a.tolist(), b.tolist()))
    row["cosine@model"] = (len(found & planted) / max(len(found), 1), len(found & planted) / m)
    # Gram matrices, then the pairs: indexing the vectors by every pair first took ~10 GB per
    # 3,072-d raw-pixel copy at 1,300 images
    row["cosine oracle"] = recall_at_precision((vectors @ vectors.T)[i, j], truth, m)
    bits = phash_bits(everything)
    row["pHash oracle"] = recall_at_precision(-(bits[i] != bits[j]).sum(axis=1).astype(float), truth, m)
    px = raw_pixels(everything)
    row["raw pixels oracle"] = recall_at_precision((px @ px.T)[i, j], truth, m)
    folder = Path(tempfile.mkdtemp(prefix=f"fk-dedup-{name}-"))
    try:
        names = [f"img{k:05d}.png" for k in range(len(everything))]
        for im, fname in zip(everything, names):
            im.save(folder / fname)
        index_of = {fname: k for k, fname in enumerate(names)}
        start = time.perf_counter()
        result = find_duplicates(folder, encoder=encoder, threshold="auto", seed=seed,
                                 target_precision=args.target_precision)
        seconds = time.perf_counter() - start
        links = group_pairs(result, index_of)
        hits = len(links & planted)
        if args.sheet is not None:
            false_links_sheet(everything, sorted(links - planted), args.sheet / f"{name}-seed{seed}-false-links.png")
        c = result.calibration
        row["verified auto"] = (hits / max(len(links), 1), hits / m, c.precision, c.recall, c.threshold,
                                len(result.groups), seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return row, len(everything)


def false_links_sheet(images, pairs, out: Path, limit: int = 16) -> None:
    """A contact sheet of the links the benchmark counts as false (not planted), side by side at
    64 px, for a reader to judge: unplanted real copies show up here."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs = pairs[:limit]
    sheet = Image.new("RGB", (4 * 140, max(1, (len(pairs) + 3) // 4) * 70), "white")
    for k, (a, b) in enumerate(pairs):
        x, y = (k % 4) * 140, (k // 4) * 70
        sheet.paste(images[a].convert("RGB").resize((64, 64)), (x, y))
        sheet.paste(images[b].convert("RGB").resize((64, 64)), (x + 66, y))
    sheet.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--model", type=Path, default=Path("models/filterkit-vit-mini"))
    parser.add_argument("--collections", nargs="+", default=["cifar10", "imagenette"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--originals", type=int, default=100)
    parser.add_argument("--distractors", type=int, default=900)
    parser.add_argument("--target-precision", type=float, default=0.99)
    parser.add_argument("--sheet", type=Path, default=None, help="folder for contact sheets of the false links")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    encoder = Encoder.load(args.model)
    root = data_root(args.data)
    for name in args.collections:
        folder = cifar10(root) / "train" if name == "cifar10" else imagenette_train(root)
        paths = discover_images(folder)
        labels = [p.parent.name for p in paths]
        rows = []
        for seed in args.seeds:
            row, total = evaluate(name, paths, labels, encoder, seed, args)
            rows.append(row)
            v = row["verified auto"]
            print(f"{name} seed {seed}: {total} images ({args.originals} planted pairs); "
                  + "; ".join(f"{k} {v_}" if isinstance(v_, int) else f"{k} {v_:.3f}" if not isinstance(v_, tuple) else f"{k} P {v_[0]:.3f} R {v_[1]:.3f}"
                              for k, v_ in row.items() if k != "verified auto")
                  + f"; verified auto: P {v[0]:.3f} R {v[1]:.3f} (stated P {v[2]:.3f} R {v[3]:.3f}, "
                    f"score >= {v[4]:.4f}, {v[5]} groups, {v[6]:.1f} s)", flush=True)

        def spread(values):
            return f"{np.mean(values):.3f} ± {np.std(values):.3f}"
        print(f"{name}, {len(rows)} seeds (mean ± std):")
        print(f"  cosine at the model dir's threshold: precision {spread([r['cosine@model'][0] for r in rows])}, "
              f"recall {spread([r['cosine@model'][1] for r in rows])}")
        for key in ("cosine oracle", "pHash oracle", "raw pixels oracle"):
            print(f"  {key}: recall at precision 0.90 {spread([r[key] for r in rows])}")
        v = [r["verified auto"] for r in rows]
        print(f"  verified, --threshold auto: precision {spread([x[0] for x in v])}, recall "
              f"{spread([x[1] for x in v])}; stated precision {spread([x[2] for x in v])}, stated recall "
              f"{spread([x[3] for x in v])}; {np.mean([x[6] for x in v]):.1f} s per run")


if __name__ == "__main__":
    main()
