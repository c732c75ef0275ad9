"""What defines a pretraining run (``TrainOptions``, filled from the preset's recipe, then
DEFAULTS), what it returns, and how it stops."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import FilterkitError
from ..images import Skip
from ..methods.base import Method
from ..presets import TRAIN_DEFAULTS, default_preset, get_preset

# What a field left unset becomes when no recipe sets it (see TrainOptions.resolved).
DEFAULTS = TRAIN_DEFAULTS  # what no recipe sets (presets.py, where the CLI's help reads them too)


@dataclass
class TrainOptions:
    """Everything that defines a pretraining run. ``None`` means "not given": ``resolved``
    fills it from the preset's recipe, else from DEFAULTS. A value given equal to its default
    still counts as given: on --resume a schedule option must match the checkpoint's, and any
    other replaces it."""

    preset: str | None = None  # None: the --init-from model's, else presets.default_preset(device)
    epochs: int | None = None
    max_steps: int | None = None  # the schedules' horizon: min(epochs x steps/epoch, max_steps)
    batch_size: int | None = None  # global batch
    lr: float | None = None  # None: base_lr * batch_size / 256
    base_lr: float | None = None
    weight_decay: float | None = None
    temperature: float | None = None
    queue: int | None = None  # moco-v3's queue of negative keys (moco.py); 0: none, MoCo v3 as published
    momentum: float | None = None
    warmup_epochs: float | None = None
    out_dim: int | None = None
    proj_hidden: int | None = None
    pred_hidden: int | None = None
    predictor: bool | None = None
    freeze_patch_embed: bool | None = None
    min_crop_scale: float | None = None  # recipe's, else 0.08 (the BYOL recipe)
    depth: int | None = None  # override the preset's depth (smaller CPU models)
    method: str | None = None  # filterkit.methods.METHODS; None: DEFAULTS' (moco-v3)
    seed: int | None = None
    checkpoint_every: int | None = None  # steps
    init_from: str | None = None  # a model directory (or "default") to start from instead of random
    data_in_memory: bool | None = None  # decode once to uint8, augment whole batches on the device
    local_crops: int | None = None  # multi-crop's local views per image; DEFAULTS: 0 (two global views only)
    local_crop_size: int | None = None  # their side in px; None: augment.default_local_crop_size
    # A wall-clock budget (train/budget.py): the schedules' horizon is planned to fit it, and the
    # run stops when it is spent. Not a schedule key: the plan is fixed once made (planned_steps),
    # and --minutes given again on --resume only sets a new limit on the total training time.
    minutes: float | None = None
    planned_steps: int | None = None  # set by the plan, never by the caller: caps the horizon

    def resolved(self, device_kind: str) -> TrainOptions:
        preset = self.preset or default_preset(device_kind)
        recipe = get_preset(preset).recipe(device_kind).options()
        values = asdict(self)
        values["preset"] = preset
        for key, value in recipe.items():
            if values.get(key) is None:
                values[key] = value
        for key, value in DEFAULTS.items():
            if values[key] is None:
                values[key] = value
        if values["lr"] is None:
            values["lr"] = values["base_lr"] * values["batch_size"] / 256
        return TrainOptions(**values)


# Options that change what a resumed run computes: they must match the checkpoint.
_SCHEDULE_KEYS = ("preset", "epochs", "max_steps", "batch_size", "lr", "weight_decay", "temperature",
                  "queue", "momentum", "warmup_epochs", "out_dim", "proj_hidden", "pred_hidden", "predictor",
                  "freeze_patch_embed", "min_crop_scale", "depth", "seed", "data_in_memory", "method",
                  "planned_steps", "local_crops", "local_crop_size")


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    images_per_s: float
    knn_top1: list[tuple[int, float]]  # (epoch, accuracy) of the online monitor
    skipped: list[Skip]
    model: Method  # the trained method: backbone, heads and any EMA target
    total_steps: int = 0  # the schedule's length (steps < total_steps: stopped early)
    # "steps": the schedule ran to its end; "minutes": the --minutes budget ran out first;
    # None: stopped by --stop-at-step (a checkpoint to resume from).
    stopped_by: str | None = None
    rank: int = 0  # this process's rank under torchrun: the others wrote nothing and report nothing


class TrainingStopped(FilterkitError):
    """Training stopped on a health check (NaN/inf loss, collapsed features)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C in the training loop, after rank 0 saved a checkpoint of ``step`` to resume from.
    An interrupt before the loop (discovery, decoding) stays a plain KeyboardInterrupt: then
    this call saved nothing."""

    def __init__(self, step: int, checkpoint: Path, rank: int = 0) -> None:
        super().__init__(f"interrupted at step {step}: checkpoint saved to {checkpoint}")
        self.step, self.checkpoint, self.rank = step, checkpoint, rank
