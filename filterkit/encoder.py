"""ViT encoders built through timm, named presets, and the model directory format.

A model directory holds ``config.json`` (architecture, normalisation, metadata),
``model.safetensors`` (the backbone's state dict, loadable with ``strict=True`` into the
plain timm model named in ``config.json["timm"]``) and ``MODEL_CARD.md``.

    >>> enc = Encoder.load("models/my-encoder")
    >>> vecs = enc.embed(["a.jpg", "b.jpg"])      # float32 [2, D], rows L2-normalised
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from .devices import autocast, autocast_dtype, pick_device
from .errors import FilterkitError, ImageError
from .fsutil import atomic_write_bytes, atomic_write_text
from .images import to_rgb

FORMAT = "filterkit-model/1"
# The encoder filterkit ships (models/<name>/ in the repo, filterkit/models/<name>/ in a wheel).
DEFAULT_MODEL = "filterkit-vit-mini"
MODEL_ENV = "FILTERKIT_MODEL"
MAX_PARAMS = 2e9  # a config.json asking for more is refused, not allocated
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "MODEL_CARD.md"

# arch name -> (timm model whose defaults we start from, width, depth, heads)
ARCHS: dict[str, tuple[str, int, int, int]] = {
    "vit-mini": ("vit_tiny_patch16_224", 192, 6, 3),  # ViT-Tiny at half depth, for CPUs
    "vit-nano": ("vit_tiny_patch16_224", 96, 4, 3),  # half ViT-Tiny's width, a third of its depth: CPUs
    # timm's hybrid R+ViT-Ti: a ResNet stem (7x7 conv, stride 2, GroupNorm, ReLU, max-pool: stride 4)
    # before the patch projection. Early convolutions make ViTs learn faster (Xiao et al. 2021).
    "vit-mini-conv": ("vit_tiny_r_s16_p8_224", 192, 6, 3),
    "vit-tiny": ("vit_tiny_patch16_224", 192, 12, 3),
    "vit-small": ("vit_small_patch16_224", 384, 12, 6),
    "vit-base": ("vit_base_patch16_224", 768, 12, 12),
}
# timm model -> pixels per stem output position (patch_size counts stem positions, not pixels)
STEM_STRIDE: dict[str, int] = {"vit_tiny_r_s16_p8_224": 4}
# preset name -> (arch, patch size, image size); the name's middle number is the pixels per token
PRESETS: dict[str, tuple[str, int, int]] = {
    "vit-mini-8-32": ("vit-mini", 8, 32),
    "vit-mini-8-64": ("vit-mini", 8, 64),
    "vit-mini-16-112": ("vit-mini", 16, 112),
    "vit-nano-4-32": ("vit-nano", 4, 32),
    "vit-mini-conv-8-32": ("vit-mini-conv", 2, 32),  # stem stride 4 x patch 2: 16 tokens, like vit-mini-8-32
    "vit-tiny-4-32": ("vit-tiny", 4, 32),
    "vit-tiny-8-64": ("vit-tiny", 8, 64),
    "vit-tiny-16-224": ("vit-tiny", 16, 224),
    "vit-small-16-224": ("vit-small", 16, 224),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the backbone and feed it pixels."""

    arch: str
    patch_size: int
    img_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    preset: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> FilterkitError:
            return FilterkitError(f"invalid model config: {msg}")

        if self.arch not in ARCHS:
            raise bad(f"unknown arch {self.arch!r} (known: {', '.join(ARCHS)})")
        ints = dict(patch_size=(1, 64), img_size=(8, 1024), embed_dim=(16, 4096), depth=(1, 48),
                    num_heads=(1, 64))
        for name, (lo, hi) in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise bad(f"{name}={value!r} is outside {lo}..{hi}")
        if self.img_size % self.token_stride:
            stem = f" x stem stride {self.stem_stride}" if self.stem_stride > 1 else ""
            raise bad(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}{stem}")
        if self.embed_dim % 4 or self.embed_dim % self.num_heads:
            raise bad(f"embed_dim {self.embed_dim} must divide by 4 and by num_heads {self.num_heads}")
        if not 0.5 <= float(self.mlp_ratio) <= 16:
            raise bad(f"mlp_ratio={self.mlp_ratio!r} is outside 0.5..16")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
                raise bad(f"{name} must be three numbers")
        if min(self.std) <= 0:
            raise bad("std must be positive")
        params = (4 + 2 * self.mlp_ratio) * self.embed_dim ** 2 * self.depth  # attention + MLP weights
        if params > MAX_PARAMS:
            raise bad(f"about {params / 1e9:.1f}B parameters; filterkit refuses models above "
                      f"{MAX_PARAMS / 1e9:.0f}B (ViT-g has 1B)")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise FilterkitError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        arch, patch, size = PRESETS[name]
        _, dim, depth, heads = ARCHS[arch]
        cfg = cls(arch=arch, patch_size=patch, img_size=size, embed_dim=dim, depth=depth,
                  num_heads=heads, preset=name)
        return replace(cfg, **overrides) if overrides else cfg

    @property
    def timm_name(self) -> str:
        return ARCHS[self.arch][0]

    @property
    def stem_stride(self) -> int:
        """Pixels per conv-stem output position (1: no stem, the patches are pixels)."""
        return STEM_STRIDE.get(self.timm_name, 1)

    @property
    def token_stride(self) -> int:
        """Pixels per token side."""
        return self.patch_size * self.stem_stride

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword overrides that turn ``timm.create_model(timm_name)`` into this backbone."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    num_classes=0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise FilterkitError(f"invalid model config: unknown keys {sorted(unknown)}")
        d = dict(d)
        for name in ("mean", "std"):
            if name in d:
                d[name] = tuple(d[name])
        try:
            return cls(**d)
        except TypeError as e:
            raise FilterkitError(f"invalid model config: {e}") from None


