"""Lay out the default model's training and evaluation folders from the data root (as links).

    python scripts/make_splits.py [--data DIR] [--out DIR/splits]

DIR is --data, else $FILTERKIT_DATA, else ~/.cache/filterkit-data, and holds imagenette/train/
and cifar10/train/ as README.md describes ("Data for benchmarks and the default model").

Writes (hard links where the filesystem allows, else copies; never symlinks, which filterkit
does not follow out of a folder unless asked):
  imagenette-train/<wnid>/    the first 80 % of each class's photos, sorted by file name
  imagenette-heldout/<wnid>/  the last 20 % (never seen by training; evaluation only)
  pretrain/imagenette[-r]/<wnid>/ + pretrain/cifar10/<class>/   the pretraining folder: the
                              Imagenette training split (--imagenette-repeat times, so that the
                              224-px photos are not drowned by CIFAR's 50,000) plus CIFAR-10 train
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

from filterkit.images import discover_images

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _data import add_data_argument, data_root, imagenette_train, need  # benchmarks/_data.py: the data root

HELD_OUT = 0.2


def link_all(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = dest / f.name
        if link.exists() or link.is_symlink():
            continue
        try:
            os.link(f.resolve(), link)
        except OSError:  # another filesystem
            shutil.copy2(f, link)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="default: DATA/splits")
    parser.add_argument("--no-cifar", action="store_true", help="pretrain on the Imagenette split only")
    parser.add_argument("--imagenette-repeat", type=int, default=1,
                        help="link the Imagenette split this many times into pretrain/ (oversampling)")
    args = parser.parse_args()
    root = data_root(args.data)
    args.out = args.out or root / "splits"
    imagenette = imagenette_train(root)
    if not args.no_cifar:
        need(root / "cifar10" / "train", "CIFAR-10 train as cifar10/train/<class>/*.jpg (or pass --no-cifar)")
    counts = {}
    for class_dir in sorted(p for p in imagenette.iterdir() if p.is_dir()):
        files = discover_images(class_dir)
        n_held = math.ceil(HELD_OUT * len(files))
        train, held = files[:-n_held], files[-n_held:]
        link_all(train, args.out / "imagenette-train" / class_dir.name)
        link_all(held, args.out / "imagenette-heldout" / class_dir.name)
        for r in range(args.imagenette_repeat):
            link_all(train, args.out / "pretrain" / f"imagenette{'-' + str(r) if r else ''}" / class_dir.name)
        counts[class_dir.name] = (len(train), len(held))
    if not args.no_cifar:
        cifar = root / "cifar10" / "train"
        for class_dir in sorted(p for p in cifar.iterdir() if p.is_dir()):
            link_all(discover_images(class_dir), args.out / "pretrain" / "cifar10" / class_dir.name)
    n_train = sum(t for t, _ in counts.values())
    n_held = sum(h for _, h in counts.values())
    print(f"imagenette: {n_train} train / {n_held} held out over {len(counts)} classes -> {args.out}")


if __name__ == "__main__":
    main()
