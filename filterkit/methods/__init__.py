"""The self-supervised methods ``pretrain`` can run, one module each behind one interface
(``methods.base.Method``). This table imports nothing heavy, so ``filterkit --help`` can list it.

    >>> method = build_method("simclr", backbone, embed_dim=192, options=resolved_options)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import FilterkitError

if TYPE_CHECKING:
    from torch import nn

    from .base import Method

# --method value -> (module, class). The first is the default (presets.TRAIN_DEFAULTS["method"]).
METHODS: dict[str, tuple[str, str]] = {
    "moco-v3": ("filterkit.moco", "MoCo"),
    "simclr": ("filterkit.methods.simclr", "SimCLR"),
    "byol": ("filterkit.methods.byol", "BYOL"),
    "simsiam": ("filterkit.methods.simsiam", "SimSiam"),
    "barlow-twins": ("filterkit.methods.barlow_twins", "BarlowTwins"),
    "nnclr": ("filterkit.methods.nnclr", "NNCLR"),
    "meanshift": ("filterkit.methods.meanshift", "MeanShift"),
    "supcon": ("filterkit.methods.supcon", "SupCon"),
    "swav": ("filterkit.methods.swav", "SwAV"),
}


def method_help() -> str:
    """The methods as one help line (``pretrain --method``)."""
    return " | ".join(METHODS)


def method_class(name: str) -> type[Method]:
    """The class of a ``--method`` name; a clear error for an unknown one."""
    try:
        module, cls = METHODS[name]
    except KeyError:
        raise FilterkitError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
    return getattr(importlib.import_module(module), cls)


def build_method(name: str, backbone: nn.Module, embed_dim: int, options: Any) -> Method:
    """A fresh method around ``backbone``, its heads shaped by the resolved ``TrainOptions``."""
    return method_class(name).from_options(backbone, embed_dim, options)
