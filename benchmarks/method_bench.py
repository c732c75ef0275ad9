"""Every self-supervised method at an equal wall-clock budget on the same data, same backbone,
over several seeds: weighted kNN with the random-init and raw-pixel baselines, keep-like
filtering AUROC, and whether the label-free ranking of `compare-methods` picks the kNN winner.

    OMP_NUM_THREADS=1 python benchmarks/method_bench.py [--data DIR] --out DIR [--minutes 10] \
        [--sets cifar10 imagenette] [--seeds 0 1] [--methods moco-v3 simclr ...] \
        [--train-per-class 500] [--test-per-class 100] [--preset P] [--depth N]

Data per set (the first images of each class by sorted name, linked or copied under
OUT/data/<set>/{train,test}/<class>/): CIFAR-10 train -> test, and the Imagenette split
(splits/imagenette-train -> splits/imagenette-heldout, from scripts/make_splits.py). For each
set and seed, `filterkit.compare.compare_methods` pretrains every method on the train subset
for --minutes (same preset, data and seed for all) and measures weighted kNN (train subset ->
test subset) and the label-free signals (RankMe, alignment, uniformity) on the train subset.
This script adds, per model and per baseline:

- keep-like AUROC, as benchmarks/filter_quality.py measures it: for each class, 16 exemplars
  drawn (per seed) from its train images, every test image scored against them (top-m mean
  cosine after the filter's default normaliser), AUROC of this class vs the rest, mean over
  classes;
- the label-free exemplar AUROC of `compare-methods --exemplars` (the same 16 exemplars against
  the rest of the train subset, leave-one-out), mean over classes.

Then, among the self-supervised methods (supcon trains on the labels and is reported apart),
whether the method ranked first by RankMe, and by the label-free exemplar AUROC, is the kNN
winner, and the Spearman correlation of each label-free signal with kNN across methods.
Everything is written to OUT/method_bench.json (atomically, after each set and seed); a summary
is printed. The full benchmark takes hours: `--resume` continues an interrupted one, keeping the
(set, seed) results already written (their settings must match) and, inside the (set, seed) it
stopped in, the methods `compare-methods` had finished (its own record, OUT/<set>/seed<N>/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _data import add_data_argument, cifar10, data_root, imagenette_train, splits  # benchmarks/_data.py

from filterkit import Encoder
from filterkit.augment import eval_transform
from filterkit.compare import compare_methods, exemplar_auroc
from filterkit.encoder import build_backbone
from filterkit.evaluate import RAW_PIXEL_SIZE, features, labelled_images, raw_pixel_embed
from filterkit.filtering import DEFAULT_NORMALIZE, exemplar_scores
from filterkit.fsutil import atomic_write_text
from filterkit.methods import METHODS, method_class
from filterkit.normalize import Normalizer

EXEMPLARS = 16
# The arguments a (set, seed) result depends on: a --resume with other values is refused.
SETTINGS = ("minutes", "methods", "train_per_class", "test_per_class", "max_images", "preset", "depth", "batch_size",
            "device", "data_in_memory")


def _subset(source: Path, dest: Path, per_class: int) -> None:
    """dest/<class>/ with the first ``per_class`` images of each class of ``source``, hard-linked
    where the file system allows, else copied (not symlinked: pretrain reads only files inside
    the folder unless told otherwise)."""
    found = labelled_images(source)
    taken: dict[int, int] = {}
    for path, label in zip(found.paths, found.labels):
        if taken.get(int(label), 0) >= per_class:
            continue
        taken[int(label)] = taken.get(int(label), 0) + 1
        target = dest / found.classes[label] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def prepare(name: str, root: Path, out: Path, train_per_class: int, test_per_class: int) -> Path:
    if name == "cifar10":
        src_train, src_test = cifar10(root) / "train", cifar10(root) / "test"
    else:
        imagenette_train(root)  # the split is made from it: say so if it is missing
        src_train, src_test = splits(root) / "imagenette-train", splits(root) / "imagenette-heldout"
    dest = out / "data" / name
    if not dest.is_dir():  # made beside it, then renamed: an interrupted copy is never taken for the subset
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _subset(src_train, partial / "train", train_per_class)
        _subset(src_test, partial / "test", test_per_class)
        os.replace(partial, dest)
    return dest


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive.astype(int), scores))


def keep_like(train_vectors, train_labels, test_vectors, test_labels, draws) -> tuple[float, float]:
    """(keep-like AUROC on the test set, label-free exemplar AUROC on the train set), means over classes."""
    labelled, label_free = [], []
    for c, ex_idx in enumerate(draws):
        ex = train_vectors[ex_idx]
        normalizer = Normalizer.fit(np.concatenate([test_vectors, ex]), DEFAULT_NORMALIZE)
        scores = exemplar_scores(normalizer(test_vectors), normalizer(ex)).values
        labelled.append(auroc(scores, test_labels == c))
        rest = np.setdiff1d(np.arange(len(train_vectors)), ex_idx)
        label_free.append(exemplar_auroc(train_vectors[rest], ex))
    return float(np.mean(labelled)), float(np.mean(label_free))


def spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None
    value = spearmanr(a, b).statistic
    return None if not np.isfinite(value) else round(float(value), 3)


def one_run(set_name: str, set_dir: Path, seed: int, args) -> dict:
    out = args.out / set_name / f"seed{seed}"
    t0 = time.perf_counter()
    comparison = compare_methods(set_dir / "train", out, args.minutes, args.methods, labelled=set_dir,
                                 preset=args.preset, depth=args.depth, batch_size=args.batch_size, seed=seed,
                                 device=args.device, workers=args.workers, data_in_memory=args.data_in_memory,
                                 max_images=args.max_images, progress=False, resume=args.resume,
                                 say=lambda line: print(f"  {set_name} seed {seed}: {line}", flush=True))
    train, test = labelled_images(set_dir / "train"), labelled_images(set_dir / "test")
    rng = np.random.default_rng(seed)
    draws = [rng.choice(np.flatnonzero(train.labels == c), EXEMPLARS, replace=False)
             for c in range(len(train.classes))]

    def measure(transform, size, embed) -> tuple[float, float]:
        tr, tr_kept = features(train.paths, transform, size, embed, workers=args.workers)
        te, te_kept = features(test.paths, transform, size, embed, workers=args.workers)
        if len(tr_kept) != len(train.paths):
            raise SystemExit(f"{set_name}: some train images do not decode; the exemplar draws assume all do")
        return keep_like(tr, train.labels, te, test.labels[te_kept], draws)

    rows = {}
    for run in comparison.runs:
        row = {"supervised": run.supervised, "steps": run.steps, "total_steps": run.total_steps,
               "stopped_by": run.stopped_by, "wall_seconds": run.wall_seconds, "error": run.error}
        if run.signals is not None:
            encoder = Encoder.load(out / run.model, device=args.device)
            row.update(run.signals.to_dict())
            row["keep_like_auroc"], row["exemplar_auroc"] = measure(encoder.transform, encoder.config.img_size,
                                                                    encoder.embed_batch)
        rows[run.method] = row
    cfg = Encoder.load(out / next(r.model for r in comparison.runs if r.signals is not None), device="cpu").config
    torch.manual_seed(0)
    random_init = Encoder(build_backbone(cfg), cfg, device=args.device)
    baselines = {name: dict(values) for name, values in comparison.baselines.items()}
    baselines["random_init"]["keep_like_auroc"], baselines["random_init"]["exemplar_auroc"] = measure(
        random_init.transform, cfg.img_size, random_init.embed_batch)
    baselines["raw_pixels"]["keep_like_auroc"], baselines["raw_pixels"]["exemplar_auroc"] = measure(
        eval_transform(RAW_PIXEL_SIZE), RAW_PIXEL_SIZE, raw_pixel_embed)
    ssl = [m for m, r in rows.items() if not r["supervised"] and r.get("knn_top1") is not None]
    knn = [rows[m]["knn_top1"] for m in ssl]
    picks = {}
    if ssl:
        knn_winner = ssl[int(np.argmax(knn))]
        for signal in ("rankme", "exemplar_auroc"):
            values = [rows[m][signal] for m in ssl]
            picked = ssl[int(np.argmax(values))]
            picks[signal] = {"picked": picked, "is_knn_winner": picked == knn_winner or
                             rows[picked]["knn_top1"] == rows[knn_winner]["knn_top1"],
                             "spearman_with_knn": spearman(values, knn)}
        for signal in ("alignment", "uniformity"):  # lower is better
            values = [-rows[m][signal] for m in ssl]
            picks[signal] = {"spearman_with_knn": spearman(values, knn)}
        picks["knn_winner"] = knn_winner
    return {"set": set_name, "seed": seed, "bench": settings(args), "preset": comparison.preset,
            "minutes_per_method": args.minutes,
            "n_train": len(train.paths), "n_test": len(test.paths), "methods": rows, "baselines": baselines,
            "label_free": picks, "wall_minutes": round((time.perf_counter() - t0) / 60, 2)}


def settings(args) -> dict:
    return {key: getattr(args, key) for key in SETTINGS}


def finished_runs(path: Path, args, parser) -> list[dict]:
    """The (set, seed) results of an earlier run of this benchmark into the same --out, checked
    to have been run with the same settings."""
    if not path.is_file():
        return []
    results = json.loads(path.read_text(encoding="utf-8"))
    now = settings(args)
    for r in results:
        if "bench" not in r:
            parser.error(f"{path} was written by an older version of this script (no settings to compare): "
                         "choose a new --out")
        differ = [f"--{k.replace('_', '-')} (recorded {r['bench'].get(k)!r}, now {v!r})"
                  for k, v in now.items() if r["bench"].get(k) != v]
        if differ:
            parser.error(f"{path} holds {r['set']} seed {r['seed']} run with other settings: {'; '.join(differ)}. "
                         "Give the same ones to --resume, or choose a new --out")
    return results


def summarise(results: list[dict]) -> None:
    for set_name in dict.fromkeys(r["set"] for r in results):
        runs = [r for r in results if r["set"] == set_name]
        print(f"\n{set_name}: {runs[0]['n_train']} train / {runs[0]['n_test']} test images, {runs[0]['preset']}, "
              f"{runs[0]['minutes_per_method']:g} min per method, seeds {[r['seed'] for r in runs]}")
        print("| method | kNN top-1 | keep-like AUROC | RankMe | alignment | uniformity | label-free exemplar AUROC |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        names = list(dict.fromkeys(m for r in runs for m in r["methods"])) + ["random_init", "raw_pixels"]
        for name in names:
            cells = []
            for key in ("knn_top1", "keep_like_auroc", "rankme", "alignment", "uniformity", "exemplar_auroc"):
                values = [(r["methods"].get(name) or r["baselines"].get(name) or {}).get(key) for r in runs]
                values = [v for v in values if v is not None]
                cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-")
            label = name + (" (labels)" if any(r["methods"].get(name, {}).get("supervised") for r in runs) else "")
            print(f"| {label} | " + " | ".join(cells) + " |")
        for signal in ("rankme", "exemplar_auroc"):
            picks = [r["label_free"].get(signal) for r in runs if r["label_free"].get(signal)]
            hits = sum(p["is_knn_winner"] for p in picks)
            rhos = [p["spearman_with_knn"] for p in picks if p["spearman_with_knn"] is not None]
            rho = f", Spearman with kNN {np.mean(rhos):+.2f}" if rhos else ""
            print(f"label-free by {signal}: picked the kNN winner in {hits} of {len(picks)} seeds "
                  f"({', '.join(p['picked'] for p in picks)} vs {', '.join(r['label_free']['knn_winner'] for r in runs)})"
                  f"{rho}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--out", type=Path, required=True, help="new folder: data subsets, every model, the JSON")
    parser.add_argument("--sets", nargs="+", choices=["cifar10", "imagenette"], default=["cifar10", "imagenette"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per method and seed")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--max-images", type=int, default=1000, help="train images of the label-free signals")
    parser.add_argument("--preset", default=None, help="default: the device's default preset")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--data-in-memory", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run into the same --out with the same settings")
    args = parser.parse_args()
    if args.train_per_class < EXEMPLARS:
        parser.error(f"--train-per-class must be at least {EXEMPLARS} (the exemplars of each class)")
    if not args.resume and args.out.exists() and any(p.name != "data" for p in args.out.iterdir()):
        parser.error(f"{args.out} already holds results: pass --resume to continue that run (same settings), or "
                     "choose a new --out (its data/ folder alone may be reused)")
    if any(method_class(m).needs_labels for m in args.methods):
        print("note: supcon trains on the class folders' labels: reported, but not in the label-free check")
    root = data_root(args.data)
    path = args.out / "method_bench.json"
    results = finished_runs(path, args, parser) if args.resume else []
    for set_name in args.sets:
        set_dir = prepare(set_name, root, args.out, args.train_per_class, args.test_per_class)
        for seed in args.seeds:
            if any((r["set"], r["seed"]) == (set_name, seed) for r in results):
                print(f"  {set_name} seed {seed}: finished earlier, kept from {path}", flush=True)
                continue
            results.append(one_run(set_name, set_dir, seed, args))
            atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    summarise([r for r in results if r["set"] in args.sets and r["seed"] in args.seeds])
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:  # compare_methods' ComparisonInterrupted says what was kept
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}; the same command with --resume continues",
              file=sys.stderr)
        sys.exit(130)
