"""filterkit: turn an unlabelled image collection into a trustworthy image filter.

    from filterkit import Encoder, EmbeddingCache, embed_folder
    enc = Encoder.load("models/my-encoder")
    vecs = enc.embed(["a.jpg", "b.jpg"])       # float32 [N, D], unit rows

Names are imported lazily so that ``import filterkit`` (and ``filterkit --help``) does not
pay for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Encoder": "encoder",
    "ModelConfig": "encoder",
    "PRESETS": "encoder",
    "EmbeddingCache": "cache",
    "embed_folder": "pipeline",
    "EmbeddedFolder": "pipeline",
    "build_index": "index",
    "search": "index",
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
    "DuplicateGroup": "dedup",
    "cluster_vectors": "cluster",
    "select_fraction": "cluster",
    "FilterkitError": "errors",
    "ImageError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Exported names never equal a submodule's name: importing a submodule binds that name
    # on the package and would shadow the export.
    if name in _EXPORTS:
        module, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'filterkit' has no attribute {name!r}")
