"""The one registry of architectures, presets and their training recipes.

Like timm's model registry, every name is written once, here, as a small frozen dataclass:
``ModelConfig.from_preset``, the trainer's recipes, ``model import-moco``'s width table and the
CLI's help texts all read this table. It imports nothing heavy, so ``filterkit --help`` can.

    >>> get_preset("vit-mini-8-32").recipe("cpu").batch_size
    128
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import FilterkitError


@dataclass(frozen=True)
class Arch:
    """A backbone family: the timm model it starts from and its width, depth and heads."""

    name: str
    timm_name: str
    width: int
    depth: int
    heads: int
    stem_stride: int = 1  # pixels per conv-stem output position (1: the patches are pixels)
    # ``model import-moco`` names a plain timm ViT of this width after this arch.
    imports_width: bool = False


@dataclass(frozen=True)
class Recipe:
    """What a preset trains with on one kind of device; any option given overrides it."""

    batch_size: int
    warmup_epochs: float
    head_hidden: int  # hidden width of the projector and the predictor
    epochs: int
    base_lr: float = 1.5e-4  # lr = base_lr x batch / 256
    min_crop_scale: float | None = None  # None: the BYOL recipe's 0.08
    depth: int | None = None  # None: the arch's

    def options(self) -> dict[str, Any]:
        """The ``TrainOptions`` fields this recipe fills."""
        values = dict(batch_size=self.batch_size, base_lr=self.base_lr, warmup_epochs=self.warmup_epochs,
                      proj_hidden=self.head_hidden, pred_hidden=self.head_hidden, epochs=self.epochs,
                      min_crop_scale=self.min_crop_scale, depth=self.depth)
        return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class Preset:
    """A named architecture + input: ``{arch}-{pixels per token}-{input side}``."""

    name: str
    arch: str
    patch_size: int  # in stem positions: pixels per token = patch_size x the arch's stem_stride
    img_size: int
    cpu: Recipe | None
    gpu: Recipe | None
    note: str = ""  # one line for --help and the README

    def recipe(self, device_kind: str) -> Recipe:
        """The recipe for ``device_kind`` ('cuda' is the GPU recipe; anything else the CPU's)."""
        kind = "gpu" if device_kind == "cuda" else "cpu"
        recipe = self.gpu if kind == "gpu" else self.cpu
        if recipe is None:
            raise FilterkitError(f"preset {self.name} has no {kind.upper()} recipe: choose a --preset "
                                 f"that has one (filterkit pretrain --help lists them)")
        return recipe


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("vit-mini", "vit_tiny_patch16_224", 192, 6, 3),  # ViT-Tiny at half depth, for CPUs
    Arch("vit-nano", "vit_tiny_patch16_224", 96, 4, 3, imports_width=True),
    # timm's hybrid R+ViT-Ti: a ResNet stem (7x7 conv, stride 2, GroupNorm, ReLU, max-pool: stride 4)
    # before the patch projection. Early convolutions make ViTs learn faster (Xiao et al. 2021).
    Arch("vit-mini-conv", "vit_tiny_r_s16_p8_224", 192, 6, 3, stem_stride=4),
    Arch("vit-tiny", "vit_tiny_patch16_224", 192, 12, 3, imports_width=True),
    Arch("vit-small", "vit_small_patch16_224", 384, 12, 6, imports_width=True),
    Arch("vit-base", "vit_base_patch16_224", 768, 12, 12, imports_width=True),
)}

