"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"), in the shape of the paper's Algorithm 1:

    q1, q2 = predictor(projector(f(x1))), predictor(projector(f(x2)))      # base encoder
    k1, k2 = projector_m(f_m(x1)), projector_m(f_m(x2))                      # momentum, no grad
    loss = ctr(q1, k2) + ctr(q2, k1)
    ctr(q, k) = CrossEntropy(q·kᵀ / τ, labels = arange(N)) · 2τ             # q, k L2-normalised
    after the optimiser step: f_m ← m·f_m + (1 − m)·f   (backbone + projector, never predictor)

With ``--queue K`` > 0, MoCo v2's queue of negatives (He et al. 2020, "Momentum Contrast for
Unsupervised Visual Representation Learning", Algorithm 1; Chen, Fan, Girshick & He 2020,
"Improved Baselines with Momentum Contrastive Learning") is added to the same loss:

    Q: the last K momentum keys k̄ (L2-normalised, no gradient), a FIFO ring, empty at the start
    ctr(q, k) = CrossEntropy([q·kᵀ, q·Qᵀ] / τ, labels = arange(N)) · 2τ     # logits [N, N + |Q|]
    i.e. ctr(q, k) = 2τ · mean_i −log( exp(q_i·k_i/τ) / (Σ_j exp(q_i·k_j/τ) + Σ_{n∈Q} exp(q_i·n/τ)) )
    after the loss: Q ← Q with the batch's k̄1 and k̄2 pushed (2N rows), oldest out

Both ctr terms see the same Q, the one from before this step's push, so no key is its own
negative. |Q| grows to K over the first K / 2N steps. K need not divide by the batch: the ring
wraps (and a K below 2N keeps the batch's last K keys). K = 0, the default, is the MoCo v3 loss
above with no queue module at all (checkpoints and results as before). Under DDP, k runs over
every rank's keys (N is then the global batch, labels offset by rank), and every rank pushes the
gathered global batch, so the ranks' queues stay equal. The queue lives in the module's buffers
(``methods.base.EmbeddingQueue``): checkpoints and ``--resume`` carry it.

With multi-crop (``local_views``, ``--local-crops N``): queries q_3 … q_{N+2} of the N local
views too (base encoder, their own grid's positions), keys of the two global views only, each
query against every global key but its own view's (``base.cross_view_pairs``), scaled so that
N = 0 is the loss above:

    loss = 2/(2 + 2N) · [ ctr(q1, k2) + ctr(q2, k1) + Σ_{v=3}^{N+2} (ctr(q_v, k1) + ctr(q_v, k2)) ]

With both, every ctr term takes the queue's rows as further negatives; only the global views'
keys are pushed.

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
from .methods.base import EmbeddingQueue, Method, cross_view_pairs, gather_no_grad


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


def normalised_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``gather_keys`` of the L2-normalised fp32 keys: what ``contrastive_loss`` contrasts with."""
    return gather_keys(F.normalize(k.float(), dim=1))


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float,
                     queue: torch.Tensor | None = None,
                     gathered: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """ctr(q, k) = CrossEntropy(q·kᵀ/τ, positives on the diagonal) · 2τ, in fp32.

    Under DDP the keys of every rank are the negatives and the labels shift by rank·N.
    ``queue`` (L2-normalised rows, no gradient) adds its rows as further negatives: the
    logits gain the columns q·Qᵀ/τ after the batch's. ``gathered``: ``normalised_keys(k)``, when
    several queries share k (multi-crop: one gather per key instead of one per term).
    """
    q = F.normalize(q.float(), dim=1)
    k_all, offset = gathered if gathered is not None else normalised_keys(k)
    logits = q @ k_all.T / temperature
    if queue is not None and queue.shape[0]:
        logits = torch.cat([logits, q @ queue.detach().float().T / temperature], dim=1)
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
        queue_size: int = 0,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.base = Branch(backbone, mlp(3, embed_dim, proj_hidden, out_dim))
        self.predictor = mlp(2, out_dim, pred_hidden, out_dim) if predictor else nn.Identity()
        self.momentum = copy.deepcopy(self.base)
        self.momentum.requires_grad_(False)
        # No module at all without a queue: the state dict (and old checkpoints) stay as they were.
        self.queue = EmbeddingQueue(queue_size, out_dim) if queue_size > 0 else None

    @classmethod
    def from_options(cls, backbone: nn.Module, embed_dim: int, options: Any) -> MoCo:
        return cls(backbone, embed_dim, options.out_dim, options.proj_hidden, options.pred_hidden,
                   options.temperature, options.predictor, options.queue or 0)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                local_views: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, detached backbone features of both global views, for monitoring)."""
        z1, z2, features = self.base(x1, x2)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1, k2, _ = self.momentum(x1, x2)
        # A copy: the push below writes the ring in place, and backward still needs these rows.
        queued = None if self.queue is None else self.queue.contents().clone()
        if not local_views:
            loss = (contrastive_loss(q1, k2, self.temperature, queued)
                    + contrastive_loss(q2, k1, self.temperature, queued))
        else:
            queries = [q1, q2, *(self.predictor(z) for z in self.base.local(local_views))]
            pairs = cross_view_pairs(len(queries))
            keys = (k1, k2)
            shared = [normalised_keys(k) for k in keys]
            loss = sum(contrastive_loss(queries[t], keys[s], self.temperature, queued, shared[s]) for t, s in pairs)
            loss = loss * (2 / len(pairs))
        if self.queue is not None:
            with torch.no_grad():
                keys = torch.cat([F.normalize(k1.float(), dim=1), F.normalize(k2.float(), dim=1)])
                self.queue.push(gather_no_grad(keys))
        return loss, features.detach()

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
