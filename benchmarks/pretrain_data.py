"""Training images/s with per-image decoding in DataLoader workers (the default) against
`--data-in-memory` (decoded once, whole batches augmented on the device), alternated in one
run on the same photos, model, batch and device.

    python benchmarks/pretrain_data.py [--data DIR | --images FOLDER] \\
        [--n 2048 --preset vit-mini-8-32 --batch-size 128 --steps 20 --rounds 3]

images/s counts the training loop only (the one-off decode of the in-memory store is timed
and printed apart); both sides write the same final checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _data import add_data_argument, data_root, imagenette_train  # benchmarks/_data.py

from filterkit.images import discover_images
from filterkit.train import TrainOptions, pretrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(ap)
    ap.add_argument("--images", type=Path, help="photo folder (default: DATA/imagenette/train)")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--preset", default="vit-mini-8-32")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    args.images = args.images or imagenette_train(data_root(args.data))

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for i, path in enumerate(discover_images(args.images)[: args.n]):
            (data / f"{i:06d}{path.suffix}").symlink_to(path.resolve())
        rates: dict[str, list[float]] = {"per-image loader": [], "in memory": []}
        walls: dict[str, list[float]] = {name: [] for name in rates}
        for r in range(args.rounds):
            for name in rates:
                opts = TrainOptions(preset=args.preset, batch_size=args.batch_size, max_steps=args.steps,
                                    epochs=1000, data_in_memory=name == "in memory")
                t0 = time.perf_counter()
                result = pretrain(data, Path(tmp) / f"{name}-{r}", opts, device=args.device,
                                  workers=args.workers, progress=False, follow_symlinks=True)
                walls[name].append(time.perf_counter() - t0)
                rates[name].append(result.images_per_s)
                print(f"round {r} {name:16s} {result.images_per_s:7.1f} img/s  (whole call {walls[name][-1]:.1f} s)",
                      flush=True)
        base, mem = (statistics.median(v) for v in rates.values())
        print(f"\n{args.preset}, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, {args.n} photos")
        print(f"per-image loader {base:.1f} img/s; in memory {mem:.1f} img/s -> {mem / base:.2f}x "
              f"(median of rounds; whole calls incl. decode {statistics.median(walls['per-image loader']):.1f} s "
              f"vs {statistics.median(walls['in memory']):.1f} s)")


if __name__ == "__main__":
    main()
