"""Pretrain on CIFAR-10 train for a fixed CPU budget, then weighted kNN on CIFAR-10 test with
the random-init and raw-pixel baselines measured in the same run.

    python benchmarks/pretrain_quality.py [--data DIR] --out /tmp/fk-quality \
        --depth 4 --max-steps 2300 --data-in-memory

The budget above (the default preset vit-mini-conv-8-32 at 4 blocks, its CPU recipe: batch 128,
lr 2.5e-4, warmup 0.5 epoch, crops >= 0.2, 6 epochs = 2,346 steps; --max-steps 2300 was the
measured run) takes about an hour on a 2-core CPU with --data-in-memory (78.6 img/s on the AVX2
EPYC of 2026-12-02, checkpoints and monitor included; the per-image loader trains 1.38x slower
on CIFAR-10, benchmarks/pretrain_data.py). An online kNN monitor on 200 images per class prints
each epoch. Results go to stdout and OUT/quality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _data import add_data_argument, cifar10, data_root  # benchmarks/_data.py

from filterkit import Encoder
from filterkit.evaluate import evaluate
from filterkit.train import TrainOptions, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--cifar", type=Path, help="folder with train/ and test/ (default: DATA/cifar10)")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write (new, or --resume)")
    parser.add_argument("--preset", default="vit-mini-conv-8-32")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup-epochs", type=float, default=None)
    parser.add_argument("--depth", type=int, default=None, help="override the preset's number of blocks")
    parser.add_argument("--min-crop-scale", type=float, default=None)
    parser.add_argument("--queue", type=int, default=None, help="moco-v3's queue of negative keys (0: none)")
    parser.add_argument("--data-in-memory", action="store_true",
                        help="decode CIFAR once and augment whole batches (no per-image loader)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--monitor-per-class", type=int, default=200)
    args = parser.parse_args()
    args.cifar = args.cifar or cifar10(data_root(args.data))

    options = TrainOptions(preset=args.preset, epochs=args.epochs, max_steps=args.max_steps,
                           batch_size=args.batch_size, lr=args.lr, warmup_epochs=args.warmup_epochs,
                           data_in_memory=args.data_in_memory, depth=args.depth,
                           min_crop_scale=args.min_crop_scale, queue=args.queue, checkpoint_every=100)
    start = time.perf_counter()
    result = pretrain(args.cifar / "train", args.out, options, resume=args.resume, device=args.device,
                      workers=args.workers, knn_train=args.cifar / "train", knn_test=args.cifar / "test",
                      knn_max_per_class=args.monitor_per_class, progress=False)
    train_s = time.perf_counter() - start
    print(f"pretrained {result.steps} steps in {train_s / 60:.1f} min "
          f"({result.images_per_s:.1f} img/s), final loss {result.final_loss:.4f}")
    for epoch, acc in result.knn_top1:
        print(f"  online kNN after epoch {epoch}: {acc:.4f} ({args.monitor_per_class}/class subsets)")

    start = time.perf_counter()
    report = evaluate(Encoder.load(args.out, device=args.device), args.cifar / "train", args.cifar / "test")
    eval_s = time.perf_counter() - start
    print(f"\nweighted kNN (k=20, T=0.07), CIFAR-10 train {report.n_train} -> test {report.n_test} "
          f"({eval_s:.0f} s):")
    print(f"  MoCo v3 {args.preset}: {report.knn_top1:.4f}")
    for name, value in report.baselines.items():
        print(f"  {name:>20}: {value:.4f}")
    margin = report.knn_top1 - max(report.baselines.values())
    print(f"  margin over the best baseline: {100 * margin:+.1f} points")
    summary = {**report.to_dict(), "train_minutes": train_s / 60, "steps": result.steps,
               "online_knn": result.knn_top1, "preset": args.preset,
               "options": {k: getattr(args, k) for k in ("epochs", "max_steps", "batch_size", "lr",
                                                          "warmup_epochs", "data_in_memory", "depth",
                                                          "min_crop_scale")}}
    (args.out / "quality.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
