"""The MoCo v3 pretraining loop: data, AdamW with warmup + half-cosine LR, momentum schedule,
mixed precision, checkpoints and resume, monitors, and DDP under ``torchrun``.

Batch and LR under DDP: ``batch_size`` is the *global* batch; each of the W ranks takes
batch_size / W images of every global batch, and lr = base_lr · batch_size / 256 (Goyal et
al.'s linear scaling, as in MoCo v3). The global batches are the same for any W, so a run
on 2 processes sees the same data as a run on 1.

    >>> result = pretrain("./images", "models/mine", TrainOptions(preset="vit-tiny-4-32", epochs=10))
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import BatchTwoViews, TwoViews, store_size, store_transform
from .devices import autocast, autocast_dtype, pick_device
from .encoder import Encoder, build_backbone
from .modeldir import ModelConfig
from .errors import FilterkitError, ImageError
from .fsutil import atomic_write_bytes
from .images import Skip, discover_images, load_image, split_outside_links
from .loader import decode_all, default_workers
from .moco import MoCo, gather_keys, momentum_at
from .presets import TRAIN_DEFAULTS, default_preset, get_preset, preset_for_arch
from .progress import progress_bar

CHECKPOINT = Path("training") / "checkpoint.pt"
LOG = Path("training") / "log.jsonl"
# Collapse floor for the feature std, in units of the healthy 1/sqrt(D). The conv-stem ViT's ReLU
# stem gives every image a large shared component: 0.19 at init and 0.078-0.082 at the end of its
# best CPU run (kNN 0.559), which a floor of 0.1 stopped. A collapsed run falls towards 0.
COLLAPSE_STD = 0.05
# How long the other ranks wait for rank 0's epoch-end kNN monitor: it encodes both kNN sets,
# which can take far longer than a collective may (NCCL's default timeout is 10 min).
MONITOR_WAIT = timedelta(hours=24)

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
    momentum: float | None = None
    warmup_epochs: float | None = None
    out_dim: int | None = None
    proj_hidden: int | None = None
    pred_hidden: int | None = None
    predictor: bool | None = None
    freeze_patch_embed: bool | None = None
    min_crop_scale: float | None = None  # recipe's, else 0.08 (the BYOL recipe)
    depth: int | None = None  # override the preset's depth (smaller CPU models)
    seed: int | None = None
    checkpoint_every: int | None = None  # steps
    init_from: str | None = None  # a model directory (or "default") to start from instead of random
    data_in_memory: bool | None = None  # decode once to uint8, augment whole batches on the device

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
                  "momentum", "warmup_epochs", "out_dim", "proj_hidden", "pred_hidden", "predictor",
                  "freeze_patch_embed", "min_crop_scale", "depth", "seed", "data_in_memory")


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    images_per_s: float
    knn_top1: list[tuple[int, float]]  # (epoch, accuracy) of the online monitor
    skipped: list[Skip]
    model: MoCo  # the trained base + momentum encoders and heads
    total_steps: int = 0  # the schedule's length (steps < total_steps: stopped early)


class TrainingStopped(FilterkitError):
    """Training stopped on a health check (NaN/inf loss, collapsed features)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C in the training loop, after rank 0 saved a checkpoint of ``step`` to resume from.
    An interrupt before the loop (discovery, decoding) stays a plain KeyboardInterrupt: then
    this call saved nothing."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}: checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then half-cosine to 0 at the end."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_step(model: torch.nn.Module, moco: MoCo, optimizer: torch.optim.Optimizer, scaler,
               x1: torch.Tensor, x2: torch.Tensor, lr: float, m: float,
               amp_dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    """One MoCo v3 step: loss on both views, backward, AdamW, then the momentum update.

    ``model`` is ``moco`` or its DDP wrapper. Returns (loss, detached backbone features); a
    non-finite loss returns before the weights are touched. Under DDP a non-finite loss on any
    rank returns a non-finite value (the sum over ranks) on every rank.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(x1.device, amp_dtype):
        loss, features = model(x1, x2)
    loss_value = float(loss.detach())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # The ranks must all return here or all go on: a rank that returned while the others
        # entered backward's gradient all-reduce would leave them waiting for it forever.
        summed = torch.tensor([loss_value], dtype=torch.float64, device=loss.device)
        dist.all_reduce(summed)  # non-finite when any rank's loss is
        if not math.isfinite(float(summed)):
            return float(summed), features
    if not math.isfinite(loss_value):
        return loss_value, features
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    moco.momentum_update(m)
    return loss_value, features


def make_optimizer(moco: MoCo, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: fused kernels on CUDA, multi-tensor (foreach) on CPU."""
    params = [p for p in moco.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused,
                             foreach=None if fused else True)


# -- data --------------------------------------------------------------------------------------
class _TwoViewDataset(Dataset):
    """Items are (index, seed): the seed fixes the sample's augmentations, so a resumed run or
    any number of workers sees exactly the same views. A file that fails to decode is
    replaced by the next one and reported."""

    def __init__(self, paths: list[Path], views: TwoViews, draft_size: int) -> None:
        self.paths, self.views, self.draft_size = paths, views, draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        failures = []
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            try:
                image = load_image(self.paths[i], self.draft_size)
            except ImageError as e:
                failures.append((i, str(e)))
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x1, x2 = self.views(image)
            return x1, x2, failures
        raise FilterkitError("no training image could be decoded")


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit; None
    where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _decode_store(paths: list[Path], img_size: int, workers: int | None, progress: bool,
                  local_world: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[Path], list[Skip]]:
    """Every image decoded once to uint8 [U, 3, S, S] (S = ``store_size``), for
    ``data_in_memory``: (store, store row of each kept path, kept paths, skips). Links to one
    file (a dataset repeated by linking) are decoded and stored once. Each of the
    ``local_world`` processes on this machine holds its own copy; refuses up front when those
    would not fit in half the available memory."""
    file_ids: dict[tuple[int, int], int] = {}
    unique: list[Path] = []
    slot: list[int] = []  # path -> position in ``unique``, -1: unreadable
    unreadable: dict[int, str] = {}
    for n, path in enumerate(paths):
        try:
            st = path.stat()
        except OSError as e:
            unreadable[n] = f"cannot read file: {e.strerror or e}"
            slot.append(-1)
            continue
        key = (st.st_dev, st.st_ino) if st.st_ino else (-1, n)  # some filesystems report inode 0
        if key not in file_ids:
            file_ids[key] = len(unique)
            unique.append(path)
        slot.append(file_ids[key])
    side = store_size(img_size)
    need = len(unique) * 3 * side * side * local_world
    free = available_memory()
    if free is not None and need > free / 2:
        copies = f" x {local_world} processes" if local_world > 1 else ""
        raise FilterkitError(f"--data-in-memory needs {need / 2**30:.1f} GiB for {len(unique)} images at "
                             f"{side} px{copies} but {free / 2**30:.1f} GiB is available: leave it out to "
                             "decode per step, or train on fewer images")
    if workers is None and local_world > 1:  # the processes of one machine share its cores
        workers = max(1, default_workers() // local_world)
    with progress_bar(f"decode to memory ({need / local_world / 2**30:.2f} GiB)", len(unique), progress) as advance:
        store, kept, failures = decode_all(unique, store_transform(side), side, workers=workers,
                                           on_batch=advance)
    row_of = {u: row for row, u in enumerate(kept)}
    failed = {f.index: f.reason for f in failures}
    rows = [row_of[u] for u in slot if u in row_of]
    kept_paths = [p for p, u in zip(paths, slot) if u in row_of]
    skips = [Skip(p, unreadable[n] if u < 0 else failed[u]) for n, (p, u) in enumerate(zip(paths, slot))
             if u not in row_of]
    return store, torch.tensor(rows, dtype=torch.long), kept_paths, skips


def _memory_batches(store: torch.Tensor, rows: torch.Tensor, views: BatchTwoViews, sampler: Sampler,
                    per_rank: int, device: torch.device):
    """This rank's batches of the in-memory store, in the sampler's order, augmented on
    ``device``. The generator is seeded by the batch's first sample seed, so a resumed run sees
    the same views (a run on another number of processes draws them differently)."""
    items = iter(sampler)
    while len(chunk := list(itertools.islice(items, per_rank))) == per_rank:
        index = rows[torch.tensor([i for i, _ in chunk])]
        g = torch.Generator().manual_seed(chunk[0][1] % 2**63)  # parameters are drawn on the CPU
        x1, x2 = views(store[index].to(device, non_blocking=True), g)
        yield x1, x2, []


def _collate(items):
    x1 = torch.stack([it[0] for it in items])
    x2 = torch.stack([it[1] for it in items])
    return x1, x2, [f for it in items for f in it[2]]


class _EpochSampler(Sampler):
    """This rank's share of each global batch of one epoch, from ``start_batch`` on."""

    def __init__(self, n: int, global_batch: int, steps: int, epoch: int, seed: int,
                 start_batch: int, rank: int, world: int) -> None:
        self.n, self.global_batch, self.steps, self.epoch = n, global_batch, steps, epoch
        self.seed, self.start_batch, self.rank, self.world = seed, start_batch, rank, world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.global_batch // self.world
        for b in range(self.start_batch, self.steps):
            lo = b * self.global_batch + self.rank * per_rank
            for j in range(lo, lo + per_rank):
                # The sample seed depends on (run seed, epoch, position), not on the worker.
                yield order[j], (self.seed * 1_000_003 + self.epoch) * 10_000_019 + j

    def __len__(self) -> int:
        return (self.steps - self.start_batch) * (self.global_batch // self.world)


# -- distributed -------------------------------------------------------------------------------
def _dist_setup(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    nccl on GPUs, gloo on CPU. A single process never needs torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(device_name)
    device = pick_device(device_name)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# -- checkpoints -------------------------------------------------------------------------------
def _save_checkpoint(out_dir: Path, moco: MoCo, optimizer, scaler, step: int, options: TrainOptions,
                     cfg: ModelConfig, wall_seconds: float = 0.0, init: dict[str, Any] | None = None,
                     images: int | None = None) -> None:
    import io

    state = {
        "model": moco.state_dict(),
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
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (out_dir / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / CHECKPOINT, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded without unpickling code (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refusals and corrupt files alike
        raise FilterkitError(f"cannot load training checkpoint {path}: {str(e).splitlines()[0]}") from None
    state["options"] = json.loads(state["options"])
    state["model_config"] = json.loads(state["model_config"])
    if "init" in state:
        state["init"] = json.loads(state["init"])
    return state


def _export(out_dir: Path, moco: MoCo, cfg: ModelConfig, options: TrainOptions, step: int,
            total: int, data_dir: Path, n_images: int, compute: dict[str, Any],
            init: dict[str, Any] | None = None) -> None:
    """Write the base backbone as a model directory (loads into plain timm).

    Provenance holds names, model ids, image and step counts, never a path of this machine:
    ``data.name`` and ``training.init_from`` are base names, ``training.init`` summarises the
    model this run started from and ``training.stages`` lists every earlier run of the
    ``--init-from`` chain, oldest first (docs/DESIGN.md, "Model directory").
    """
    training = {"method": "MoCo v3", "steps": step, "total_steps": total, **asdict(options),
                "init_from": _provenance_name(options.init_from), "compute": compute}
    if init:  # scrubbed again: the checkpoint of a run started by an older version holds paths
        summary = {k: v for k, v in init.items() if k != "stages"}
        training["init"] = _scrubbed_training({"init": summary})["init"]
        training["stages"] = [_scrubbed_stage(s) for s in init.get("stages", [])]
    meta = {"training": training, "data": {"name": _provenance_name(data_dir), "images": n_images}}
    Encoder(copy.deepcopy(moco.base.backbone), cfg, meta=meta, device="cpu").save(out_dir, overwrite=True)


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
    moco: dict[str, torch.Tensor] | None  # the whole MoCo state when the folder has a checkpoint
    heads: dict[str, Any]  # the checkpoint's head options (out_dim, hidden widths, predictor)


def _resolve_init_path(spec: str) -> Path:
    """``default`` names the shipped model unless ./default is a model directory."""
    from .modeldir import default_model_path

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
    moco_state, heads = None, {}
    if (path / CHECKPOINT).is_file():
        state = load_checkpoint(path / CHECKPOINT)
        moco_state = state["model"]
        info["steps"] = int(state["step"])  # the checkpoint may be ahead of the exported model
        heads = {k: state["options"].get(k) for k in ("out_dim", "proj_hidden", "pred_hidden", "predictor")}
    return _Init(encoder.config, info, encoder.backbone.state_dict(), moco_state, heads)


def _apply_init(moco: MoCo, init: _Init, options: TrainOptions) -> str:
    """Load ``init`` into a fresh MoCo; returns what was loaded ("encoders and heads" or "backbone")."""
    same_heads = init.moco is not None and all(getattr(options, k) == v for k, v in init.heads.items())
    if same_heads:
        moco.load_state_dict(init.moco)
        return "encoders and heads"
    # Heads of another shape (or none saved): both encoders start from the backbone, heads fresh.
    moco.base.backbone.load_state_dict(init.backbone)
    moco.momentum.backbone.load_state_dict(init.backbone)
    return "backbone"


def _options_from_init(options: TrainOptions, init: _Init) -> TrainOptions:
    """Fill what the caller left unset from the init model (preset, depth, head shapes);
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
    return replace(options, preset=preset, depth=depth, **heads)


# -- the loop ----------------------------------------------------------------------------------
def pretrain(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: TrainOptions | None = None,
    *,
    resume: bool = False,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    knn_train: str | os.PathLike | None = None,
    knn_test: str | os.PathLike | None = None,
    knn_max_per_class: int | None = None,
    json_log: str | os.PathLike | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
    collapse_patience: int = 5,
    follow_symlinks: bool = False,
) -> TrainResult:
    """Pretrain a ViT with MoCo v3 on the images under ``data_dir``; write ``out_dir``.

    ``stop_at_step`` stops after that many steps as an interruption would, leaving a
    checkpoint that ``resume=True`` continues from.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    rank, world, dev = _dist_setup(device)
    is_main = rank == 0
    options = (options or TrainOptions())

    checkpoint = None
    if resume and options.init_from:
        raise FilterkitError("--init-from starts a new run and --resume continues OUT's own checkpoint: "
                             "give one or the other")
    if resume:
        if not (out_dir / CHECKPOINT).is_file():
            raise FilterkitError(f"nothing to resume: {out_dir / CHECKPOINT} does not exist")
        checkpoint = load_checkpoint(out_dir / CHECKPOINT)
        options = _merge_resume_options(options, checkpoint["options"], checkpoint.get("images"), world)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise FilterkitError(f"{out_dir} already holds files: pass --resume to continue its training, "
                             "or choose a new --out folder")
    init = None
    if options.init_from and checkpoint is None:
        init = _load_init(options.init_from)
        options = _options_from_init(options, init)
    lr_given = options.lr is not None
    options = options.resolved(dev.type)
    if options.batch_size % world:
        raise FilterkitError(f"--batch-size {options.batch_size} does not divide by {world} processes")
    if options.batch_size < 2 * world:  # each process's projector batch-normalises its share
        per = "" if world == 1 else f" for {world} processes (2 per process)"
        raise FilterkitError(f"--batch-size {options.batch_size} is too small: pretraining needs at least "
                             f"{2 * world}{per}")

    if checkpoint is not None:
        cfg = ModelConfig.from_dict(checkpoint["model_config"])
    elif init is not None:
        cfg = init.config  # the architecture is the init model's, whatever its origin
    else:
        cfg = ModelConfig.from_preset(options.preset, **({"depth": options.depth} if options.depth else {}))

    paths = discover_images(data_dir, follow_symlinks=follow_symlinks)
    refused: list[Skip] = []
    if not follow_symlinks:
        paths, refused = split_outside_links(paths, data_dir)
    if len(paths) < 2:
        note = f" ({len(refused)} symlinks to files outside it were not read: pass --follow-symlinks)" if refused else ""
        raise FilterkitError(f"{data_dir} has {len(paths)} images{note}; pretraining needs at least 2")
    _check_decodable(paths)
    store = None
    if options.data_in_memory:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        store, store_rows, paths, failed = _decode_store(paths, cfg.img_size, workers, progress and is_main,
                                                         local_world)
        refused += failed
        if len(paths) < 2:
            reason = f" (e.g. {failed[0].path.name}: {failed[0].reason})" if failed else ""
            raise FilterkitError(f"{data_dir}: only {len(paths)} images decode{reason}; pretraining needs at least 2")
    # The image count sets the steps per epoch, and with them the data order and the schedules.
    # Checkpoints from before the count was stored resume as they always did.
    if checkpoint is not None and checkpoint.get("images", len(paths)) != len(paths):
        raise FilterkitError(f"{data_dir} has {len(paths)} training images but the checkpoint was trained on "
                             f"{checkpoint['images']}: resuming would change the steps per epoch and shift the "
                             "schedules. Resume on the same images, or start a new --out")
    if len(paths) < 2 * world:  # each process's batch needs 2 images (its projector's batch norm)
        raise FilterkitError(f"{data_dir} has {len(paths)} images for {world} processes; pretraining needs at "
                             "least 2 per process: use fewer processes or more images")
    global_batch = min(options.batch_size, len(paths) // world * world)
    if global_batch < options.batch_size:  # a folder smaller than one batch: the LR follows the real batch
        options = replace(options, batch_size=global_batch,
                          lr=options.lr if lr_given else options.base_lr * global_batch / 256)
    steps_per_epoch = len(paths) // global_batch
    total = steps_per_epoch * options.epochs
    if options.max_steps:
        total = min(total, options.max_steps)
    warmup_steps = int(round(options.warmup_epochs * steps_per_epoch))

    torch.manual_seed(options.seed)
    backbone = build_backbone(cfg)
    if options.freeze_patch_embed:  # MoCo v3's stability trick: a fixed random patch projection
        backbone.patch_embed.requires_grad_(False)
    moco = MoCo(backbone, cfg.embed_dim, options.out_dim, options.proj_hidden, options.pred_hidden,
                options.temperature, options.predictor).to(dev)
    amp_dtype = autocast_dtype(dev, precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    optimizer = make_optimizer(moco, options.lr, options.weight_decay, dev)
    start = 0
    init_info = checkpoint.get("init") if checkpoint is not None else None
    if init is not None:
        init_info = {**init.info, "loaded": _apply_init(moco, init, options)}
    if checkpoint is not None:
        moco.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng_cpu"])
        if checkpoint["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])
        start = int(checkpoint["step"])

    model: torch.nn.Module = moco
    if world > 1:
        if dev.type == "cuda":  # SyncBatchNorm needs a GPU backend; gloo runs keep per-rank BN
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    workers = default_workers() if workers is None else workers
    if store is None:
        dataset = _TwoViewDataset(paths, TwoViews(cfg.img_size, options.min_crop_scale, cfg.mean, cfg.std),
                                  cfg.img_size)
    else:
        batch_views = BatchTwoViews(cfg.img_size, options.min_crop_scale, cfg.mean, cfg.std)
    log_path = Path(json_log) if json_log else out_dir / LOG
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
    if is_main and start and log_path.is_file():
        _truncate_log(log_path, start)
    log = open(log_path, "a", encoding="utf-8") if is_main else None

    knn_sets = None
    if knn_train and knn_test and is_main:
        from .evaluate import labelled_images

        knn_sets = (labelled_images(knn_train, knn_max_per_class), labelled_images(knn_test, knn_max_per_class))
    # While rank 0 runs the monitor the other ranks wait at a barrier of a gloo group of their
    # own, whose timeout bounds only that wait: waiting in the next step's collective instead
    # would trip the training group's timeout, which stays short to catch real hangs.
    monitor_wait = None
    if knn_train and knn_test and world > 1:
        monitor_wait = dist.new_group(backend="gloo", timeout=MONITOR_WAIT)
    knn_history: list[tuple[int, float]] = []
    skipped: dict[int, str] = {}
    low_std_checks = 0
    loss_value = float("nan")
    images_done, t_start = 0, time.perf_counter()
    dim = cfg.embed_dim

    prior_seconds = float(checkpoint.get("wall_seconds", 0.0)) if checkpoint is not None else 0.0

    def save(step: int) -> None:
        if is_main:
            wall = prior_seconds + time.perf_counter() - t_start  # over resumes too
            _save_checkpoint(out_dir, moco, optimizer, scaler, step, options, cfg, wall, init_info, len(paths))
            device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
            precision_used = "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
            compute = {"device": device_name, "processes": world, "torch_threads": torch.get_num_threads(),
                       "precision": precision_used, "wall_seconds": round(wall, 1)}
            _export(out_dir, moco, cfg, options, step, total, data_dir, len(paths), compute, init_info)

    step = start
    try:
        with progress_bar("pretrain", (total - start) * global_batch, progress and is_main) as advance:
            while step < total and (stop_at_step is None or step < stop_at_step):
                epoch = step // steps_per_epoch
                sampler = _EpochSampler(len(paths), global_batch, steps_per_epoch, epoch, options.seed,
                                        step - epoch * steps_per_epoch, rank, world)
                if store is None:
                    loader = DataLoader(dataset, batch_size=global_batch // world, sampler=sampler,
                                        num_workers=workers, collate_fn=_collate, drop_last=True,
                                        pin_memory=dev.type == "cuda", prefetch_factor=4 if workers else None)
                else:
                    loader = _memory_batches(store, store_rows, batch_views, sampler, global_batch // world, dev)
                t_last = time.perf_counter()
                for x1, x2, failures in loader:
                    skipped.update(failures)
                    lr = lr_at(step, total, warmup_steps, options.lr)
                    m = momentum_at(step, total, options.momentum)
                    loss_value, feats = train_step(model, moco, optimizer, scaler, x1.to(dev, non_blocking=True),
                                                   x2.to(dev, non_blocking=True), lr, m, amp_dtype)
                    if not math.isfinite(loss_value):
                        raise TrainingStopped(
                            f"loss became {loss_value} at step {step}: stopping. Lower --lr, try "
                            "--freeze-patch-embed, or --resume from the last checkpoint")
                    step += 1
                    # Over the global batch (all ranks' features), as one process would see it:
                    # every rank then takes the same collapse decision.
                    feature_std = float(gather_keys(F.normalize(feats.float(), dim=1))[0].std(dim=0).mean())
                    # Collapse: every image maps to one point. Judged after warmup only, since a
                    # random-init ViT already maps images close together.
                    if step > warmup_steps and feature_std < COLLAPSE_STD / math.sqrt(dim):
                        low_std_checks += 1
                        if low_std_checks >= collapse_patience:
                            raise TrainingStopped(
                                f"features collapsed at step {step}: std {feature_std:.2e} < {COLLAPSE_STD}/sqrt({dim}) "
                                f"for {low_std_checks} steps. Lower --lr or raise --temperature")
                    else:
                        low_std_checks = 0
                    images_done += global_batch
                    now = time.perf_counter()
                    rate = global_batch / max(now - t_last, 1e-9)  # data wait included
                    t_last = now
                    if log:
                        log.write(json.dumps({"step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                                              "momentum": m, "images_per_s": rate,
                                              "feature_std": feature_std,
                                              "feature_std_healthy": 1 / math.sqrt(dim)}) + "\n")
                        log.flush()
                    advance(global_batch, description=f"epoch {epoch + 1}/{math.ceil(total / steps_per_epoch)} "
                                                      f"loss {loss_value:.3f}")
                    if step % options.checkpoint_every == 0 and step < total:
                        save(step)
                    if step % steps_per_epoch == 0 and knn_sets:
                        acc = _knn_monitor(moco, cfg, knn_sets, workers)
                        knn_history.append((step // steps_per_epoch, acc))
                        if log:
                            log.write(json.dumps({"step": step, "epoch": step // steps_per_epoch, "knn_top1": acc}) + "\n")
                            log.flush()
                    if step % steps_per_epoch == 0 and monitor_wait is not None:
                        dist.barrier(group=monitor_wait)
                    if step >= total or (stop_at_step is not None and step >= stop_at_step):
                        break
                if stop_at_step is not None and step >= stop_at_step:
                    break
    except KeyboardInterrupt:
        save(step)
        raise TrainingInterrupted(step, out_dir / CHECKPOINT) from None
    finally:
        if log:
            log.close()
        if monitor_wait is not None:
            dist.destroy_process_group(monitor_wait)
    save(step)
    elapsed = time.perf_counter() - t_start
    return TrainResult(out_dir, step, loss_value, images_done / max(elapsed, 1e-9), knn_history,
                       refused + [Skip(paths[i], r) for i, r in sorted(skipped.items())], moco, total)


def _knn_monitor(moco: MoCo, cfg: ModelConfig, knn_sets, workers: int) -> float:
    from .evaluate import encoder_knn_top1

    backbone = copy.deepcopy(moco.base.backbone)
    encoder = Encoder(backbone, cfg, device=str(next(backbone.parameters()).device))
    return encoder_knn_top1(encoder, *knn_sets, workers=workers)


def _check_decodable(paths: list[Path]) -> None:
    """Fail early, in one line, when no image decodes (workers would fail mid-epoch instead)."""
    reasons = []
    for path in paths:
        try:
            load_image(path, draft_size=32)
            return
        except ImageError as e:
            reasons.append(f"{path.name}: {e}")
    raise FilterkitError(f"none of the {len(paths)} images decodes (e.g. {reasons[0]})")


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from (they will be run again)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode("utf-8"))


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
        raise FilterkitError("--resume with options that differ from the checkpoint: " + ", ".join(conflicts))
    return TrainOptions(**merged)
