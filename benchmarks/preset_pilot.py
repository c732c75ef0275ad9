"""Quality per CPU-second of candidate presets: each is pretrained with MoCo v3 for the same
wall-clock budget on the same folder, then evaluated with the weighted kNN of docs/DESIGN.md on
Imagenette (held-out split) and CIFAR-10 test, beside the random-init and raw-pixel baselines
of the same run. Used to choose the default encoder's preset.

    python benchmarks/preset_pilot.py [--data DIR] --minutes 5 --out /tmp/fk-pilot

(DIR/splits comes from scripts/make_splits.py; DIR/cifar10 is laid out as README.md describes.)
The number of steps per candidate is its budget x its measured training speed (a few synthetic
steps timed first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _data import add_data_argument, cifar10, data_root, splits  # benchmarks/_data.py

from filterkit.encoder import Encoder, build_backbone
from filterkit.evaluate import evaluate
from filterkit.moco import MoCo
from filterkit.modeldir import ModelConfig
from filterkit.train import TrainOptions, pretrain


def train_speed(preset: str, batch: int, hidden: int) -> float:
    cfg = ModelConfig.from_preset(preset)
    model = MoCo(build_backbone(cfg), cfg.embed_dim, 256, hidden, hidden)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        loss, _ = model(x, x.flip(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.momentum_update(0.99)
        times.append(time.perf_counter() - t)
    return batch / min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--splits", type=Path, help="default: DATA/splits")
    parser.add_argument("--cifar", type=Path, help="default: DATA/cifar10")
    parser.add_argument("--presets", nargs="+", default=["vit-mini-8-32", "vit-mini-8-64", "vit-mini-16-112"])
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-per-class", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.splits = args.splits or splits(data_root(args.data))
    args.cifar = args.cifar or cifar10(data_root(args.data))
    results = []
    for preset in args.presets:
        speed = train_speed(preset, args.batch_size, 1024)
        steps = max(10, int(args.minutes * 60 * speed * 0.8 / args.batch_size))  # 0.8: loader overhead
        options = TrainOptions(preset=preset, batch_size=args.batch_size, lr=args.lr, epochs=100,
                               max_steps=steps, warmup_epochs=0.1 * steps * args.batch_size / 57570,
                               min_crop_scale=0.2, checkpoint_every=10**9)
        t0 = time.perf_counter()
        result = pretrain(args.splits / "pretrain", args.out / preset, options, progress=False)
        minutes = (time.perf_counter() - t0) / 60
        encoder = Encoder.load(args.out / preset, device="cpu")
        row = {"preset": preset, "synthetic_img_s": round(speed, 1), "steps": steps,
               "train_minutes": round(minutes, 2), "train_img_s": round(result.images_per_s, 1)}
        for name, train, test in [("imagenette", args.splits / "imagenette-train", args.splits / "imagenette-heldout"),
                                  ("cifar10", args.cifar / "train", args.cifar / "test")]:
            report = evaluate(encoder, train, test, max_per_class=args.eval_per_class)
            row[name] = {"knn_top1": report.knn_top1, **{k: v for k, v in report.baselines.items()}}
        print(json.dumps(row), flush=True)
        results.append(row)
    (args.out / "pilot.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
