"""The pretraining loop: prepare (options, data, method, optimiser, resume state), then the
steps, with a ``Monitor`` after each. The loop runs any ``methods.base.Method`` the same way.

Batch and LR under DDP: ``batch_size`` is the *global* batch; each of the W ranks takes
batch_size / W images of every global batch, and lr = base_lr · batch_size / 256 (Goyal et
al.'s linear scaling, as in MoCo v3). The global batches are the same for any W, so a run
on 2 processes sees the same data as a run on 1.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..augment import LOCAL_MIN_SCALE, default_local_crop_size
from ..devices import autocast, autocast_dtype, pick_device
from ..encoder import build_backbone
from ..errors import FilterkitError, WorkerDied
from ..images import Skip
from ..loader import default_workers, start_workers, worker_deaths_as_errors
from ..methods import METHODS, build_method, method_class
from ..methods.base import Method
from ..moco import momentum_at
from ..modeldir import ModelConfig
from ..progress import progress_bar
from .budget import (
    PROBE_SHARE,
    PROBE_STEPS,
    REPLAN_AT,
    REPLAN_MIN_STEPS,
    REPLAN_TOLERANCE,
    epoch_start_seconds,
    epoch_starts,
    plan_options,
    planned_steps,
    replanned_steps,
    step_seconds,
)
from .checkpoints import (
    CHECKPOINT,
    _apply_init,
    _export,
    _Init,
    _load_init,
    _merge_resume_options,
    _options_from_init,
    _save_checkpoint,
    load_checkpoint,
)
from .data import Batches, _EpochSampler, folder_labels, load_images
from .monitor import LOG, Monitor, _truncate_log
from .options import TrainingInterrupted, TrainOptions, TrainResult


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then half-cosine to 0 at the end."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_step(model: torch.nn.Module, method: Method, optimizer: torch.optim.Optimizer, scaler,
               x1: torch.Tensor, x2: torch.Tensor, lr: float, m: float,
               amp_dtype: torch.dtype | None, labels: torch.Tensor | None = None,
               local_views: Sequence[torch.Tensor] = ()) -> tuple[float, torch.Tensor]:
    """One step of any method: loss on both views, backward, AdamW, then the momentum update
    (a no-op for a method without an EMA target). ``labels`` go to a method that
    ``needs_labels`` (SupCon), as ``labels=``; ``local_views`` (multi-crop) to a method that
    ``supports_local_crops``, as ``local_views=``, only when there are any; otherwise the
    method is called with the two views only.

    ``model`` is ``method`` or its DDP wrapper. Returns (loss, detached backbone features); a
    non-finite loss returns before the weights are touched. Under DDP a non-finite loss on any
    rank returns a non-finite value (the sum over ranks) on every rank.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    extra: dict[str, Any] = {} if labels is None else {"labels": labels}
    if local_views:
        extra["local_views"] = list(local_views)
    with autocast(x1.device, amp_dtype):
        loss, features = model(x1, x2, **extra)
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
    method.momentum_update(m)
    return loss_value, features


