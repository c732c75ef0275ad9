"""The model directory format: what a trained encoder is on disk.

A model directory holds ``config.json`` (format, architecture, normalisation, model id,
weights checksum, provenance, calibrated thresholds, measured quality), ``model.safetensors``
(the backbone's state dict, loadable with ``strict=True`` into the plain timm model named in
``config.json["timm"]``) and ``MODEL_CARD.md``. This module reads, checks and writes it;
``encoder.Encoder`` turns its weights into a module. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .errors import FilterkitError
from .fsutil import atomic_write_bytes, atomic_write_text
from .presets import ARCHS, get_preset

FORMAT = "filterkit-model/1"
# The encoder filterkit ships (models/<name>/ in the repo, filterkit/models/<name>/ in a wheel).
DEFAULT_MODEL = "filterkit-vit-mini"
MODEL_ENV = "FILTERKIT_MODEL"
MAX_PARAMS = 2e9  # a config.json asking for more is refused, not allocated
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "MODEL_CARD.md"
# Top-level config.json fields that describe the weights; the rest is metadata.
_STRUCTURE = ("format", "architecture", "timm", "weights_sha256", "model_id", "embedding_dim")
METADATA = ("training", "thresholds", "data", "quality")
TRAINING_DIR = "training"
_OS_LITTER = {".DS_Store", "Thumbs.db", "desktop.ini"}  # files a file browser leaves in any folder  # pretrain's checkpoint and log, inside the model directory it writes


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
        preset = get_preset(name)
        arch = ARCHS[preset.arch]
        cfg = cls(arch=arch.name, patch_size=preset.patch_size, img_size=preset.img_size, embed_dim=arch.width,
                  depth=arch.depth, num_heads=arch.heads, preset=name)
        return replace(cfg, **overrides) if overrides else cfg

    @property
    def timm_name(self) -> str:
        return ARCHS[self.arch].timm_name

    @property
    def stem_stride(self) -> int:
        """Pixels per conv-stem output position (1: no stem, the patches are pixels)."""
        return ARCHS[self.arch].stem_stride

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


def model_id_of(weights_sha256: str, cfg: ModelConfig) -> str:
    blob = weights_sha256 + json.dumps(cfg.to_dict(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def update_model_config(path: str | os.PathLike, **fields: Any) -> None:
    """Set top-level metadata fields (thresholds, quality, ...) of a model directory's
    config.json in place, atomically. Architecture and weights are never touched here."""
    config_path = Path(path) / CONFIG_FILE
    from .encoder import Encoder

    Encoder.load(path, device="cpu")  # refuse to edit a directory that does not load
    doc = json.loads(config_path.read_text(encoding="utf-8"))
    for key in fields:
        if key in _STRUCTURE:
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


def check_weights_fit(blob: bytes, expected: dict[str, tuple[int, ...]], weights_path: Path) -> None:
    """Compare the safetensors header's tensor names and shapes with ``expected`` (the
    backbone's, built on the meta device by the caller): a config.json asking for a huge model
    next to small weights is refused before anything is allocated."""
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
    if shapes != expected:
        missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
        detail = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
            f"shape of {wrong[0]} is {list(shapes[wrong[0]])}, config.json implies {list(expected[wrong[0]])}"
            if wrong else "") if part)
        raise FilterkitError(f"{weights_path} does not fit config.json: {detail}")


@dataclass(frozen=True)
class ModelFiles:
    """A model directory's files, read and checked against each other (config.json valid,
    weights checksum matching); the weights are not yet fitted to a module."""

    path: Path
    config: ModelConfig
    meta: dict[str, Any]  # the METADATA fields present in config.json
    weights: bytes  # model.safetensors
    weights_sha256: str

    @property
    def model_id(self) -> str:
        return model_id_of(self.weights_sha256, self.config)

    def state_dict(self, expected: dict[str, tuple[int, ...]]):
        """The weights as fp32 tensors, after checking their names and shapes against
        ``expected`` (weights may be stored in fp16 to save space; models run in fp32)."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        weights_path = self.path / WEIGHTS_FILE
        check_weights_fit(self.weights, expected, weights_path)
        try:
            state = load_safetensors(self.weights)
        except SafetensorError as e:
            raise FilterkitError(f"malformed {weights_path}: {e}") from None
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_model_dir(path: str | os.PathLike | None = None) -> ModelFiles:
    """Read and check a model directory (default: ``default_model_path()``)."""
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
    meta = {k: doc.get(k) for k in METADATA if k in doc}
    return ModelFiles(path, cfg, meta, blob, weights_sha256)


def check_model_dir_target(path: str | os.PathLike, overwrite: bool = False) -> None:
    """For a command that writes a new model (``model init``, ``import-moco``): whether ``path``
    may take it: a new or empty folder, or (with ``overwrite``) a model directory. Any other
    folder is refused, --force or not: files of the user's would end up mixed with a model's.
    (``write_model_dir`` itself only asks for ``overwrite``: pretrain exports into its own --out.)"""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FilterkitError(f"{path} exists and is not a folder")
    names = {p.name for p in path.iterdir()} - _OS_LITTER if path.is_dir() else set()
    if names:
        if not (path / CONFIG_FILE).is_file():
            raise FilterkitError(f"{path} is not empty and is not a model directory; choose an empty or new folder")
        if not overwrite:
            raise FilterkitError(f"{path} is not empty; pass --force to replace it")


def check_no_training_run(path: str | os.PathLike) -> None:
    """For a command that puts new weights into ``path``: a training run there (``pretrain --out``)
    would outlive them, and ``pretrain --resume`` would carry on the old run over them."""
    training = Path(path) / TRAINING_DIR
    if training.exists():
        raise FilterkitError(f"{path} holds a training run ({training}); new weights there would leave its "
                             f"checkpoint behind: choose another folder, or remove {training} first")


def write_model_dir(path: str | os.PathLike, cfg: ModelConfig, weights: bytes, meta: dict[str, Any],
                    overwrite: bool = False, card: str | None = None) -> str:
    """Write a model directory from safetensors bytes; each file is replaced atomically,
    weights first. Returns the model id."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FilterkitError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FilterkitError(f"{path} is not empty; pass --force to replace it")
    path.mkdir(parents=True, exist_ok=True)
    weights_sha256 = hashlib.sha256(weights).hexdigest()
    doc = {
        "format": FORMAT,
        "model_id": model_id_of(weights_sha256, cfg),
        "architecture": cfg.to_dict(),
        "embedding_dim": cfg.embed_dim,
        "timm": {"model_name": cfg.timm_name, "kwargs": cfg.timm_kwargs},
        "weights_sha256": weights_sha256,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "training": meta.get("training"),
        "thresholds": meta.get("thresholds") or {},
        "data": meta.get("data"),
        "quality": meta.get("quality"),
    }
    atomic_write_bytes(path / WEIGHTS_FILE, weights)
    atomic_write_text(path / CONFIG_FILE, json.dumps(doc, indent=2) + "\n")
    atomic_write_text(path / CARD_FILE, card or default_model_card(cfg, meta))
    from .reference import REFERENCE_FILE, reference_model_id

    old = reference_model_id(path)
    if old is not None and old != doc["model_id"]:  # the mean of the weights just replaced: stale
        (path / REFERENCE_FILE).unlink()
    return doc["model_id"]
