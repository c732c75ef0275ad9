"""Checkpoints and model directories: save (atomically) and load (never unpickling code) a
run's state, merge a resumed run's options with its checkpoint's, export the backbone with
its provenance, and start a run from a trained model (``--init-from``)."""

from __future__ import annotations

import copy
import io
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..encoder import Encoder
from ..errors import FilterkitError
from ..fsutil import atomic_write_bytes
from ..methods.base import Method
from ..modeldir import TRAINING_DIR, ModelConfig
from ..presets import preset_for_arch
from .options import _SCHEDULE_KEYS, DEFAULTS, TrainOptions

CHECKPOINT = Path(TRAINING_DIR) / "checkpoint.pt"
# The checkpoint options that shape a method's state: --init-from loads that state only when
# the new run's match. A checkpoint from before --method existed is a MoCo v3 one, and one from
# before --queue has none.
_HEAD_KEYS = ("out_dim", "proj_hidden", "pred_hidden", "predictor", "method", "queue")
_HEAD_DEFAULTS = {"method": DEFAULTS["method"], "queue": 0}


def _save_checkpoint(out_dir: Path, method: Method, optimizer, scaler, step: int, options: TrainOptions,
                     cfg: ModelConfig, wall_seconds: float = 0.0, init: dict[str, Any] | None = None,
                     images: int | None = None, classes: list[str] | None = None) -> None:
    state = {
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "options": json.dumps(asdict(options)),
        "model_config": json.dumps(cfg.to_dict()),
        "wall_seconds": float(wall_seconds),
    }
    if images is not None:  # the training images: a resume on another count is refused
        state["images"] = int(images)
    if init:
        state["init"] = json.dumps(init)
    if classes is not None:  # a supervised method's label order: a resume on other classes is refused
        state["classes"] = json.dumps(classes)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (out_dir / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / CHECKPOINT, buffer.getvalue())


