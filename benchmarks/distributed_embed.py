"""The same photos embedded three ways, side by side: one process, Ray (local instance, an
actor pool), and `--shard I/N` runs merged with `cache merge`. Reports wall time of each and
whether the three caches hold the same vectors (max abs difference).

    python benchmarks/distributed_embed.py [--data DIR | --images FOLDER] \
        [--n 2000] [--shards 2] [--actors 2] [--model DIR]

On a 2-core machine expect no speedup: the point is equal results and working orchestration.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _data import add_data_argument, data_root, imagenette_train  # benchmarks/_data.py

from filterkit.images import discover_images

FK = [sys.executable, "-m", "filterkit"]


def vectors(cache: Path) -> dict[str, np.ndarray]:
    with sqlite3.connect(cache) as db:
        return {h: np.frombuffer(v, "<f4") for h, v in db.execute("SELECT sha256, vector FROM embeddings")}


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--images", type=Path, help="photo folder (default: DATA/imagenette/train)")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    args = parser.parse_args()
    args.images = args.images or imagenette_train(data_root(args.data))
    paths = discover_images(args.images)
    step = max(1, len(paths) // args.n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        folder.mkdir()
        for i, p in enumerate(paths[::step][:args.n]):
            os.link(p, folder / f"{i:05d}{p.suffix}") if p.stat().st_dev == folder.stat().st_dev \
                else (folder / f"{i:05d}{p.suffix}").write_bytes(p.read_bytes())
        env = dict(os.environ, FILTERKIT_CACHE=str(tmp / "default.sqlite"))
        model = ["--model", str(args.model)] if args.model else []
        base = [*FK, "embed", str(folder), *model, "-q"]
        single = timed([*base, "--cache", str(tmp / "single.sqlite")], env)
        ray_s = timed([*base, "--cache", str(tmp / "ray.sqlite"), "--ray", "local", "--ray-actors", str(args.actors)], env)
        shard_s = 0.0
        for i in range(args.shards):  # one after the other here; on N machines they run at once
            shard_s += timed([*base, "--cache", str(tmp / f"shard{i}.sqlite"), "--shard", f"{i}/{args.shards}"], env)
        merge_s = timed([*FK, "cache", "merge", *(str(tmp / f"shard{i}.sqlite") for i in range(args.shards)),
                         "--out", str(tmp / "merged.sqlite")], env)
        ref = vectors(tmp / "single.sqlite")
        print(f"{len(ref)} photos from {args.images}")
        print(f"  single process      {single:7.1f} s  ({len(ref) / single:.1f} img/s)")
        for name, cache, seconds in ((f"ray (local, {args.actors} actors)", "ray.sqlite", ray_s),
                                     (f"{args.shards} shards + merge", "merged.sqlite", shard_s + merge_s)):
            other = vectors(tmp / cache)
            same_keys = other.keys() == ref.keys()
            diff = max((float(np.abs(other[h] - ref[h]).max()) for h in ref if h in other), default=float("nan"))
            print(f"  {name:<19} {seconds:7.1f} s  ({len(ref) / seconds:.1f} img/s) = {seconds / single:.2f}x the "
                  f"single time; same contents: {same_keys}; max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
