"""Where the benchmarks and the default-model scripts find the public data sets.

The data root is ``--data DIR``, else ``$FILTERKIT_DATA``, else ``~/.cache/filterkit-data``,
laid out as README.md describes ("Data for benchmarks and the default model"):

    cifar10/{train,test}/<class>/NNNN.jpg      CIFAR-10 as JPEGs, 5,000 / 1,000 per class
    imagenette/train/<wnid>/*.JPEG             Imagenette (imagenette2) train, 224x224
    imagenette/classes.tsv                     wnid -> class name
    splits/                                    written by scripts/make_splits.py

scripts/train_default_model.sh and scripts/gpu_pretrain.sh apply the same rule in shell.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ENV = "FILTERKIT_DATA"
DEFAULT = "~/.cache/filterkit-data"
README = 'README.md, "Data for benchmarks and the default model"'


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help=f"the data root (default: ${ENV}, else {DEFAULT})")


def data_root(given: str | os.PathLike | None = None) -> Path:
    """``given``, else ``$FILTERKIT_DATA``, else ``~/.cache/filterkit-data``."""
    root = given if given is not None else os.environ.get(ENV) or DEFAULT
    return Path(root).expanduser()


def need(path: Path, what: str) -> Path:
    """``path`` if it is a folder; else exit with a message saying what is missing and where."""
    if not path.is_dir():
        raise SystemExit(f"missing {path}: {what} (set --data DIR or ${ENV}; the layout is in {README})")
    return path


def cifar10(root: Path) -> Path:
    """The CIFAR-10 folder, with train/ and test/."""
    need(root / "cifar10" / "train", "CIFAR-10 train as cifar10/train/<class>/*.jpg")
    need(root / "cifar10" / "test", "CIFAR-10 test as cifar10/test/<class>/*.jpg")
    return root / "cifar10"


def imagenette_train(root: Path) -> Path:
    """Imagenette's train split, one folder per wnid."""
    return need(root / "imagenette" / "train", "Imagenette train as imagenette/train/<wnid>/*.JPEG")


def splits(root: Path) -> Path:
    """The folders scripts/make_splits.py writes (imagenette-train, imagenette-heldout, pretrain)."""
    return need(root / "splits" / "imagenette-heldout",
                "the held-out split: run python scripts/make_splits.py --data DIR first").parent
