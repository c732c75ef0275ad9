"""Mean Shift for self-supervised learning (MSF; Koohpayegani, Tejankar & Pirsiavash 2021,
"Mean Shift for Self-Supervised Learning"), its section 3:

    online:  p = q_θ(g_θ(f_θ(x)))    target: t = g_ξ(f_ξ(x)), no gradient;  ū = u/‖u‖
    M: the memory bank of target embeddings t̄, with the current batch's pushed first (so each
       target is among its own neighbours, and k = 1 is BYOL)
    NN_k(t̄): the k rows of M most similar to t̄ (cosine), k = 5
    ℓ(p, t) = 1/k · Σ_{n ∈ NN_k(t̄)} ‖p̄ − n‖²
    L = ½·mean_i ℓ(p1_i, t2_i) + ½·mean_i ℓ(p2_i, t1_i)
    after the optimiser step: ξ ← m·ξ + (1 − m)·θ   (backbone + projector, never the predictor)

The paper computes one direction (online on one view, target on the other, a weaker
augmentation); this trainer symmetrises it over its two views as it does BYOL, and pushes both
views' targets into the bank. m follows ``momentum_at`` from ``--momentum`` (the paper keeps
0.99 fixed). Heads are BYOL's (Linear → BN → ReLU → Linear). The bank holds the last ``BANK`` =
16384 target embeddings (the paper's ImageNet bank is far larger) in the module's buffers
(``base.EmbeddingQueue``), so checkpoints and ``--resume`` carry it; while it holds fewer than
k rows, the neighbours are all of them. Under DDP every rank pushes the gathered global batch
of targets, so the ranks' banks stay equal; the loss is per image and needs no other gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import EmbeddingQueue, gather_no_grad
from .byol import BYOL

BANK = 16384  # memory bank rows
TOPK = 5  # k, the paper's default


def mean_shift_loss(p: torch.Tensor, t: torch.Tensor, bank: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    """mean_i ℓ(p_i, t_i) above, in fp32: ``t`` (L2-normalised targets) picks the neighbours in
    ``bank`` and ``p`` (normalised here) is pulled towards them."""
    p = F.normalize(p.float(), dim=1)
    index = (t.detach().float() @ bank.T).topk(min(k, bank.shape[0]), dim=1).indices  # [N, k]
    neighbours = bank[index]  # [N, k, C]
    return (p.unsqueeze(1) - neighbours).pow(2).sum(-1).mean(1).mean()


class MeanShift(BYOL):
    """BYOL's online network, EMA target and updates, with the bank of target embeddings."""

    name, title, uses_momentum, needs_predictor = "meanshift", "Mean Shift (MSF)", True, True
    supports_local_crops = False  # BYOL's multi-crop is not this loss's (no local views into the bank)

    def __init__(self, backbone: nn.Module, embed_dim: int, out_dim: int = 256, proj_hidden: int = 4096,
                 pred_hidden: int = 4096, bank_size: int = BANK, k: int = TOPK) -> None:
        super().__init__(backbone, embed_dim, out_dim, proj_hidden, pred_hidden)
        self.k = k
        self.bank = EmbeddingQueue(bank_size, out_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, detached backbone features of both views, for monitoring)."""
        z1, z2, features = self.base(x1, x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1, t2, _ = self.target(x1, x2)
            t1, t2 = F.normalize(t1.float(), dim=1), F.normalize(t2.float(), dim=1)
            self.bank.push(gather_no_grad(torch.cat([t1, t2])))  # first: each target is its own neighbour
        bank = self.bank.contents()
        loss = (mean_shift_loss(p1, t2, bank, self.k) + mean_shift_loss(p2, t1, bank, self.k)) / 2
        return loss, features.detach()
