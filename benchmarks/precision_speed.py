"""CPU inference speed of fp32 against bf16 autocast, alternated in one run, and the cosine
between their embeddings (the measurement behind `--precision auto` = fp32 on CPU).

    python benchmarks/precision_speed.py [--preset vit-tiny-16-224 --batch-size 32 --rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from filterkit import Encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-tiny-16-224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    fp32 = Encoder.random(args.preset)
    bf16 = Encoder(fp32.backbone, fp32.config, device="cpu", precision="bf16")
    size = fp32.config.img_size
    x = torch.randn(args.batch_size, 3, size, size)
    fp32.embed(x), bf16.embed(x)  # warm-up
    rates = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name, enc in (("fp32", fp32), ("bf16", bf16)):
            start = time.perf_counter()
            enc.embed(x)
            rates[name].append(args.batch_size / (time.perf_counter() - start))
    cosine = np.sum(fp32.embed(x) * bf16.embed(x), axis=1).min()
    print(f"{args.preset}, batch {args.batch_size}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    for name, values in rates.items():
        print(f"  {name}: {statistics.median(values):.1f} img/s  [{', '.join(f'{v:.1f}' for v in values)}]")
    print(f"  bf16/fp32 = {statistics.median(rates['bf16']) / statistics.median(rates['fp32']):.2f}; "
          f"min cosine bf16 vs fp32 {cosine:.5f}")


if __name__ == "__main__":
    main()