# Small inputs crop from 20 % of the area up (an 8 % crop of a 32-px image is 9x9 pixels): the
# vit-mini, vit-nano and vit-mini-conv recipes, measured on CPUs; the vit-tiny recipes keep the
# paper's 0.08.
_SMALL = dict(min_crop_scale=0.2)
# GPU recipes follow the paper's ViT recipe scaled to the preset; CPU recipes move in minutes to
# an hour on a laptop. Batch 128 rather than 256 on a CPU gives twice the steps in the same hour
# (benchmarks/README.md: CIFAR-10 kNN 0.494 vs 0.463 from ~1 h of pretrain_quality.py).
_GPU = Recipe(512, 10, 4096, 200)
_GPU_SMALL = Recipe(512, 10, 4096, 200, **_SMALL)
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("vit-mini-8-32", "vit-mini", 8, 32, Recipe(128, 0.5, 1024, 7, base_lr=1e-3, **_SMALL), _GPU_SMALL,
           "the first shipped encoder's preset (the shipped one is vit-mini-8-64)"),
    Preset("vit-mini-8-64", "vit-mini", 8, 64, Recipe(128, 1, 1024, 10, base_lr=1e-3, **_SMALL), _GPU),
    Preset("vit-mini-16-112", "vit-mini", 16, 112, Recipe(128, 1, 1024, 10, base_lr=1e-3, **_SMALL), _GPU),
    Preset("vit-nano-4-32", "vit-nano", 4, 32, Recipe(128, 0.5, 1024, 10, base_lr=1e-3, **_SMALL), _GPU_SMALL,
           "width 96, 64 tokens: no better than vit-mini-8-32 at 4 blocks per CPU hour"),
    # Stem stride 4 x patch 2: 16 tokens at 32 px, like vit-mini-8-32. Its CPU recipe is the
    # measured CPU hour: 4 blocks, 2,300 steps, CIFAR-10 kNN 0.559 (benchmarks/README.md).
    Preset("vit-mini-conv-8-32", "vit-mini-conv", 2, 32,
           Recipe(128, 0.5, 1024, 6, base_lr=5e-4, depth=4, **_SMALL), _GPU_SMALL,
           "conv stem; the best CPU hour measured (4 blocks on a CPU)"),
    Preset("vit-tiny-4-32", "vit-tiny", 4, 32, Recipe(128, 1, 1024, 10), _GPU,
           "64 tokens at depth 12: the GPU default (CIFAR-10 kNN 0.656 in 5.5 min on an H200)"),
    Preset("vit-tiny-8-64", "vit-tiny", 8, 64, Recipe(128, 1, 1024, 10), _GPU),
    Preset("vit-tiny-16-224", "vit-tiny", 16, 224, Recipe(64, 1, 1024, 5), Recipe(512, 20, 4096, 100)),
    Preset("vit-small-16-224", "vit-small", 16, 224, Recipe(64, 1, 1024, 3), Recipe(1024, 40, 4096, 100)),
    # For ViT-B weights imported with `model import-moco`: the paper's ViT-B recipe (batch 4096,
    # 300 epochs, 40 warm-up; Chen et al. 2021, table 8) scaled to one GPU, and a CPU recipe that
    # only adapts such weights for an epoch or two.
    Preset("vit-base-16-224", "vit-base", 16, 224, Recipe(16, 0.1, 1024, 1), Recipe(512, 10, 4096, 100),
           "ViT-B/16, for imported MoCo v3 weights"),
)}

# The training options no recipe sets (train.TrainOptions fills them last).
TRAIN_DEFAULTS: dict[str, Any] = dict(weight_decay=0.1, temperature=0.2, momentum=0.99, out_dim=256, predictor=True,
                                      freeze_patch_embed=False, seed=0, checkpoint_every=500, data_in_memory=False,
                                      min_crop_scale=0.08,  # the BYOL recipe's crop
                                      method="moco-v3",  # filterkit.methods.METHODS
                                      queue=0,  # moco-v3's queue of negatives: none
                                      local_crops=0)  # multi-crop off: the two global views only

# `Encoder.random` and `filterkit model init` without --preset: the ViT-Ti/16 of timm at 224 px.
RANDOM_INIT_PRESET = "vit-tiny-16-224"

# `filterkit pretrain` without --preset (and without --init-from): the measured CPU-hour recipe
# on a CPU, the GPU recipe measured on a GPU.
DEFAULT_PRESETS = {"cpu": "vit-mini-conv-8-32", "cuda": "vit-tiny-4-32"}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise FilterkitError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def default_preset(device_kind: str) -> str:
    """The preset ``pretrain`` uses when none is given, for a device kind ('cpu', 'cuda', 'mps')."""
    return DEFAULT_PRESETS["cuda" if device_kind == "cuda" else "cpu"]


def preset_for_arch(arch: str) -> str:
    """The first preset of ``arch``, whose recipe trains a model that has no preset of its own
    (weights imported with ``model import-moco``)."""
    for p in PRESETS.values():
        if p.arch == arch:
            return p.name
    raise FilterkitError(f"no preset uses the {arch} architecture, so there is no recipe to train "
                         f"these weights with (presets: {preset_help()})")


def preset_help() -> str:
    """The presets as one help line (``--preset`` of ``pretrain`` and ``model init``)."""
    return " | ".join(PRESETS)


def lr_help() -> str:
    """``--lr``'s default as the recipes set it: base LR x batch / 256 per device kind, with
    the archs of each base LR."""
    parts = []
    for kind in ("gpu", "cpu"):
        by_lr: dict[float, list[str]] = {}
        for p in PRESETS.values():
            recipe = p.gpu if kind == "gpu" else p.cpu
            if recipe is not None and p.arch not in by_lr.setdefault(recipe.base_lr, []):
                by_lr[recipe.base_lr].append(p.arch)
        groups = [f"{_short(lr)} x batch / 256" + (f" for {', '.join(archs)}" if len(by_lr) > 1 else "")
                  for lr, archs in by_lr.items()]
        parts.append(f"on a {kind.upper()} " + "; ".join(groups))
    return "the recipe's: " + "; ".join(parts)


def depth_help() -> str:
    """``--depth``'s default: the recipes that set one, else the arch's."""
    set_by = [f"{r.depth} for {p.name} on a {kind}" for p in PRESETS.values()
              for kind, r in (("GPU", p.gpu), ("CPU", p.cpu)) if r is not None and r.depth is not None]
    return "the recipe's" + (f" ({'; '.join(set_by)})" if set_by else "") + ", else the arch's"


def _short(value: float) -> str:
    """0.0005 -> '5e-4'."""
    mantissa, exp = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