def make_optimizer(method: Method, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: fused kernels on CUDA, multi-tensor (foreach) on CPU."""
    params = [p for p in method.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused,
                             foreach=None if fused else True)


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


@dataclass
class _Replan:
    """A fresh --minutes run's re-planning state (``_replan``)."""

    cap: int  # the horizon the caller's --max-steps / --epochs allow
    warmup_given: bool  # --warmup-epochs given: kept as given
    marks: list[float]  # the shares of REPLAN_AT not reached yet
    epoch_start_s: float  # the probe's: what starting an epoch adds
    first_step: int  # the step the session started at (the progress bar counts from it)
    start: tuple[int, float] | None = None  # (step, training seconds) once the session's first step is done


@dataclass
class _Run:
    """Everything ``_prepare`` settled for one call of ``pretrain``."""

    options: TrainOptions
    cfg: ModelConfig
    data_dir: Path
    out_dir: Path
    rank: int
    world: int
    device: torch.device
    paths: list[Path]
    refused: list[Skip]
    global_batch: int
    steps_per_epoch: int
    total: int
    warmup_steps: int
    method: Method
    model: torch.nn.Module  # ``method``, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: Any
    amp_dtype: torch.dtype | None
    step: int  # steps done: the checkpoint's on resume; the loop advances it
    init_info: dict[str, Any] | None
    prior_seconds: float  # training time of the runs this one resumes
    classes: list[str] | None = None  # a supervised method's classes (sub-folder names), label order
    stopped_by: str | None = None  # TrainResult.stopped_by, once the loop has ended
    replan: _Replan | None = None  # a fresh --minutes run's: the plan follows the run's own pace

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_options(options: TrainOptions, out_dir: Path, resume: bool, world: int,
                     device_kind: str) -> tuple[TrainOptions, dict | None, _Init | None, bool]:
    """(resolved options, checkpoint to resume, model to start from, whether --lr was given),
    refusing what cannot run before any work is done."""
    checkpoint = None
    if out_dir.exists() and not out_dir.is_dir():
        raise FilterkitError(f"--out {out_dir} exists and is not a folder")
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
    if options.minutes is not None and not (options.minutes > 0 and math.isfinite(options.minutes)):
        raise FilterkitError(f"--minutes must be a positive number of minutes, got {options.minutes:g}")
    lr_given = options.lr is not None
    options = check_options(options, world, device_kind)
    return options, checkpoint, init, lr_given


def check_options(options: TrainOptions, world: int, device_kind: str) -> TrainOptions:
    """``options`` resolved for ``device_kind``, refusing what cannot run with ``world``
    processes whatever the data and output folder (``compare-methods`` asks before it touches
    its --out)."""
    options = options.resolved(device_kind)
    if not isinstance(options.queue, int) or options.queue < 0:
        raise FilterkitError(f"--queue must be 0 (no queue) or a positive number of keys, got {options.queue}")
    if options.queue and options.method != "moco-v3":
        raise FilterkitError(f"--queue {options.queue} is moco-v3's queue of negative keys: --method "
                             f"{options.method} does not take it (leave out --queue)")
    if method_class(options.method).needs_predictor and not options.predictor:
        raise FilterkitError(f"--method {options.method} trains through its predictor: leave out --no-predictor")
    _check_local_crops(options)
    if options.batch_size % world:
        raise FilterkitError(f"--batch-size {options.batch_size} does not divide by {world} processes")
    if options.batch_size < 2 * world:  # each process's projector batch-normalises its share
        per = "" if world == 1 else f" for {world} processes (2 per process)"
        raise FilterkitError(f"--batch-size {options.batch_size} is too small: pretraining needs at least "
                             f"{2 * world}{per}")
    return options


def _check_local_crops(options: TrainOptions) -> None:
    """Refuse multi-crop where it cannot run, before any work (the size: ``_local_crop_size``)."""
    if options.local_crops < 0:
        raise FilterkitError(f"--local-crops must be 0 or more, got {options.local_crops}")
    if not options.local_crops:
        if options.local_crop_size is not None:
            raise FilterkitError("--local-crop-size sets the side of the local views: give --local-crops N too")
        return
    if not method_class(options.method).supports_local_crops:
        supported = ", ".join(name for name in METHODS if method_class(name).supports_local_crops)
        raise FilterkitError(f"--local-crops is not supported by {options.method} (it is by {supported})")
    if options.min_crop_scale <= LOCAL_MIN_SCALE:
        raise FilterkitError(f"--local-crops crops its local views from {LOCAL_MIN_SCALE} of the image area up to "
                             f"--min-crop-scale, which is {options.min_crop_scale:g}: raise --min-crop-scale above "
                             f"{LOCAL_MIN_SCALE} (SwAV uses 0.14)")


def _local_crop_size(options: TrainOptions, cfg: ModelConfig) -> TrainOptions:
    """Fill in and check the local views' side for the backbone ``cfg`` (multi-crop only)."""
    if not options.local_crops:
        return options
    stride = cfg.token_stride
    size = options.local_crop_size or default_local_crop_size(cfg.img_size, stride)
    if size % stride or not stride <= size < cfg.img_size:
        raise FilterkitError(f"--local-crop-size {size} does not fit the {cfg.img_size} px model: a local view's "
                             f"side must be a multiple of its {stride} px per token and smaller than {cfg.img_size} "
                             f"(e.g. {default_local_crop_size(cfg.img_size, stride)})")
    return replace(options, local_crop_size=size)


def _schedule(options: TrainOptions, data_dir: Path, images: int, world: int, lr_given: bool,
              checkpoint: dict | None) -> tuple[TrainOptions, int, int, int, int]:
    """(options, global batch, steps per epoch, total steps, warmup steps) for ``images``."""
    # The image count sets the steps per epoch, and with them the data order and the schedules.
    # Checkpoints from before the count was stored resume as they always did.
    if checkpoint is not None and checkpoint.get("images", images) != images:
        raise FilterkitError(f"{data_dir} has {images} training images but the checkpoint was trained on "
                             f"{checkpoint['images']}: resuming would change the steps per epoch and shift the "
                             "schedules. Resume on the same images, or start a new --out")
    if images < 2 * world:  # each process's batch needs 2 images (its projector's batch norm)
        raise FilterkitError(f"{data_dir} has {images} images for {world} processes; pretraining needs at "
                             "least 2 per process: use fewer processes or more images")
    global_batch = min(options.batch_size, images // world * world)
    if global_batch < options.batch_size:  # a folder smaller than one batch: the LR follows the real batch
        options = replace(options, batch_size=global_batch,
                          lr=options.lr if lr_given else options.base_lr * global_batch / 256)
    steps_per_epoch = images // global_batch
    total = steps_per_epoch * options.epochs
    if options.max_steps:
        total = min(total, options.max_steps)
    if options.planned_steps:  # a --minutes run's plan (budget.plan_options), kept on --resume
        total = min(total, options.planned_steps)
    warmup_steps = int(round(options.warmup_epochs * steps_per_epoch))
    return options, global_batch, steps_per_epoch, total, warmup_steps


def _build(options: TrainOptions, cfg: ModelConfig, checkpoint: dict | None, init: _Init | None,
           dev: torch.device, precision: str, world: int):
    """(method, model to step, optimiser, scaler, amp dtype, steps done, init provenance): fresh
    from the seed, then the init model's or the checkpoint's state."""
    torch.manual_seed(options.seed)
    backbone = build_backbone(cfg)
    if options.freeze_patch_embed:  # MoCo v3's stability trick: a fixed random patch projection
        backbone.patch_embed.requires_grad_(False)
    method = build_method(options.method, backbone, cfg.embed_dim, options).to(dev)
    amp_dtype = autocast_dtype(dev, precision, training=True)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    optimizer = make_optimizer(method, options.lr, options.weight_decay, dev)
    start = 0
    init_info = checkpoint.get("init") if checkpoint is not None else None
    if init is not None:
        init_info = {**init.info, "loaded": _apply_init(method, init, options)}
    if checkpoint is not None:
        method.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng_cpu"])
        if checkpoint["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])
        start = int(checkpoint["step"])
    model: torch.nn.Module = method
    if world > 1:
        if dev.type == "cuda":  # SyncBatchNorm needs a GPU backend; gloo runs keep per-rank BN
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return method, model, optimizer, scaler, amp_dtype, start, init_info


def _prepare(data_dir: Path, out_dir: Path, options: TrainOptions, resume: bool, device: str, precision: str,
             workers: int | None, progress: bool, follow_symlinks: bool) -> tuple[_Run, Batches]:
    """The run ``pretrain`` will step, and its batches."""
    rank, world, dev = _dist_setup(device)
    options, checkpoint, init, lr_given = _resolve_options(options, out_dir, resume, world, dev.type)
    if checkpoint is not None:
        cfg = ModelConfig.from_dict(checkpoint["model_config"])
    elif init is not None:
        cfg = init.config  # the architecture is the init model's, whatever its origin
    else:
        cfg = ModelConfig.from_preset(options.preset, **({"depth": options.depth} if options.depth else {}))
    options = _local_crop_size(options, cfg)
    paths, refused, store, store_rows = load_images(data_dir, follow_symlinks, options.data_in_memory,
                                                    cfg.img_size, workers, progress and rank == 0, world)
    classes = labels = None
    if method_class(options.method).needs_labels:
        classes, labels = folder_labels(data_dir, paths, options.method)
        saved = checkpoint.get("classes") if checkpoint is not None else None
        if saved is not None and saved != classes:  # the same label index must mean the same class
            raise FilterkitError(f"{data_dir} has the classes {', '.join(classes)} but the checkpoint was trained on "
                                 f"{', '.join(saved)}: resume on the same folders, or start a new --out")
    options, global_batch, steps_per_epoch, total, warmup_steps = _schedule(options, data_dir, len(paths), world,
                                                                            lr_given, checkpoint)
    method, model, optimizer, scaler, amp_dtype, start, init_info = _build(options, cfg, checkpoint, init, dev,
                                                                           precision, world)
    prior_seconds = float(checkpoint.get("wall_seconds", 0.0)) if checkpoint is not None else 0.0
    run = _Run(options, cfg, data_dir, out_dir, rank, world, dev, paths, refused, global_batch, steps_per_epoch,
               total, warmup_steps, method, model, optimizer, scaler, amp_dtype, start, init_info, prior_seconds,
               classes)
    batches = Batches(paths, store, store_rows, cfg.img_size, options.min_crop_scale, cfg.mean, cfg.std,
                      global_batch // world, default_workers() if workers is None else workers, dev, labels,
                      options.local_crops, options.local_crop_size)
    return run, batches


def _open_monitor(run: _Run, json_log, knn_train, knn_test, knn_max_per_class, collapse_patience: int) -> Monitor:
    """Rank 0 writes the log (from the checkpoint's step on) and loads the kNN sets."""
    log_path = Path(json_log) if json_log else run.out_dir / LOG
    if run.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
    if run.is_main and run.step and log_path.is_file():
        _truncate_log(log_path, run.step)
    knn_sets = None
    if knn_train and knn_test and run.is_main:
        from ..evaluate import labelled_images

        knn_sets = (labelled_images(knn_train, knn_max_per_class), labelled_images(knn_test, knn_max_per_class))
    return Monitor(log_path if run.is_main else None, run.cfg.embed_dim, run.warmup_steps, collapse_patience,
                   knn_sets=knn_sets, wait_for_knn=bool(knn_train and knn_test and run.world > 1),
                   prior_seconds=run.prior_seconds)


def _save(run: _Run, monitor: Monitor) -> None:
    """Rank 0 writes the checkpoint of ``run.step`` and exports the model directory."""
    if not run.is_main:
        return
    wall = monitor.wall_seconds()
    _save_checkpoint(run.out_dir, run.method, run.optimizer, run.scaler, run.step, run.options, run.cfg, wall,
                     run.init_info, len(run.paths), run.classes)
    dev = run.device
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    precision_used = "fp32" if run.amp_dtype is None else str(run.amp_dtype).removeprefix("torch.")
    compute = {"device": device_name, "processes": run.world, "torch_threads": torch.get_num_threads(),
               "precision": precision_used, "wall_seconds": round(wall, 1)}
    _export(run.out_dir, run.method, run.cfg, run.options, run.step, run.total, run.data_dir, len(run.paths),
            compute, run.init_info, run.stopped_by)


def _probe(run: _Run, batches: Batches) -> tuple[float, float, float]:
    """(seconds per training step, seconds an epoch start adds, seconds the probe took), for a
    --minutes plan: a few steps of a throwaway copy of the method (lr 0) on the run's first
    batches, the RNG restored after, so that the run itself is exactly the --max-steps run of
    the planned length. Its loader decodes one batch per worker ahead, not the run's four, so
    that a data-bound step shows in the timed steps instead of being served from the buffer.

    Under DDP every rank probes the same number of steps (train_step's collectives need all of
    them) and the ranks plan with the slowest rank's times; the copy is not DDP-wrapped, so the
    gradient all-reduce is not in the measured step (the time limit still holds)."""
    start = time.perf_counter()
    o, dev = run.options, run.device
    budget_s = o.minutes * 60.0
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        method = copy.deepcopy(run.method)
        optimizer = make_optimizer(method, 0.0, o.weight_decay, dev)
        scaler = torch.amp.GradScaler(dev.type, enabled=run.amp_dtype == torch.float16)
        sampler = _EpochSampler(len(run.paths), run.global_batch, run.steps_per_epoch, 0, o.seed, 0, run.rank,
                                run.world)
        times, last = [], start
        for x1, x2, _, labels, local in start_workers(batches(sampler, prefetch=1)):
            train_step(method, method, optimizer, scaler, x1.to(dev), x2.to(dev), 0.0, o.momentum, run.amp_dtype,
                       None if labels is None else labels.to(dev), [v.to(dev) for v in local])
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if len(times) > PROBE_STEPS or (run.world == 1 and len(times) >= 2
                                             and now - start > PROBE_SHARE * budget_s):
                break
        del method, optimizer
    measured = [step_seconds(times), epoch_start_seconds(times), time.perf_counter() - start]
    if run.world > 1:
        agreed = torch.tensor(measured, dtype=torch.float64, device=dev)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        measured = agreed.tolist()
    return measured[0], measured[1], measured[2]


def _plan(run: _Run, batches: Batches, given: TrainOptions) -> float:
    """Fit a fresh --minutes run's schedules to its budget (run.options, total, warmup);
    returns the seconds the probe took."""
    step_s, epoch_s, probe_s = _probe(run, batches)
    planned = planned_steps(run.options.minutes, step_s, probe_s, epoch_s, run.steps_per_epoch)
    cap = run.total if given.epochs is not None else (given.max_steps or sys.maxsize)
    run.options, run.total, run.warmup_steps = plan_options(run.options, given, run.steps_per_epoch, planned,
                                                            run.total)
    run.replan = _Replan(cap, given.warmup_epochs is not None, list(REPLAN_AT), epoch_s, run.step)
    return probe_s


def _replan(run: _Run, monitor: Monitor) -> bool:
    """After each step of a fresh --minutes run: at the REPLAN_AT shares of its plan done (of its
    steps, or of its time if that comes first), fit the horizon (and a warmup not over yet, in
    proportion) to the budget at the pace measured so far; whether it changed. The options
    saved with each checkpoint hold the new plan, so --resume keeps it. Rank 0's clock decides
    for every rank."""
    r = run.replan
    wall = monitor.wall_seconds()
    if r.start is None:
        r.start = (run.step, wall)
        return False
    timed, budget_s = run.step - r.start[0], run.options.minutes * 60.0
    if not r.marks or timed < REPLAN_MIN_STEPS:
        return False
    # the share of the plan done: by steps, or by time where the plan is far too long for it
    done, elapsed = max(run.step / run.total, wall / budget_s), wall - r.start[1]
    if run.world > 1:  # by rank 0's clock
        clock = torch.tensor([done, elapsed, wall], dtype=torch.float64, device=run.device)
        dist.broadcast(clock, 0)
        done, elapsed, wall = clock.tolist()
    if done < r.marks[0]:
        return False
    while r.marks and done >= r.marks[0]:
        r.marks.pop(0)
    spe = run.steps_per_epoch
    # the steps' own pace: without the epoch starts the window held (at most half of it, as the
    # probe's epoch start errs high), which the new horizon then counts where they fall
    starts = epoch_starts(r.start[0], run.step, spe) * r.epoch_start_s
    pace = max(elapsed - starts, 0.5 * elapsed) / timed
    new = replanned_steps(run.step, budget_s, wall, pace, r.cap, r.epoch_start_s, spe)
    old = run.total
    if abs(new - old) <= REPLAN_TOLERANCE * old:
        return False
    warmup_epochs = run.options.warmup_epochs
    if run.step < run.warmup_steps and not r.warmup_given:  # the warmup keeps its share of the new horizon
        run.warmup_steps = max(run.step, int(round(run.warmup_steps * new / old)))
        monitor.warmup_steps = run.warmup_steps
        warmup_epochs = run.warmup_steps / spe
    run.total = new
    run.options = replace(run.options, planned_steps=new, warmup_epochs=warmup_epochs,
                          epochs=max(run.options.epochs, math.ceil(new / spe)))
    monitor.replanned(run.step, old, new, pace)
    return True


def _out_of_time(run: _Run, monitor: Monitor) -> bool:
    """Whether the --minutes budget is spent (training time over resumes); every rank agrees."""
    if run.options.minutes is None:
        return False
    spent = monitor.wall_seconds() >= run.options.minutes * 60.0
    if run.world > 1:  # rank 0's clock decides, so that no rank steps on alone
        flag = torch.tensor([float(spent)], device=run.device)
        dist.broadcast(flag, 0)
        spent = bool(flag.item())
    return spent


@contextlib.contextmanager
def _stop_between_steps():
    """Ctrl-C and SIGTERM during the loop ask it to stop before the next step (the list it
    yields gets the signal), so the checkpoint saved then never holds a half-applied step; a
    second signal interrupts at once."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield requested
        return

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print("stopping after this step (again to stop at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            if h is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(s, h)


def _stop_requested(run: _Run, requested: list[int]) -> bool:
    """Whether a stop was asked for on any rank (every rank agrees, so none steps on alone)."""
    asked = bool(requested)
    if run.world > 1:
        flag = torch.tensor([float(asked)], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        asked = bool(flag.item())
    return asked


def _steps(run: _Run, batches: Batches, monitor: Monitor, stop_at: int | None, workers: int) -> None:
    """Train from ``run.step`` to ``run.total`` (or ``stop_at``, if sooner), epoch by epoch,
    checkpointing on the way, until then or until the --minutes budget is spent
    (``run.stopped_by``), or until Ctrl-C or SIGTERM (``_stop_between_steps``) raises
    KeyboardInterrupt between two steps."""
    if run.step < _stop(run, stop_at) and _out_of_time(run, monitor):  # a resume of a run whose budget is spent
        run.stopped_by = "minutes"
        return
    with _stop_between_steps() as requested:
        _epochs(run, batches, monitor, stop_at, workers, requested)
    if run.step >= run.total:
        run.stopped_by = "steps"


def _stop(run: _Run, stop_at: int | None) -> int:
    """The step to stop at: the horizon (which a re-plan moves), or the caller's stop_at if sooner."""
    return run.total if stop_at is None else min(run.total, stop_at)


def _epochs(run: _Run, batches: Batches, monitor: Monitor, stop_at: int | None, workers: int,
            requested: list[int]) -> None:
    dev = run.device
    while run.step < _stop(run, stop_at):
        o = run.options
        epoch = run.step // run.steps_per_epoch
        sampler = _EpochSampler(len(run.paths), run.global_batch, run.steps_per_epoch, epoch, o.seed,
                                run.step - epoch * run.steps_per_epoch, run.rank, run.world)
        batch_iter = start_workers(batches(sampler))
        monitor.start_epoch()
        try:
            for x1, x2, failures, labels, local in batch_iter:
                if _stop_requested(run, requested):
                    raise KeyboardInterrupt  # between steps: pretrain saves this step's checkpoint
                monitor.skipped.update(failures)
                lr = lr_at(run.step, run.total, run.warmup_steps, o.lr)
                m = momentum_at(run.step, run.total, o.momentum)
                loss, feats = train_step(run.model, run.method, run.optimizer, run.scaler,
                                         x1.to(dev, non_blocking=True), x2.to(dev, non_blocking=True), lr, m,
                                         run.amp_dtype, None if labels is None else labels.to(dev, non_blocking=True),
                                         [v.to(dev, non_blocking=True) for v in local])
                monitor.check_loss(loss, run.step)
                run.step += 1
                monitor.after_step(run.step, epoch, run.global_batch, lr, m if run.method.uses_momentum else None,
                                   feats, f"epoch {epoch + 1}/{math.ceil(run.total / run.steps_per_epoch)}")
                if run.replan is not None and _replan(run, monitor):
                    monitor.advance(0, total=(_stop(run, stop_at) - run.replan.first_step) * run.global_batch)
                if run.step % o.checkpoint_every == 0 and run.step < run.total:
                    _save(run, monitor)
                if run.step % run.steps_per_epoch == 0:
                    monitor.end_of_epoch(run.step // run.steps_per_epoch, run.step, run.method, run.cfg, workers)
                if run.step >= _stop(run, stop_at):
                    break
                if _out_of_time(run, monitor):
                    run.stopped_by = "minutes"
                    return
        finally:
            del batch_iter  # shuts its decode workers down now, not when an interrupt's traceback goes


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
    """Pretrain a ViT with ``options.method`` (MoCo v3 by default) on the images under
    ``data_dir``; write ``out_dir``.

    ``stop_at_step`` stops after that many steps as an interruption would, leaving a
    checkpoint that ``resume=True`` continues from.

    ``options.minutes`` is a wall-clock budget for the training (the images' discovery and
    decoding before it are not counted): a fresh run measures its step time on a throwaway
    copy, plans the schedules to end with the budget (``planned_steps``), then stops at the
    planned step or when the time is spent, whichever comes first (``TrainResult.stopped_by``).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    given = options or TrainOptions()
    run, batches = _prepare(data_dir, out_dir, given, resume, device, precision, workers,
                            progress, follow_symlinks)
    if run.options.minutes is not None and not resume:
        with worker_deaths_as_errors():
            run.prior_seconds += _plan(run, batches, given)  # the probe's time is spent from the budget
    monitor = _open_monitor(run, json_log, knn_train, knn_test, knn_max_per_class, collapse_patience)
    try:
        with progress_bar("pretrain", (_stop(run, stop_at_step) - run.step) * run.global_batch,
                          progress and run.is_main) as advance:
            monitor.advance = advance
            with worker_deaths_as_errors():
                _steps(run, batches, monitor, stop_at_step, batches.workers)
    except KeyboardInterrupt:
        _save(run, monitor)
        raise TrainingInterrupted(run.step, out_dir / CHECKPOINT, run.rank) from None
    except WorkerDied as e:  # the model is intact: keep its last whole step
        if run.world > 1:  # the other ranks wait in a collective: rank 0 cannot save now
            raise WorkerDied(f"{e}. --resume continues from the last checkpoint (every --checkpoint-every "
                             "steps)") from None
        _save(run, monitor)
        raise WorkerDied(f"{e}. Checkpoint saved at step {run.step}; continue with --resume") from None
    finally:
        monitor.close()
    _save(run, monitor)
    skipped = run.refused + [Skip(run.paths[i], r) for i, r in sorted(monitor.skipped.items())]
    return TrainResult(out_dir, run.step, monitor.loss, monitor.images_per_s(), monitor.knn_history, skipped,
                       run.method, run.total, run.stopped_by, run.rank)