def _unreadable(path: Path, e: Exception) -> NoReturn:
    # torch's refusal of pickled objects goes on to advise unpickling: not repeated
    text = str(e).strip()
    if "Weights only load failed" in text:
        raise FilterkitError(f"cannot load training checkpoint {path}: it holds pickled objects besides tensors, "
                             "so filterkit did not write it, and it never unpickles: move it away") from None
    raise FilterkitError(f"cannot load training checkpoint {path}: {text.splitlines()[0] if text else type(e).__name__}") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded without unpickling code (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refusals and corrupt files alike
        _unreadable(path, e)
    state["options"] = json.loads(state["options"])
    state["model_config"] = json.loads(state["model_config"])
    if "init" in state:
        state["init"] = json.loads(state["init"])
    if "classes" in state:
        state["classes"] = json.loads(state["classes"])
    return state


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at, without reading its tensors (memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # unpickling refusals and corrupt files alike
        _unreadable(path, e)
    return int(state["step"])


def _export(out_dir: Path, method: Method, cfg: ModelConfig, options: TrainOptions, step: int,
            total: int, data_dir: Path, n_images: int, compute: dict[str, Any],
            init: dict[str, Any] | None = None, stopped_by: str | None = None) -> None:
    """Write the base backbone as a model directory (loads into plain timm).

    Provenance holds names, model ids, image and step counts, never a path of this machine:
    ``data.name`` and ``training.init_from`` are base names, ``training.init`` summarises the
    model this run started from and ``training.stages`` lists every earlier run of the
    ``--init-from`` chain, oldest first (docs/DESIGN.md, "Model directory"). ``stopped_by``
    says why the run ended ("steps", "minutes"; None while it runs or after --stop-at-step).
    """
    # ``method`` names the paper (as before --method existed); ``method_option`` is the --method value.
    chosen = {k: v for k, v in asdict(options).items() if k != "method"}
    training = {"method": method.title, "steps": step, "total_steps": total, **chosen,
                "method_option": method.name, "init_from": _provenance_name(options.init_from),
                "stopped_by": stopped_by, "compute": compute}
    if init:  # scrubbed again: the checkpoint of a run started by an older version holds paths
        summary = {k: v for k, v in init.items() if k != "stages"}
        training["init"] = _scrubbed_training({"init": summary})["init"]
        training["stages"] = [_scrubbed_stage(s) for s in init.get("stages", [])]
    meta = {"training": training, "data": {"name": _provenance_name(data_dir), "images": n_images}}
    Encoder(copy.deepcopy(method.backbone), cfg, meta=meta, device="cpu").save(out_dir, overwrite=True)


def _provenance_name(spec: str | os.PathLike | None) -> str | None:
    """What provenance records for a folder: its base name (``default``, the shipped model, stays
    ``default``), never the path."""
    if spec is None:
        return None
    if str(spec) == "default":
        return "default"
    return Path(spec).expanduser().resolve().name or "root"


def _scrubbed_training(training: dict[str, Any]) -> dict[str, Any]:
    """A ``training`` record with the paths that earlier filterkit versions wrote (``init_from``,
    ``init.from``) replaced by base names, and without its ``stages`` (the caller lists them)."""
    t = {k: v for k, v in training.items() if k != "stages"}
    if t.get("init_from"):
        t["init_from"] = _provenance_name(t["init_from"])
    if isinstance(t.get("init"), dict):
        old = t["init"]
        t["init"] = {**({"name": _provenance_name(old["from"])} if old.get("from") else {}),
                     **{k: v for k, v in old.items() if k != "from"}}
    return t


def _scrubbed_data(data: dict[str, Any] | None) -> dict[str, Any]:
    """A ``data`` record with an older version's ``folder`` path replaced by its base name."""
    data = data or {}
    named = {"name": _provenance_name(data["folder"])} if data.get("folder") else {}
    return {**named, **{k: v for k, v in data.items() if k != "folder"}}


def _scrubbed_stage(stage: dict[str, Any]) -> dict[str, Any]:
    """One entry of ``training.stages``: name, model_id, and that run's training and data records."""
    out = {k: v for k, v in stage.items() if k not in ("training", "data")}
    if stage.get("training"):
        out["training"] = _scrubbed_training(stage["training"])
    if stage.get("data"):
        out["data"] = _scrubbed_data(stage["data"])
    return out


# -- starting from a trained model -------------------------------------------------------------
@dataclass
class _Init:
    config: ModelConfig
    info: dict[str, Any]  # provenance for the new config.json: training.init (+ "stages": training.stages)
    backbone: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor] | None  # the whole method's state when the folder has a checkpoint
    heads: dict[str, Any]  # the checkpoint's _HEAD_KEYS options


def _resolve_init_path(spec: str) -> Path:
    """``default`` names the shipped model unless ./default is a model directory."""
    from ..modeldir import default_model_path

    if spec == "default" and not (Path(spec) / "config.json").is_file():
        return default_model_path()
    return Path(spec)


def _load_init(spec: str) -> _Init:
    """A model directory to continue from: ``default`` is the shipped model. A training folder
    (one with ``training/checkpoint.pt``) gives both encoders and the heads; a plain model
    directory gives the backbone, and the heads start fresh."""
    path = _resolve_init_path(spec)
    encoder = Encoder.load(path, device="cpu")
    training = encoder.meta.get("training") or {}
    data = _scrubbed_data(encoder.meta.get("data"))
    info = {"name": _provenance_name(path), "model_id": encoder.model_id}
    for key in ("steps", "total_steps"):
        if key in training:
            info[key] = training[key]
    if "images" in data:
        info["images"] = data["images"]
    if "name" in data:
        info["data"] = data["name"]
    # The chain of --init-from runs that made the init model, oldest first, ending with it.
    this = {"name": info["name"], "model_id": encoder.model_id,
            **({"training": _scrubbed_training(training)} if training else {}), **({"data": data} if data else {})}
    info["stages"] = [*(_scrubbed_stage(s) for s in training.get("stages") or []), this]
    method_state, heads = None, {}
    if (path / CHECKPOINT).is_file():
        state = load_checkpoint(path / CHECKPOINT)
        method_state = state["model"]
        info["steps"] = int(state["step"])  # the checkpoint may be ahead of the exported model
        heads = {k: state["options"].get(k, _HEAD_DEFAULTS.get(k)) for k in _HEAD_KEYS}
    return _Init(encoder.config, info, encoder.backbone.state_dict(), method_state, heads)


def _apply_init(method: Method, init: _Init, options: TrainOptions) -> str:
    """Load ``init`` into a fresh method; returns what was loaded ("encoders and heads", with
    "(an empty queue)" when only ``--queue`` differs, or "backbone")."""
    same_heads = init.state is not None and all(getattr(options, k) == v for k, v in init.heads.items()
                                                 if k != "queue")
    if same_heads and (options.queue or 0) == (init.heads.get("queue") or 0):
        method.load_state_dict(init.state)
        return "encoders and heads"
    if same_heads:
        # Only the queue's size differs: the trained encoders and heads carry over, the queue
        # (keys of the init run's own batches) starts empty.
        state = {k: v for k, v in init.state.items() if not k.startswith("queue.")}
        missing, unexpected = method.load_state_dict(state, strict=False)
        if unexpected or not all(k.startswith("queue.") for k in missing):
            raise RuntimeError(f"init state does not fit the method: missing {missing}, unexpected {unexpected}")
        return "encoders and heads (an empty queue)"
    # Another method or heads of another shape (or none saved): the backbone (and any EMA copy
    # of it) starts from the init, the heads fresh.
    method.load_backbone(init.backbone)
    return "backbone"


def _options_from_init(options: TrainOptions, init: _Init) -> TrainOptions:
    """Fill what the caller left unset from the init model (preset, depth, head shapes, method);
    refuse a preset or depth its architecture contradicts."""
    arch, spec = init.config, options.init_from
    preset = options.preset or arch.preset or preset_for_arch(arch.arch)  # imported weights have none
    if arch.preset is not None and preset != arch.preset:
        raise FilterkitError(f"--init-from {spec} is a {arch.preset} model: --preset {preset} does not "
                             "fit it (leave --preset out)")
    if options.depth is not None and options.depth != arch.depth:
        raise FilterkitError(f"--init-from {spec} has {arch.depth} blocks: --depth {options.depth} does not "
                             "fit it (leave --depth out)")
    depth = arch.depth  # the init model's, never a recipe's
    heads = {k: v for k, v in init.heads.items() if v is not None and getattr(options, k) is None}
    if (options.method or heads.get("method")) != "moco-v3":
        heads.pop("queue", None)  # another method: a moco-v3 queue size does not carry over
    return replace(options, preset=preset, depth=depth, **heads)



def _merge_resume_options(given: TrainOptions, saved: dict[str, Any], images: int | None = None,
                          world: int = 1) -> TrainOptions:
    """The checkpoint's options, except where the caller gave a value (not None); a value that
    would change the schedule must match. A batch the run clamped to a small folder (``images``)
    matches the batch size asked for."""
    merged = dict(saved)
    conflicts = []
    for f in fields(TrainOptions):
        value = getattr(given, f.name)
        if value is None:
            continue  # not given by the caller
        saved_value = saved.get(f.name, DEFAULTS.get(f.name))  # older checkpoints lack newer keys
        if (f.name == "batch_size" and images is not None and saved_value is not None
                and saved_value == min(value, images // world * world)):
            continue  # the same command again: keep the batch the run really trained with
        if f.name in _SCHEDULE_KEYS and saved_value is not None and saved_value != value:
            conflicts.append(f"{f.name} (checkpoint {saved_value!r}, now {value!r})")
        merged[f.name] = value
    if conflicts:
        raise FilterkitError("--resume with options that differ from the checkpoint: " + ", ".join(conflicts)
                             + "; --resume continues the same schedule (give the options it started with, or none). "
                             "To train further with another schedule, start a new run from this one: "
                             "filterkit pretrain FOLDER --init-from RUN --out NEW_RUN")
    return TrainOptions(**merged)
