"""What the loop reports and checks after each step: the NaN and collapse health checks, the
JSON log, the progress line and rate, and the epoch-end kNN monitor."""

from __future__ import annotations

import copy
import json
import math
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..encoder import Encoder
from ..fsutil import atomic_write_bytes
from ..methods.base import Method
from ..moco import gather_keys
from ..modeldir import TRAINING_DIR, ModelConfig
from .options import TrainingStopped

LOG = Path(TRAINING_DIR) / "log.jsonl"
# Collapse floor for the feature std, in units of the healthy 1/sqrt(D). The conv-stem ViT's ReLU
# stem gives every image a large shared component: 0.19 at init and 0.078-0.082 at the end of its
# best CPU run (kNN 0.559), which a floor of 0.1 stopped. A collapsed run falls towards 0.
COLLAPSE_STD = 0.05
# How long the other ranks wait for rank 0's epoch-end kNN monitor: it encodes both kNN sets,
# which can take far longer than a collective may (NCCL's default timeout is 10 min).
MONITOR_WAIT = timedelta(hours=24)


class Monitor:
    """One run's health checks, log and monitors. Rank 0 logs and runs the kNN monitor; every
    rank takes the same stop decisions (from all ranks' losses and features)."""

    def __init__(self, log_path: Path | None, dim: int, warmup_steps: int, collapse_patience: int, *,
                 knn_sets=None, wait_for_knn: bool = False, prior_seconds: float = 0.0) -> None:
        """``log_path`` None: not rank 0. ``knn_sets``: rank 0's (train, test) kNN sets;
        ``wait_for_knn``: the other ranks of a run with a kNN monitor wait for it."""
        # Open for the whole run, closed by close().
        self.log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        self.dim, self.warmup_steps, self.collapse_patience = dim, warmup_steps, collapse_patience
        self.knn_sets = knn_sets
        # While rank 0 runs the monitor the other ranks wait at a barrier of a gloo group of their
        # own, whose timeout bounds only that wait: waiting in the next step's collective instead
        # would trip the training group's timeout, which stays short to catch real hangs.
        self.monitor_wait = None
        if wait_for_knn:
            self.monitor_wait = dist.new_group(backend="gloo", timeout=MONITOR_WAIT)
        self.knn_history: list[tuple[int, float]] = []
        self.skipped: dict[int, str] = {}
        self.low_std_checks = 0
        self.loss = float("nan")
        self.images_done, self.t_start, self.t_last = 0, time.perf_counter(), 0.0
        self.prior_seconds = prior_seconds
        self.advance = lambda n, description=None, total=None: None  # the progress bar's, once it is open

    def wall_seconds(self) -> float:
        """Training time over resumes too."""
        return self.prior_seconds + time.perf_counter() - self.t_start

    def images_per_s(self) -> float:
        return self.images_done / max(time.perf_counter() - self.t_start, 1e-9)

    def start_epoch(self) -> None:
        self.t_last = time.perf_counter()

    def check_loss(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            raise TrainingStopped(
                f"loss became {loss} at step {step}: stopping. Lower --lr, try "
                "--freeze-patch-embed, or --resume from the last checkpoint")
        self.loss = loss

    def after_step(self, step: int, epoch: int, batch: int, lr: float, m: float | None,
                   feats: torch.Tensor, progress_line: str) -> None:
        """The collapse check, then the log line and progress of ``step`` (counted from 1)."""
        # Over the global batch (all ranks' features), as one process would see it:
        # every rank then takes the same collapse decision.
        feature_std = float(gather_keys(F.normalize(feats.float(), dim=1))[0].std(dim=0).mean())
        # Collapse: every image maps to one point. Judged after warmup only, since a
        # random-init ViT already maps images close together.
        if step > self.warmup_steps and feature_std < COLLAPSE_STD / math.sqrt(self.dim):
            self.low_std_checks += 1
            if self.low_std_checks >= self.collapse_patience:
                raise TrainingStopped(
                    f"features collapsed at step {step}: std {feature_std:.2e} < {COLLAPSE_STD}/sqrt({self.dim}) "
                    f"for {self.low_std_checks} steps. Lower --lr or raise --temperature")
        else:
            self.low_std_checks = 0
        self.images_done += batch
        now = time.perf_counter()
        rate = batch / max(now - self.t_last, 1e-9)  # data wait included
        self.t_last = now
        momentum = {} if m is None else {"momentum": m}  # only methods with an EMA target have one
        self._write({"step": step, "epoch": epoch, "loss": self.loss, "lr": lr, **momentum, "images_per_s": rate,
                     "feature_std": feature_std, "feature_std_healthy": 1 / math.sqrt(self.dim)})
        self.advance(batch, description=f"{progress_line} loss {self.loss:.3f}")

    def replanned(self, step: int, old: int, new: int, pace_s: float) -> None:
        """A --minutes run's new horizon (``loop._replan``), in the log."""
        self._write({"step": step, "replanned": {"from_steps": old, "to_steps": new,
                                                 "seconds_per_step": round(pace_s, 4)}})

    def end_of_epoch(self, epoch: int, step: int, method: Method, cfg: ModelConfig, workers: int) -> None:
        """The kNN monitor of ``method`` after ``epoch`` epochs (rank 0), while the other ranks wait."""
        if self.knn_sets:
            acc = _knn_monitor(method, cfg, self.knn_sets, workers)
            self.knn_history.append((epoch, acc))
            self._write({"step": step, "epoch": epoch, "knn_top1": acc})
        if self.monitor_wait is not None:
            dist.barrier(group=self.monitor_wait)

    def _write(self, record: dict) -> None:
        if self.log:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def close(self) -> None:
        if self.log:
            self.log.close()
        if self.monitor_wait is not None:
            dist.destroy_process_group(self.monitor_wait)


def _knn_monitor(method: Method, cfg: ModelConfig, knn_sets, workers: int) -> float:
    from ..evaluate import encoder_knn_top1

    backbone = copy.deepcopy(method.backbone)
    encoder = Encoder(backbone, cfg, device=str(next(backbone.parameters()).device))
    return encoder_knn_top1(encoder, *knn_sets, workers=workers)


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

