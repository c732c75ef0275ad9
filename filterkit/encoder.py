"""``Encoder``: a timm ViT backbone, its eval transform, and ``embed``.

The backbone is a plain timm VisionTransformer (fixed 2D sin-cos positions, feature = the
final-norm CLS token); ``modeldir`` reads and writes the directory it is stored in.

    >>> enc = Encoder.load("models/my-encoder")
    >>> vecs = enc.embed(["a.jpg", "b.jpg"])      # float32 [2, D], rows L2-normalised
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .augment import eval_transform
from .devices import autocast, autocast_dtype, pick_device
from .errors import FilterkitError, ImageError, ImageReadError
from .images import to_rgb
from .modeldir import FORMAT, ModelConfig, model_id_of, read_model_dir, write_model_dir
from .presets import RANDOM_INIT_PRESET


def sincos_pos_embed(cfg: ModelConfig) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [1, 1 + N, D]; the class token's row is zero
    (as in MoCo v3)."""
    return grid_pos_embed(cfg.img_size // cfg.token_stride, cfg.embed_dim)


def grid_pos_embed(grid: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The sin-cos embedding [1, 1 + grid², dim] of a grid × grid token grid, class row zero.
    A fixed function of the grid, so a smaller input (a multi-crop local view) gets its own
    grid's embedding exactly, not an interpolation of the full one. Not cached: it is a few
    small ops, and a cache would keep whatever device (meta included) its first caller had."""
    from timm.layers import build_sincos2d_pos_embed

    patches = build_sincos2d_pos_embed([grid, grid], dim=dim, device=device)
    return torch.cat([torch.zeros(1, dim, device=patches.device), patches], dim=0).unsqueeze(0)


def forward_any_side(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``backbone(x)`` (the final-norm CLS token [B, D]) for square inputs whose side is any
    multiple of the token stride, the positions being ``grid_pos_embed`` of their own grid.

    Training only (multi-crop's local views): the backbone and its saved weights stay those of
    the full input side; this replays timm's VisionTransformer.forward with another position
    table. A plain PatchEmbed asserts its configured side, so its projection is applied
    directly (the hybrid's stem embedding has no such check)."""
    from timm.layers import PatchEmbed

    embed = backbone.patch_embed
    if isinstance(embed, PatchEmbed) and embed.strict_img_size:
        tokens = embed.norm(embed.proj(x).flatten(2).transpose(1, 2))
    else:
        tokens = embed(x)
    n, length, dim = tokens.shape
    grid = math.isqrt(length)
    if grid * grid != length:
        raise FilterkitError(f"a {x.shape[-2]}x{x.shape[-1]} input gives {length} tokens, not a square grid")
    pos = grid_pos_embed(grid, dim, tokens.device)  # fp32, as the global views' pos_embed is added
    h = torch.cat([backbone.cls_token.expand(n, -1, -1), tokens], dim=1) + pos
    h = backbone.norm_pre(backbone.patch_drop(backbone.pos_drop(h)))
    return backbone.forward_head(backbone.norm(backbone.blocks(h)))


def build_backbone(cfg: ModelConfig) -> torch.nn.Module:
    """A timm VisionTransformer whose forward returns the final-norm CLS token [B, D]."""
    import timm

    model = timm.create_model(cfg.timm_name, pretrained=False, **cfg.timm_kwargs)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(cfg))
    model.pos_embed.requires_grad_(False)
    return model


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The backbone's state-dict shapes, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_backbone(cfg).state_dict().items()}


class Encoder:
    """A backbone plus its config: turns images into L2-normalised float32 vectors."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        config: ModelConfig,
        meta: dict[str, Any] | None = None,
        model_id: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        path: str | os.PathLike | None = None,
    ) -> None:
        self.config = config
        self.path = None if path is None else Path(path)  # the model directory it was loaded from
        self.meta = dict(meta or {})
        self.device = pick_device(device)
        self.precision = precision  # as asked ('auto' is resolved per machine: Ray workers resolve it again)
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.backbone = backbone.to(self.device).eval()
        self._model_id = model_id
        self.transform = eval_transform(config.img_size, config.mean, config.std)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def random(cls, preset: str = RANDOM_INIT_PRESET, seed: int = 0, **overrides: Any) -> Encoder:
        """A randomly initialised encoder (the baseline every quality figure is compared to)."""
        cfg = ModelConfig.from_preset(preset, **overrides)
        torch.manual_seed(seed)
        return cls(build_backbone(cfg), cfg, meta={"init": {"seed": seed}}, device="cpu")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "auto",
             precision: str = "auto") -> Encoder:
        """Load a model directory (default: the shipped default model, see
        ``modeldir.default_model_path``). Never unpickles: weights are safetensors."""
        files = read_model_dir(path)
        state = files.state_dict(expected_shapes(files.config))  # before allocating what config.json asks for
        backbone = build_backbone(files.config)
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise FilterkitError(f"{files.path / 'model.safetensors'} does not fit config.json: {detail}") from None
        return cls(backbone, files.config, meta=files.meta, model_id=files.model_id, device=device,
                   precision=precision, path=files.path)

    def weights_blob(self, dtype: torch.dtype = torch.float32) -> bytes:
        """The safetensors bytes ``save`` writes; the model id hashes exactly these."""
        from safetensors.torch import save as save_safetensors

        state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in self.backbone.state_dict().items()}
        return save_safetensors(state, metadata={"format": FORMAT})

    def save(self, path: str | os.PathLike, overwrite: bool = False, card: str | None = None,
             weights_dtype: torch.dtype = torch.float32) -> Path:
        """Write the model directory (``modeldir.write_model_dir``).

        ``weights_dtype=torch.float16`` halves the file; ``load`` still returns fp32.
        """
        if weights_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise FilterkitError(f"weights can be stored as float32, float16 or bfloat16, not {weights_dtype}")
        model_id = write_model_dir(path, self.config, self.weights_blob(weights_dtype), self.meta,
                                   overwrite=overwrite, card=card)
        if weights_dtype == torch.float32:  # else this object's fp32 weights are not the file's
            self._model_id = model_id
        return Path(path)

    def describe(self) -> dict[str, Any]:
        """Identity, architecture, timm name, size and metadata (``filterkit model info``)."""
        return {"model_id": self.model_id, "embedding_dim": self.dim, "architecture": self.config.to_dict(),
                "timm": {"model_name": self.config.timm_name, "kwargs": self.config.timm_kwargs},
                "parameters": sum(p.numel() for p in self.backbone.parameters()), **self.meta}

    def reference(self):
        """The model directory's reference mean (``reference.read_reference``), or None
        when it has none or the encoder was not loaded from a directory."""
        from .reference import read_reference

        return read_reference(self.path, self.model_id, self.dim)

    # -- properties ---------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @property
    def model_id(self) -> str:
        """Identifies weights + preprocessing; the embedding cache is keyed by it."""
        if self._model_id is None:
            self._model_id = model_id_of(hashlib.sha256(self.weights_blob()).hexdigest(), self.config)
        return self._model_id

    # -- embedding ----------------------------------------------------------------------
    @torch.inference_mode()
    def embed_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [B, 3, S, S] -> L2-normalised float32 features [B, D] on CPU."""
        pixels = pixels.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            features = self.backbone(pixels)
        return F.normalize(features.float(), dim=-1).cpu()

    def embed(
        self,
        items: Sequence[str | os.PathLike | Image.Image] | torch.Tensor,
        batch_size: int = 64,
        workers: int | None = None,
    ) -> np.ndarray:
        """Embed image paths, PIL images, or a preprocessed tensor [N, 3, S, S].

        Returns float32 [N, D] with unit-norm rows, in input order. A path that cannot be
        decoded raises ImageError naming it (folder-level commands skip such files instead).
        """
        if isinstance(items, torch.Tensor):
            pixels = items.unsqueeze(0) if items.dim() == 3 else items
            expected = (3, self.config.img_size, self.config.img_size)
            if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
                raise FilterkitError(f"expected a tensor [N, {', '.join(map(str, expected))}], "
                                     f"got {list(items.shape)}")
            chunks = [self.embed_batch(pixels[i:i + batch_size])
                      for i in range(0, len(pixels), batch_size)]
            return _stack(chunks, self.dim)
        items = list(items)
        if all(isinstance(x, Image.Image) for x in items):
            chunks = [
                self.embed_batch(torch.stack([self.transform(to_rgb(x)) for x in items[i:i + batch_size]]))
                for i in range(0, len(items), batch_size)
            ]
            return _stack(chunks, self.dim)
        if not all(isinstance(x, (str, os.PathLike)) for x in items):
            raise FilterkitError("embed() takes a list of paths, a list of PIL images, or a tensor")
        from .loader import embed_all

        vectors, _, failures = embed_all([Path(p) for p in items], self.transform, self.config.img_size,
                                         self.embed_batch, batch_size, workers)
        if failures:
            first = failures[0]
            raise (ImageReadError if first.unreadable else ImageError)(f"{items[first.index]}: {first.reason}")
        return vectors if vectors is not None else np.empty((0, self.dim), dtype=np.float32)


def _stack(chunks: list[torch.Tensor], dim: int) -> np.ndarray:
    if not chunks:
        return np.empty((0, dim), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)
