"""Importing and exporting weights: official MoCo v3 checkpoints and plain timm state dicts in,
timm-loadable state dicts out. Checkpoints are read with ``torch.load(weights_only=True)`` or
safetensors: nothing is ever unpickled into code.

An official facebookresearch/moco-v3 checkpoint (``checkpoint_XXXX.pth.tar``) holds
``state_dict`` with ``module.base_encoder.*`` (the ViT; its projector under
``module.base_encoder.head.*``), ``module.momentum_encoder.*`` and ``module.predictor.*``;
its ViT-Small has 12 heads (timm's has 6), ViT-Base 12.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from .encoder import Encoder, build_backbone
from .errors import FilterkitError
from .modeldir import ModelConfig, check_model_dir_target, check_no_training_run
from .presets import ARCHS

MOCO_PREFIX = "module.base_encoder."
MOCO_HEADS = {"vit_small": 12, "vit_base": 12, "vit_conv_small": 12, "vit_conv_base": 12}
_ARCH_BY_WIDTH = {a.width: a.name for a in ARCHS.values() if a.imports_width}


def read_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, other top-level entries) of a .safetensors file or a torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FilterkitError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path), {}
        except Exception as e:
            raise FilterkitError(f"cannot read {path}: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refusals of pickled code included
        text = str(e)
        if "Weights only load failed" in text:  # torch's message goes on to advise unpickling: not repeated
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise FilterkitError(f"cannot read {path} safely: it holds pickled objects{what} besides tensors, and "
                                 "filterkit never unpickles; where you trust the file, save its state dict as "
                                 "safetensors (safetensors.torch.save_file(state_dict, 'weights.safetensors')) "
                                 "and import that") from None
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise FilterkitError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise FilterkitError(f"{path} holds no state dict")


def backbone_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The ViT backbone's tensors in timm names, and the layout they came in."""
    if any(k.startswith(MOCO_PREFIX) for k in state):
        layout = "moco-v3"
        state = {k[len(MOCO_PREFIX):]: v for k, v in state.items()
                 if k.startswith(MOCO_PREFIX) and not k.startswith(MOCO_PREFIX + "head.")}
    else:
        layout = "timm"
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a classifier
    if any(k.startswith("fc_norm.") for k in state):
        raise FilterkitError("these weights pool features by averaging (fc_norm); filterkit uses the CLS token")
    needed = ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise FilterkitError(f"not a ViT with a class token: {', '.join(missing)} missing")
    return state, layout


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None) -> ModelConfig:
    """Architecture from tensor shapes; heads cannot be read from shapes and must be given
    (or follow timm's default for the width)."""
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    tokens = state["pos_embed"].shape[1] - 1 if "pos_embed" in state else None
    grid = math.isqrt(tokens) if tokens else 0
    if not tokens or grid * grid != tokens:
        raise FilterkitError("cannot read the image size: pos_embed is missing or not a square grid + class token")
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / width
    arch = _ARCH_BY_WIDTH.get(width, "vit-small")
    heads = num_heads or ARCHS[arch].heads
    return ModelConfig(arch=arch, patch_size=patch, img_size=grid * patch, embed_dim=width, depth=depth,
                       num_heads=heads, mlp_ratio=mlp_ratio)


def import_checkpoint(path: str | os.PathLike, out: str | os.PathLike, num_heads: int | None = None,
                      overwrite: bool = False) -> Encoder:
    """Convert an official MoCo v3 checkpoint or a plain timm ViT state dict into a model directory."""
    check_no_training_run(out)
    check_model_dir_target(out, overwrite)
    state, extra = read_state(path)
    backbone_tensors, layout = backbone_state(state)
    if num_heads is None and layout == "moco-v3":
        num_heads = MOCO_HEADS.get(str(extra.get("arch", "")))
    cfg = infer_config(backbone_tensors, num_heads)
    backbone = build_backbone(cfg)
    try:
        backbone.load_state_dict(backbone_tensors, strict=True)
    except RuntimeError as e:
        raise FilterkitError(f"{path} does not fit a timm ViT: {str(e).splitlines()[0]}") from None
    meta = {"training": {"imported_from": str(path), "layout": layout,
                         **({"epoch": int(extra["epoch"])} if isinstance(extra.get("epoch"), int) else {}),
                         **({"arch": extra["arch"]} if isinstance(extra.get("arch"), str) else {})}}
    encoder = Encoder(backbone, cfg, meta=meta, device="cpu")
    encoder.save(out, overwrite=overwrite)
    return encoder


def export_timm(model_dir: str | os.PathLike, out: str | os.PathLike) -> ModelConfig:
    """Write the backbone as a timm state dict (safetensors, or a torch file for .pth/.pt);
    returns the architecture, whose ``timm_name``/``timm_kwargs`` rebuild the model."""
    encoder = Encoder.load(model_dir, device="cpu")
    out = Path(out)
    if out.exists():
        raise FilterkitError(f"{out} exists; choose a new file name")
    state = {k: v.detach().contiguous() for k, v in encoder.backbone.state_dict().items()}
    from .fsutil import atomic_write_bytes

    if out.suffix in (".pth", ".pt"):
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(out, buffer.getvalue())
    else:
        from safetensors.torch import save

        atomic_write_bytes(out, save(state))
    return encoder.config
