"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"), in the shape of the paper's Algorithm 1:

    q1, q2 = predictor(projector(f(x1))), predictor(projector(f(x2)))      # base encoder
    k1, k2 = projector_m(f_m(x1)), projector_m(f_m(x2))                      # momentum, no grad
    loss = ctr(q1, k2) + ctr(q2, k1)
    ctr(q, k) = CrossEntropy(q·kᵀ / τ, labels = arange(N)) · 2τ             # q, k L2-normalised
    after the optimiser step: f_m ← m·f_m + (1 − m)·f   (backbone + projector, never predictor)

With multi-crop (``local_views``, ``--local-crops N``): queries q_3 … q_{N+2} of the N local
views too (base encoder, their own grid's positions), keys of the two global views only, each
query against every global key but its own view's (``base.cross_view_pairs``), scaled so that
N = 0 is the loss above:

    loss = 2/(2 + 2N) · [ ctr(q1, k2) + ctr(q2, k1) + Σ_{v=3}^{N+2} (ctr(q_v, k1) + ctr(q_v, k2)) ]

    >>> model = MoCo(backbone, embed_dim=192)
    >>> loss, features = model(x1, x2)
    >>> loss.backward(); optimizer.step(); model.momentum_update(momentum_at(step, total))

The default ``--method`` (``moco-v3``); methods.base describes the interface it shares with the others.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .encoder import forward_any_side
from .methods.base import Method, cross_view_pairs


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear (no bias) + BatchNorm + ReLU on hidden layers; the last layer is Linear +
    BatchNorm(affine=False), as in MoCo v3's projector and predictor."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if last:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        else:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Branch(nn.Module):
    """Backbone + projector. Both views go through the backbone in one call (a ViT has no
    batch norm, so this equals two calls); the projector's batch norm sees one view at a time."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(torch.cat([x1, x2]))
        f1, f2 = features.chunk(2)
        return self.projector(f1), self.projector(f2), features

    def local(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Projections of multi-crop's local views (each [B, 3, s, s], one side s): one backbone
        call at their own grid's positions (``encoder.forward_any_side``), the projector's batch
        norm one view at a time, as for the global views."""
        features = forward_any_side(self.backbone, torch.cat(views))
        return [self.projector(f) for f in features.chunk(len(views))]


def gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' keys [world·N, C] and this rank's offset into them (no gradient flows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts), dist.get_rank() * k.shape[0]


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """ctr(q, k) = CrossEntropy(q·kᵀ/τ, positives on the diagonal) · 2τ, in fp32.

    Under DDP the keys of every rank are the negatives and the labels shift by rank·N.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    k_all, offset = gather_keys(k)
    logits = q @ k_all.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def momentum_at(step: int, total_steps: int, base: float = 0.99) -> float:
    """m = 1 − ½(1 + cos(π·t/T))(1 − m0): m0 at the start, 1 at the end."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t)) * (1.0 - base)


class MoCo(Method):
    """The base encoder (backbone + projector + predictor) and its momentum copy."""

    name, title, uses_momentum, supports_local_crops = "moco-v3", "MoCo v3", True, True

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        out_dim: int = 256,
        proj_hidden: int = 4096,
        pred_hidden: int = 4096,
        temperature: float = 0.2,
        predictor: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.base = Branch(backbone, mlp(3, embed_dim, proj_hidden, out_dim))
        self.predictor = mlp(2, out_dim, pred_hidden, out_dim) if predictor else nn.Identity()
        self.momentum = copy.deepcopy(self.base)
        self.momentum.requires_grad_(False)

    @classmethod
    def from_options(cls, backbone: nn.Module, embed_dim: int, options: Any) -> MoCo:
        return cls(backbone, embed_dim, options.out_dim, options.proj_hidden, options.pred_hidden,
                   options.temperature, options.predictor)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                local_views: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, detached backbone features of both global views, for monitoring)."""
        z1, z2, features = self.base(x1, x2)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1, k2, _ = self.momentum(x1, x2)
        if not local_views:
            loss = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
            return loss, features.detach()
        queries = [q1, q2, *(self.predictor(z) for z in self.base.local(local_views))]
        pairs = cross_view_pairs(len(queries))
        loss = sum(contrastive_loss(queries[t], (k1, k2)[s], self.temperature) for t, s in pairs)
        return loss * (2 / len(pairs)), features.detach()

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """f_m ← m·f_m + (1 − m)·f over backbone + projector parameters."""
        base = [p.detach() for p in self.base.parameters()]
        momentum = list(self.momentum.parameters())
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, base, alpha=1.0 - m)

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Both encoders start from ``state``: f_m = f, as at a fresh start."""
        self.base.backbone.load_state_dict(state)
        self.momentum.backbone.load_state_dict(state)
