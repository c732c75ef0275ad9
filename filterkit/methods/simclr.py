"""SimCLR (Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive Learning
of Visual Representations"): the NT-Xent loss of its eq. (1) and Algorithm 1.

    z = g(f(x)) for both views of N images: 2N embeddings; s_ij = z_iᵀz_j / (‖z_i‖·‖z_j‖)
    ℓ(i, j) = −log [ exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ) ]          (the 2N − 1 others of i)
    L = 1/(2N) · Σ_{k=1..N} [ ℓ(2k−1, 2k) + ℓ(2k, 2k−1) ]

No momentum encoder and no predictor: one encoder f (the backbone) and a projection MLP g
(two layers with batch norm, as in the paper's code; MoCo v3's ``mlp``). Under DDP every rank's
embeddings join the 2N of the global batch, gathered with their gradient (``gather_with_grad``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..moco import Branch, mlp
from .base import Method, gather_with_grad


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """L above over this rank's 2N anchors (z1[i] and z2[i] are the two views of image i), in
    fp32, against the embeddings of every rank."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # [2N, C]: view 1 of all, then view 2
    n = z1.shape[0]
    z_all, offset = gather_with_grad(z)  # [W·2N, C], this rank's 2N at offset
    logits = z @ z_all.T / temperature
    own = torch.arange(2 * n, device=z.device)
    itself = torch.zeros_like(logits, dtype=torch.bool)
    itself[own, own + offset] = True
    logits = logits.masked_fill(itself, float("-inf"))  # k ≠ i: an embedding is not its own negative
    positives = (own + n) % (2 * n) + offset  # the other view of the same image
    return F.cross_entropy(logits, positives)


class SimCLR(Method):
    """Backbone + projection MLP; the loss is NT-Xent over both views."""

    name, title = "simclr", "SimCLR"

    def __init__(self, backbone: nn.Module, embed_dim: int, out_dim: int = 256, proj_hidden: int = 4096,
                 temperature: float = 0.2) -> None:
        super().__init__()
        self.temperature = temperature
        self.base = Branch(backbone, mlp(2, embed_dim, proj_hidden, out_dim))

    @classmethod
    def from_options(cls, backbone: nn.Module, embed_dim: int, options: Any) -> SimCLR:
        return cls(backbone, embed_dim, options.out_dim, options.proj_hidden, options.temperature)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, detached backbone features of both views, for monitoring)."""
        z1, z2, features = self.base(x1, x2)
        return nt_xent(z1, z2, self.temperature), features.detach()