def default_model_path() -> Path:
    """Where ``Encoder.load()`` with no argument looks: ``$FILTERKIT_MODEL`` if set, else the
    shipped default model (package data of a wheel, or ``models/`` of a source checkout)."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV]).expanduser()
    candidates = []
    try:  # installed: filterkit.models maps onto the repo's models/ folder (see pyproject.toml)
        from importlib.resources import files

        candidates.append(Path(str(files("filterkit.models") / DEFAULT_MODEL)))
    except (ImportError, TypeError):
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "models" / DEFAULT_MODEL)  # source tree
    candidates = list(dict.fromkeys(candidates))
    for path in candidates:
        if (path / CONFIG_FILE).is_file():
            return path
    raise FilterkitError(
        f"the default model {DEFAULT_MODEL!r} is not installed (looked in "
        f"{', '.join(str(c) for c in candidates)}); pass --model DIR or set {MODEL_ENV}"
    )


def sincos_pos_embed(cfg: ModelConfig) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [1, 1 + N, D]; the class token's row is zero
    (as in MoCo v3)."""
    from timm.layers import build_sincos2d_pos_embed

    grid = cfg.img_size // cfg.token_stride
    patches = build_sincos2d_pos_embed([grid, grid], dim=cfg.embed_dim)
    return torch.cat([torch.zeros(1, cfg.embed_dim), patches], dim=0).unsqueeze(0)


def build_backbone(cfg: ModelConfig) -> torch.nn.Module:
    """A timm VisionTransformer whose forward returns the final-norm CLS token [B, D]."""
    import timm

    model = timm.create_model(cfg.timm_name, pretrained=False, **cfg.timm_kwargs)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(cfg))
    model.pos_embed.requires_grad_(False)
    return model


