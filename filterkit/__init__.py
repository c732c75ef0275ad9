"""filterkit: turn an unlabelled image collection into a trustworthy image filter.

    from filterkit import Encoder, ImageFilter, find_cross_duplicates, find_duplicates, find_outliers
    enc = Encoder.load()                                   # the shipped default model
    vecs = enc.embed(["a.jpg", "b.jpg"])                   # float32 [N, D], unit rows
    result = ImageFilter(enc).keep_like("exemplars").run("incoming")
    dups = find_duplicates("photos", encoder=enc)          # or find_duplicates(vecs, threshold=0.95)
    leaks = find_cross_duplicates("test", "train", encoder=enc)   # test images that copy a train image
    odd = find_outliers("photos", encoder=enc, top=10)     # the images least like the rest

Names are imported lazily so that ``import filterkit`` (and ``filterkit --help``) does not
pay for torch; ``dir(filterkit)`` and type checkers still see all of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Encoder": "encoder",
    "ModelConfig": "modeldir",
    "PRESETS": "presets",
    "EmbeddingCache": "cache",
    "embed_folder": "pipeline",
    "EmbeddedFolder": "pipeline",
    "build_index": "index",
    "search": "index",
    "search_folder": "neighbours",
    "search_index": "neighbours",
    "Neighbours": "neighbours",
    "discover_images": "images",
    "load_image": "images",
    "pretrain": "train",
    "TrainOptions": "train",
    "evaluate_encoder": ("evaluate", "evaluate"),
    "MoCo": "moco",
    "ImageFilter": "filtering",
    "FilterResult": "filtering",
    "Decision": "filtering",
    "find_duplicates": "dedup",
    "duplicate_groups": "dedup",
    "DedupResult": "dedup",
    "DuplicateGroup": "dedup",
    "find_cross_duplicates": "leakage",
    "CrossDedupResult": "leakage",
    "find_outliers": "outliers",
    "OutlierResult": "outliers",
    "cluster_folder": "cluster",
    "cluster_vectors": "cluster",
    "select_fraction": "cluster",
    "FilterkitError": "errors",
    "ImageError": "errors",
    "ImageReadError": "errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports on first use
    from .cache import EmbeddingCache
    from .cluster import cluster_folder, cluster_vectors, select_fraction
    from .dedup import DedupResult, DuplicateGroup, duplicate_groups, find_duplicates
    from .encoder import Encoder
    from .errors import FilterkitError, ImageError, ImageReadError
    from .evaluate import evaluate as evaluate_encoder
    from .filtering import Decision, FilterResult, ImageFilter
    from .images import discover_images, load_image
    from .index import build_index, search
    from .leakage import CrossDedupResult, find_cross_duplicates
    from .moco import MoCo
    from .modeldir import ModelConfig
    from .neighbours import Neighbours, search_folder, search_index
    from .outliers import OutlierResult, find_outliers
    from .pipeline import EmbeddedFolder, embed_folder
    from .presets import PRESETS
    from .train import TrainOptions, pretrain


def __getattr__(name: str):
    # Exported names never equal a submodule's name: importing a submodule binds that name
    # on the package and would shadow the export.
    if name in _EXPORTS:
        module, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'filterkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
