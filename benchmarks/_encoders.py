"""The encoders every quality benchmark compares: the model given, the same architecture at
random init (seed 0), and raw 32x32 pixels (``None``), with one way to embed paths for each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from filterkit import Encoder
from filterkit.augment import eval_transform
from filterkit.evaluate import RAW_PIXEL_SIZE, features, raw_pixel_embed


def compared_encoders(model: Path | None, preset: str) -> list[tuple[str, Encoder | None]]:
    """[("model", ...) if given, ("random init", ...), ("raw pixels", None)]."""
    from filterkit.encoder import build_backbone
    from filterkit.modeldir import ModelConfig

    encoders: list[tuple[str, Encoder | None]] = []
    if model:
        trained = Encoder.load(model)
        encoders.append(("model", trained))
        cfg = trained.config
    else:
        cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    encoders.append(("random init", Encoder(build_backbone(cfg), cfg)))
    return encoders + [("raw pixels", None)]


def embed_paths(encoder: Encoder | None, paths: list[Path], workers: int | None = None) -> np.ndarray:
    """Unit vectors of ``paths`` by ``encoder`` (None: raw pixels); every path must decode."""
    if encoder is None:
        vecs, kept = features(paths, eval_transform(RAW_PIXEL_SIZE), RAW_PIXEL_SIZE, raw_pixel_embed, workers=workers)
    else:
        vecs, kept = features(paths, encoder.transform, encoder.config.img_size, encoder.embed_batch, workers=workers)
    if len(kept) != len(paths):
        raise SystemExit(f"{len(paths) - len(kept)} of the benchmark's images failed to decode")
    return vecs