def _model_id(weights_sha256: str, cfg: ModelConfig) -> str:
    blob = weights_sha256 + json.dumps(cfg.to_dict(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def update_model_config(path: str | os.PathLike, **fields: Any) -> None:
    """Set top-level metadata fields (thresholds, quality, ...) of a model directory's
    config.json in place, atomically. Architecture and weights are never touched here."""
    config_path = Path(path) / CONFIG_FILE
    Encoder.load(path, device="cpu")  # refuse to edit a directory that does not load
    doc = json.loads(config_path.read_text(encoding="utf-8"))
    for key in fields:
        if key in ("format", "architecture", "timm", "weights_sha256", "model_id", "embedding_dim"):
            raise FilterkitError(f"{key} is not metadata")
    doc.update(fields)
    atomic_write_text(config_path, json.dumps(doc, indent=2) + "\n")


def _patching(cfg: ModelConfig) -> str:
    if cfg.stem_stride == 1:
        return f"patch {cfg.patch_size}"
    return f"conv stem (stride {cfg.stem_stride}) then patch {cfg.patch_size}: {cfg.token_stride} px per token"


def default_model_card(cfg: ModelConfig, meta: dict[str, Any]) -> str:
    trained = meta.get("training")
    lines = [
        f"# filterkit encoder ({cfg.preset or cfg.arch})",
        "",
        f"- Architecture: {cfg.arch}, {_patching(cfg)}, input {cfg.img_size} px, "
        f"width {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}; "
        "fixed 2D sin-cos position embedding; feature = final-norm CLS token.",
        f"- Load in timm: `timm.create_model({cfg.timm_name!r}, pretrained=False, "
        f"**config['timm']['kwargs']).load_state_dict(safetensors.torch.load_file("
        f"'{WEIGHTS_FILE}'), strict=True)`",
    ]
    if trained:
        lines.append(f"- Training: {json.dumps(trained, sort_keys=True)}")
    else:
        lines.append("- Weights: random initialisation (a baseline; not trained).")
    if meta.get("data"):
        lines.append(f"- Data: {meta['data']}")
    return "\n".join(lines) + "\n"


def _check_weights_fit(blob: bytes, cfg: ModelConfig, weights_path: Path) -> None:
    """Compare the safetensors header's tensor names and shapes with the backbone that
    ``cfg`` describes, built on the meta device (no memory): a config.json asking for a huge
    model next to small weights is refused before anything is allocated."""
    if len(blob) < 8:
        raise FilterkitError(f"malformed {weights_path}: too short for safetensors")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise FilterkitError(f"malformed {weights_path}: header length {size} exceeds the file")
    try:
        header = json.loads(blob[8:8 + size])
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
        raise FilterkitError(f"malformed {weights_path}: unreadable header ({e})") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_backbone(cfg).state_dict().items()}
    if shapes != expected:
        missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
        detail = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
            f"shape of {wrong[0]} is {list(shapes[wrong[0]])}, config.json implies {list(expected[wrong[0]])}"
            if wrong else "") if part)
        raise FilterkitError(f"{weights_path} does not fit config.json: {detail}")


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
    ) -> None:
        self.config = config
        self.meta = dict(meta or {})
        self.device = pick_device(device)
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.backbone = backbone.to(self.device).eval()
        self._model_id = model_id
        self.transform = eval_transform(config.img_size, config.mean, config.std)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def random(cls, preset: str = "vit-tiny-16-224", seed: int = 0, **overrides: Any) -> Encoder:
        """A randomly initialised encoder (the baseline every quality figure is compared to)."""
        cfg = ModelConfig.from_preset(preset, **overrides)
        torch.manual_seed(seed)
        return cls(build_backbone(cfg), cfg, meta={"init": {"seed": seed}}, device="cpu")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "auto",
             precision: str = "auto") -> Encoder:
        """Load a model directory (default: the shipped default model, see
        ``default_model_path``). Never unpickles: weights are safetensors."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        path = default_model_path() if path is None else Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not path.is_dir():
            raise FilterkitError(f"model directory not found: {path}")
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FilterkitError(f"not a filterkit model directory: {p.name} missing in {path}")
        try:
            doc = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FilterkitError(f"malformed {config_path}: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FilterkitError(f"malformed {config_path}: expected \"format\": \"{FORMAT}\"")
        if not isinstance(doc.get("architecture"), dict):
            raise FilterkitError(f"malformed {config_path}: no \"architecture\" object")
        cfg = ModelConfig.from_dict(doc["architecture"])
        blob = weights_path.read_bytes()
        weights_sha256 = hashlib.sha256(blob).hexdigest()
        if doc.get("weights_sha256") not in (None, weights_sha256):
            raise FilterkitError(
                f"{weights_path} does not match config.json (sha256 differs): the directory "
                "was modified or only partly written"
            )
        _check_weights_fit(blob, cfg, weights_path)  # before allocating anything config.json asks for
        try:
            state = load_safetensors(blob)
        except SafetensorError as e:
            raise FilterkitError(f"malformed {weights_path}: {e}") from None
        backbone = build_backbone(cfg)
        # Weights may be stored in fp16 to save space; the model always runs in fp32.
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise FilterkitError(f"{weights_path} does not fit config.json: {detail}") from None
        meta = {k: doc.get(k) for k in ("training", "thresholds", "data", "quality") if k in doc}
        return cls(backbone, cfg, meta=meta, model_id=_model_id(weights_sha256, cfg),
                   device=device, precision=precision)

    def _weights_blob(self, dtype: torch.dtype = torch.float32) -> bytes:
        """The safetensors bytes ``save`` writes; the model id hashes exactly these."""
        from safetensors.torch import save as save_safetensors

        state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in self.backbone.state_dict().items()}
        return save_safetensors(state, metadata={"format": FORMAT})

    def save(self, path: str | os.PathLike, overwrite: bool = False, card: str | None = None,
             weights_dtype: torch.dtype = torch.float32) -> Path:
        """Write the model directory; each file is replaced atomically, weights first.

        ``weights_dtype=torch.float16`` halves the file; ``load`` still returns fp32.
        """
        if weights_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise FilterkitError(f"weights can be stored as float32, float16 or bfloat16, not {weights_dtype}")
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FilterkitError(f"{path} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            is_model = (path / CONFIG_FILE).is_file()
            hint = "pass --force to replace it" if is_model else "choose an empty or new folder"
            raise FilterkitError(f"{path} is not empty; {hint}")
        path.mkdir(parents=True, exist_ok=True)
        blob = self._weights_blob(weights_dtype)
        weights_sha256 = hashlib.sha256(blob).hexdigest()
        doc = {
            "format": FORMAT,
            "model_id": _model_id(weights_sha256, self.config),
            "architecture": self.config.to_dict(),
            "embedding_dim": self.config.embed_dim,
            "timm": {"model_name": self.config.timm_name, "kwargs": self.config.timm_kwargs},
            "weights_sha256": weights_sha256,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "training": self.meta.get("training"),
            "thresholds": self.meta.get("thresholds") or {},
            "data": self.meta.get("data"),
            "quality": self.meta.get("quality"),
        }
        atomic_write_bytes(path / WEIGHTS_FILE, blob)
        atomic_write_text(path / CONFIG_FILE, json.dumps(doc, indent=2) + "\n")
        atomic_write_text(path / CARD_FILE, card or default_model_card(self.config, self.meta))
        if weights_dtype == torch.float32:  # else this object's fp32 weights are not the file's
            self._model_id = doc["model_id"]
        return path

    # -- properties ---------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @property
    def model_id(self) -> str:
        """Identifies weights + preprocessing; the embedding cache is keyed by it."""
        if self._model_id is None:
            self._model_id = _model_id(hashlib.sha256(self._weights_blob()).hexdigest(), self.config)
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
            index, reason = failures[0]
            raise ImageError(f"{items[index]}: {reason}")
        return vectors if vectors is not None else np.empty((0, self.dim), dtype=np.float32)


def _stack(chunks: list[torch.Tensor], dim: int) -> np.ndarray:
    if not chunks:
        return np.empty((0, dim), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)
