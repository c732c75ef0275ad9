"""Throughput of the whole embed pipeline against forward-only, side by side in one run.

    python benchmarks/embed_speed.py [--data DIR]          # photos from DIR/imagenette/train
    python benchmarks/embed_speed.py --model M --precision fp32 bf16   # both, alternated per round

For each image set the script times, alternating, over ``--rounds`` rounds:
  forward   the encoder's forward pass on already-decoded tensors (same model, same batch);
  pipeline  ``embed_paths`` on a fresh cache: hash + decode (JPEG draft mode) + resize +
            forward + cache writes, decode in DataLoader workers;
  no-draft  the same pipeline with full-size JPEG decoding;
and reports images/s and the ratios pipeline/forward, and the forward's FLOPs per image against
the speed of a large square fp32 matmul timed in the same rounds (the forward's ceiling here). Sets: (a) Imagenette photos
(224 px JPEGs), (b) camera-size JPEGs (4000x3000, made by upscaling Imagenette photos and
saving at quality 90). Finally it times a second ``embed`` of an already-cached folder
against the first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _data import add_data_argument, data_root, imagenette_train  # benchmarks/_data.py
from PIL import Image

from filterkit import EmbeddingCache, Encoder
from filterkit.devices import PRECISIONS, autocast_dtype
from filterkit.images import discover_images, load_image
from filterkit.loader import default_workers
from filterkit.pipeline import embed_paths


def pick(paths: list[Path], n: int) -> list[Path]:
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def time_forward(encoder: Encoder, pixels: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        encoder.embed_batch(pixels[i:i + batch_size])
    return len(pixels) / (time.perf_counter() - start)


def time_pipeline(encoder: Encoder, paths: list[Path], batch_size: int, workers: int, draft: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp, EmbeddingCache(Path(tmp) / "c.sqlite") as cache:
        start = time.perf_counter()
        result = embed_paths(paths, encoder, cache, batch_size=batch_size, workers=workers,
                             progress=False, draft=draft)
        elapsed = time.perf_counter() - start
    assert result.n_embedded == len(paths), result.skipped[:3]
    return len(paths) / elapsed


def forward_flops(encoder: Encoder) -> int:
    """Floating-point operations of one image's forward pass (torch's FLOP counter: matmuls,
    convolutions and attention; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = encoder.config.img_size
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder.backbone(torch.zeros(1, 3, size, size, device=encoder.device))
    return counter.get_total_flops()


def time_matmul(side: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a square fp32 matmul: about the best this CPU does on dense work."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return reps * 2 * side ** 3 / (time.perf_counter() - start) / 1e9


def measure(name: str, encoder: Encoder, paths: list[Path], args) -> None:
    size = encoder.config.img_size
    # Forward-only input: the very tensors the pipeline would make, decoded up front.
    pixels = torch.stack([encoder.transform(load_image(p, size)) for p in paths])
    dtypes = {p: autocast_dtype(encoder.device, p) for p in args.precision}
    rates: dict[str, list[float]] = {}
    matmul: list[float] = []
    for _ in range(args.rounds):
        matmul.append(time_matmul())
        for precision, dtype in dtypes.items():  # alternated within each round
            encoder.amp_dtype = dtype
            encoder.embed_batch(pixels[: args.batch_size])  # warm-up
            tag = "" if len(dtypes) == 1 else f" {precision}"
            for key, rate in (("forward", lambda: time_forward(encoder, pixels, args.batch_size)),
                              ("pipeline", lambda: time_pipeline(encoder, paths, args.batch_size, args.workers, True)),
                              ("no-draft", lambda: time_pipeline(encoder, paths, args.batch_size, args.workers, False))):
                rates.setdefault(key + tag, []).append(rate())
    med = {k: statistics.median(v) for k, v in rates.items()}
    named = ", ".join(f"{p} = {'fp32' if d is None else str(d).removeprefix('torch.')}" for p, d in dtypes.items())
    print(f"\n[{name}] {len(paths)} images, batch {args.batch_size}, workers {args.workers}, precision {named}, "
          f"{args.rounds} alternating rounds (median img/s; all rounds in brackets)")
    for k, v in rates.items():
        print(f"  {k:14s} {med[k]:7.1f} img/s  [{', '.join(f'{x:.1f}' for x in v)}]")
    for precision in dtypes:
        tag = "" if len(dtypes) == 1 else f" {precision}"
        print(f"  pipeline/forward{tag}          = {med['pipeline' + tag] / med['forward' + tag]:.2f}")
        print(f"  pipeline/forward no draft{tag} = {med['no-draft' + tag] / med['forward' + tag]:.2f}")
    if len(dtypes) > 1:
        first, *others = dtypes
        for other in others:
            for key in ("forward", "pipeline"):
                print(f"  {key} {other}/{first} = {med[f'{key} {other}'] / med[f'{key} {first}']:.2f}")
    # The forward's ceiling on this CPU: its FLOPs at the speed of a large square matmul.
    first_tag = "" if len(dtypes) == 1 else f" {next(iter(dtypes))}"
    flops, mm, fwd = forward_flops(encoder), statistics.median(matmul), med["forward" + first_tag]
    print(f"  forward{first_tag}: {flops / 1e9:.3f} GFLOP per image, {fwd * flops / 1e9:.1f} GFLOP/s; a 2048^2 "
          f"fp32 matmul in the same rounds {mm:.1f} GFLOP/s [{', '.join(f'{x:.1f}' for x in matmul)}] -> "
          f"at that speed at most {mm * 1e9 / flops:.0f} img/s (forward at {fwd * flops / 1e9 / mm:.0%} of it)")


def make_camera_jpegs(sources: list[Path], folder: Path) -> list[Path]:
    out = []
    for i, src in enumerate(sources):
        target = folder / f"camera_{i:03d}.jpg"
        Image.open(src).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(target, quality=90)
        out.append(target)
    return out


def second_run_ratio(encoder: Encoder, paths: list[Path], args) -> None:
    with tempfile.TemporaryDirectory() as tmp, EmbeddingCache(Path(tmp) / "c.sqlite") as cache:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            embed_paths(paths, encoder, cache, batch_size=args.batch_size, workers=args.workers, progress=False)
            times.append(time.perf_counter() - start)
    print(f"\n[re-embed] {len(paths)} images: first {times[0]:.2f} s, second {times[1]:.3f} s "
          f"= {100 * times[1] / times[0]:.1f} % of the first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--imagenette", type=Path, help="photo folder (default: DATA/imagenette/train)")
    parser.add_argument("--preset", default="vit-tiny-16-224")
    parser.add_argument("--model", type=Path, help="model directory (default: random-init --preset)")
    parser.add_argument("--n", type=int, default=512, help="Imagenette images to embed")
    parser.add_argument("--camera-n", type=int, default=64, help="camera-size JPEGs to make and embed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS,
                        help="forward precision(s); several are timed alternately in each round, e.g. fp32 bf16")
    args = parser.parse_args()
    args.imagenette = args.imagenette or imagenette_train(data_root(args.data))

    encoder = Encoder.load(args.model) if args.model else Encoder.random(args.preset)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.model or f'preset {args.preset} (random init)'}")
    photos = pick(discover_images(args.imagenette), args.n)
    measure("a: Imagenette 224-px JPEGs", encoder, photos, args)
    if args.camera_n == 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        camera = make_camera_jpegs(pick(photos, args.camera_n), Path(tmp))
        measure("b: camera-size 4000x3000 JPEGs", encoder, camera, args)
    second_run_ratio(encoder, photos, args)


if __name__ == "__main__":
    main()
