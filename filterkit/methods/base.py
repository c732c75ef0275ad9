"""What every method is to the trainer, and the pieces methods share.

The loop only ever calls, on any method:

    loss, features = method(x1, x2)    # loss: a scalar with a gradient; features: the backbone's
                                       # detached features of both views, [2N, D] (health checks)
    loss, features = method(x1, x2, labels=y)  # instead, for a method whose needs_labels is set
    loss, features = method(x1, x2, local_views=[l1, …, lN])  # multi-crop (--local-crops N), only
                                       # for a method whose supports_local_crops is set: N more
                                       # views [B, 3, s, s] of the same images at a smaller side s
    method.momentum_update(m)          # after each optimiser step; a no-op without an EMA target
    method.backbone                    # what is exported to the model directory and kNN-monitored
    method.load_backbone(state)        # --init-from a model without this method's heads

Each method keeps its online encoder as ``self.base = Branch(backbone, projector)``, so every
checkpoint names the exported backbone ``base.backbone.*``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn


class Method(nn.Module):
    """A self-supervised method: its heads, its loss, its EMA targets and any state it keeps."""

    name: ClassVar[str]  # the --method value
    title: ClassVar[str]  # as config.json's training.method records it
    uses_momentum: ClassVar[bool] = False  # keeps an EMA target that momentum_update moves
    needs_predictor: ClassVar[bool] = False  # --no-predictor cannot train it
    needs_labels: ClassVar[bool] = False  # supervised: forward takes labels= (sub-folder classes)
    supports_local_crops: ClassVar[bool] = False  # multi-crop: forward takes local_views= (cross_view_pairs)

    @classmethod
    def from_options(cls, backbone: nn.Module, embed_dim: int, options: Any) -> Method:
        raise NotImplementedError

    @property
    def backbone(self) -> nn.Module:
        return self.base.backbone

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """Nothing to move for a method without an EMA target."""

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Start the online backbone (and any EMA copy of it: override) from ``state``."""
        self.backbone.load_state_dict(state)


def cross_view_pairs(views: int) -> list[tuple[int, int]]:
    """Multi-crop's (prediction view t, target view s) pairs over ``views`` views, the first two
    global, the rest local: every view against each *global* view but itself (Caron et al.
    2020, section 3.2: codes and targets come from the global views only). 2 + 2N pairs for N
    local views; with none, (1, 0) and (0, 1), the two-view methods' swapped pairs."""
    return [(t, s) for s in (0, 1) for t in range(views) if t != s]


def ema_update(target: nn.Module, online: nn.Module, m: float) -> None:
    """ξ ← m·ξ + (1 − m)·θ over matching parameters (no gradient)."""
    with torch.no_grad():
        ema = list(target.parameters())
        torch._foreach_mul_(ema, m)
        torch._foreach_add_(ema, [p.detach() for p in online.parameters()], alpha=1.0 - m)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows: each rank's
    loss uses all ranks' embeddings, so each row's gradient comes from every rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # all_reduce, not reduce_scatter: gloo has only the former
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows [world·N, C] and this rank's offset into them, gradients flowing back to
    the rank that owns each row. Under DDP, which averages gradients over the W ranks, a loss
    that is each rank's mean over its own anchors then gets the gradient of the global mean."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows [world·N, C], without gradient (what a queue or a label list needs)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class EmbeddingQueue(nn.Module):
    """A FIFO ring of the last ``size`` embeddings pushed (NNCLR's support set, MSF's memory
    bank). Rows, write position and fill count are buffers, so they are in ``state_dict``: the
    checkpoint carries the queue and ``--resume`` continues with it. Every rank pushes the
    gathered global batch, so the ranks' queues stay equal (DDP's buffer broadcast from rank 0
    then changes nothing)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("rows", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def contents(self) -> torch.Tensor:
        """The rows pushed so far (all ``size`` once full), in no particular order."""
        return self.rows[: int(self.filled)]

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Write ``x`` (detached, fp32) over the oldest rows; more rows than ``size`` keep the last."""
        x = x.detach().float()[-self.size:]
        at = (self.ptr + torch.arange(x.shape[0], device=x.device)) % self.size
        self.rows[at] = x.to(self.rows.dtype)
        self.ptr.copy_((self.ptr + x.shape[0]) % self.size)
        self.filled.copy_(torch.clamp(self.filled + x.shape[0], max=self.size))
