"""Search the CPU-hour pretraining recipe: many CIFAR-10 runs side by side, on a GPU (or on the CPU
at a fraction of the budget, --scale).

    python benchmarks/recipe_sweep.py [--data DIR] --out OUT [--parallel 8] [--only NAME,...]

Each candidate is the CPU recipe of benchmarks/pretrain_quality.py (vit-mini-8-32 at 4 blocks,
batch 128, lr 5e-4, 10 epochs = 3,900 steps: 66 min on the 2-core CPU of 2026-11-28, 88 min on
the slower one of 2026-12-01) with one
or two settings changed. Candidates that change the per-step cost (preset, depth, batch) get the number
of steps the same CPU hour affords, from images/s measured on that CPU (CPU_IMG_PER_S below).
On a GPU the candidates should take minutes each rather than an hour (not yet run there: split
the sweep into several runs with --only if time is short); the winner must
still be confirmed by a real CPU hour (pretrain_quality.py), since GPU arithmetic and timing
differ. On the CPU, compare candidates against the seed1 row: at --scale 0.2 the seed alone
moved the kNN by 1.8 points (benchmarks/README.md).

On a machine with a GPU, from the repository root (CIFAR-10 under DIR/cifar10 as README.md
describes; --runs keeps the candidates' model directories apart from the results):
    PYTHONPATH=$PWD python3 benchmarks/recipe_sweep.py --data DIR --out OUT --runs /tmp/runs

Every candidate reports the weighted kNN (docs/DESIGN.md protocol) of both its base backbone (what
`filterkit pretrain` exports) and its momentum backbone, and the run prints the random-init and
raw-pixel baselines measured in the same run. Results: OUT/sweep.jsonl (one line per finished
candidate, written as each ends) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _data import add_data_argument, cifar10, data_root  # benchmarks/_data.py

# Training images/s of `filterkit pretrain --preset vit-mini-8-32 --data-in-memory` on a 2-core
# AVX2 EPYC (median of steps 20-40 on one CIFAR class, 2026-12-01; (4, 128) is the mean of two
# probes, 92.8 and 96.4), keyed by (preset, depth, batch). Only the ratios matter: a faster CPU
# of the same kind scales them all alike.
# (4, 32): mean of two probes (83.7, 81.6) taken beside a (4, 128) one of 93.0.
# vit-nano-4-32: 0.795x vit-mini-8-32 at (4, 128) in alternated probes (77.3, 74.2 vs 95.1, 95.5;
# 2026-12-02). vit-mini-conv-8-32: 0.906x (86.4, 86.0 vs 94.9, 95.4; 2026-12-02).
CPU_IMG_PER_S = {("vit-mini-8-32", 4, 128): 94.6, ("vit-mini-8-32", 4, 64): 88.4, ("vit-mini-8-32", 4, 32): 82.7,
                 ("vit-mini-8-32", 3, 128): 118.1, ("vit-mini-8-32", 2, 128): 164.8,
                 ("vit-nano-4-32", 4, 128): round(0.795 * 94.6, 1),
                 ("vit-mini-conv-8-32", 4, 128): round(0.906 * 94.6, 1)}
BASE = dict(preset="vit-mini-8-32", depth=4, batch_size=128, lr=5e-4, temperature=0.2, momentum=0.99, min_crop_scale=0.2,
            weight_decay=0.1, warmup_epochs=0.5, predictor=True, seed=0)
BASE_STEPS = 3900  # 10 epochs of CIFAR-10 train at batch 128: the measured CPU hour (66 min, 2026-11-28)

# name -> changes to BASE, in the order they run (most informative first).
CANDIDATES: dict[str, dict] = {
    "base": {},
    "seed1": dict(seed=1),  # the noise floor of one comparison
    "T0.1": dict(temperature=0.1),
    "T0.3": dict(temperature=0.3),
    "lr1e-3": dict(lr=1e-3),
    "lr2.5e-4": dict(lr=2.5e-4),
    "m0.97": dict(momentum=0.97),
    "m0.996": dict(momentum=0.996),
    "crop0.08": dict(min_crop_scale=0.08),
    "crop0.35": dict(min_crop_scale=0.35),
    "batch64": dict(batch_size=64, lr=2.5e-4),
    "batch32": dict(batch_size=32, lr=1.25e-4),
    "batch64-lr5e-4": dict(batch_size=64, lr=5e-4),
    "depth2": dict(depth=2),
    "depth3": dict(depth=3),
    "nopred": dict(predictor=False),
    "wd0.05": dict(weight_decay=0.05),
    "T0.5": dict(temperature=0.5),
    "nano": dict(preset="vit-nano-4-32"),  # 64 tokens of width 96 instead of 16 of width 192
    "conv": dict(preset="vit-mini-conv-8-32", lr=2.5e-4),  # ResNet stem before the patches (the CPU-hour winner)
    "conv-lr5e-4": dict(preset="vit-mini-conv-8-32"),
    "lr2.5e-4-seed1": dict(lr=2.5e-4, seed=1),  # the patch ViT at the conv recipe's lr, second seed
}


def budget_steps(cfg: dict) -> int:
    """Steps the reference CPU hour affords this candidate, scaled by its measured CPU speed."""
    key = (cfg["preset"], cfg["depth"], cfg["batch_size"])
    ref = CPU_IMG_PER_S[(BASE["preset"], BASE["depth"], BASE["batch_size"])]
    ips = CPU_IMG_PER_S.get(key)
    if ips is None:
        raise SystemExit(f"no CPU images/s measured for {key[0]} at depth {key[1]}, batch {key[2]}: "
                         "add it to CPU_IMG_PER_S")
    return round(BASE_STEPS * (ips / ref) * (BASE["batch_size"] / cfg["batch_size"]))


def run_one(name: str, cifar: Path, runs: Path, device: str, precision: str, scale: float) -> dict:
    from filterkit import Encoder
    from filterkit.evaluate import evaluate
    from filterkit.train import TrainOptions, pretrain

    cfg = {**BASE, **CANDIDATES[name]}
    steps = max(1, round(budget_steps(cfg) * scale))
    epochs = -(-steps * cfg["batch_size"] // 50000)  # the schedules end at max_steps
    options = TrainOptions(preset=cfg["preset"], depth=cfg["depth"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                           temperature=cfg["temperature"], momentum=cfg["momentum"],
                           min_crop_scale=cfg["min_crop_scale"], weight_decay=cfg["weight_decay"],
                           warmup_epochs=cfg["warmup_epochs"], predictor=cfg["predictor"], seed=cfg["seed"],
                           proj_hidden=1024, pred_hidden=1024,  # the CPU recipe's heads (the GPU one has 4096)
                           epochs=epochs, max_steps=steps, data_in_memory=True, checkpoint_every=10**9)
    model_dir = runs / name
    start = time.perf_counter()
    result = pretrain(cifar / "train", model_dir, options, device=device, precision=precision, workers=2,
                      knn_train=cifar / "train", knn_test=cifar / "test", knn_max_per_class=200, progress=False)
    train_s = time.perf_counter() - start
    base = Encoder.load(model_dir, device=device)
    knn_base = evaluate(base, cifar / "train", cifar / "test", baselines=False, workers=2).knn_top1
    base.backbone.load_state_dict(result.model.momentum.backbone.state_dict())
    knn_momentum = evaluate(base, cifar / "train", cifar / "test", baselines=False, workers=2).knn_top1
    return dict(name=name, **cfg, steps=result.steps, train_s=round(train_s, 1), final_loss=result.final_loss,
                online_knn=result.knn_top1, knn_base=knn_base, knn_momentum=knn_momentum)


def baselines(cifar: Path, device: str, archs: set[tuple[str, int]]) -> dict:
    from filterkit.evaluate import baseline_knn_top1, labelled_images
    from filterkit.modeldir import ModelConfig

    train, test = labelled_images(cifar / "train"), labelled_images(cifar / "test")
    kw = dict(workers=min(4, os.cpu_count() or 1), k=20, temperature=0.07, batch_size=128, progress=False)
    found = {}
    for i, (preset, depth) in enumerate(sorted(archs)):
        cfg = ModelConfig.from_preset(preset, depth=depth)
        scores = baseline_knn_top1(cfg, train, test, device, raw_pixels=i == 0, **kw)  # raw pixels once
        found[f"random_init_{preset}_depth{depth}"] = scores.pop("random_init")
        found.update(scores)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--cifar", type=Path, help="folder with train/ and test/ (default: DATA/cifar10)")
    parser.add_argument("--out", type=Path, required=True, help="folder for sweep.jsonl and baselines.json")
    parser.add_argument("--runs", type=Path, default=None,
                        help="folder for the candidates' model directories and logs [default: --out]")
    parser.add_argument("--parallel", type=int, default=8, help="candidates trained at once")
    parser.add_argument("--only", default=None, help="comma-separated candidate names")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp32", help="fp32: closest to the CPU run it stands in for")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every budget (a dry run: 0.002)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per candidate (default: 2 on cuda, cores / --parallel on cpu)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    args.cifar = args.cifar or cifar10(data_root(args.data))
    args.runs = args.runs or args.out

    if args.one:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        row = run_one(args.one, args.cifar, args.runs, args.device, args.precision, args.scale)
        with open(args.out / "sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return

    names = args.only.split(",") if args.only else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; known: {list(CANDIDATES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    threads = args.threads or (2 if args.device.startswith("cuda") else max(1, (os.cpu_count() or 2) // args.parallel))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    pending, running = list(names), {}
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            log = open(args.runs / f"{name}.log", "w")
            cmd = [sys.executable, __file__, "--cifar", str(args.cifar), "--out", str(args.out), "--runs", str(args.runs),
                   "--one", name,
                   "--device", args.device, "--precision", args.precision, "--scale", str(args.scale)]
            running[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"[{time.perf_counter() - start:5.0f} s] started {name}", flush=True)
        time.sleep(2)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                print(f"[{time.perf_counter() - start:5.0f} s] {name} ended, rc {proc.returncode}", flush=True)
    print(f"all candidates ended in {time.perf_counter() - start:.0f} s", flush=True)
    rows = [json.loads(line) for line in open(args.out / "sweep.jsonl")] if (args.out / "sweep.jsonl").exists() else []
    base_line = baselines(args.cifar, args.device, {(r.get("preset", BASE["preset"]), r["depth"]) for r in rows}
                          or {(BASE["preset"], BASE["depth"])})
    (args.out / "baselines.json").write_text(json.dumps(base_line, indent=2))
    print("\nbaselines (same run):", {k: round(v, 4) for k, v in base_line.items()})
    print(f"{'candidate':<10} {'steps':>6} {'train s':>8} {'kNN base':>9} {'kNN momentum':>13}  online kNN by epoch")
    for r in sorted(rows, key=lambda r: -r["knn_base"]):
        online = " ".join(f"{a:.3f}" for _, a in r["online_knn"])
        print(f"{r['name']:<10} {r['steps']:>6} {r['train_s']:>8.0f} {r['knn_base']:>9.4f} {r['knn_momentum']:>13.4f}  {online}")


if __name__ == "__main__":
    main()
