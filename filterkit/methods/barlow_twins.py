"""Barlow Twins (Zbontar, Jing, Misra, LeCun & Deny 2021, "Barlow Twins: Self-Supervised Learning
via Redundancy Reduction"), its eq. (1)-(2) and Algorithm 1:

    z^A = g(f(x1)), z^B = g(f(x2)) for the B images of the (global) batch, D dimensions
    ẑ_{b,i} = (z_{b,i} − mean_b z_{b,i}) / sqrt(var_b z_{b,i} + ε)     (biased var, ε = 1e-5: BN's)
    C_ij = 1/B · Σ_b ẑ^A_{b,i} · ẑ^B_{b,j}                             (the cross-correlation)
    L = Σ_i (1 − C_ii)² + λ · Σ_i Σ_{j≠i} C_ij²,   λ = 5e-3

λ is the paper's (section 4, tuned for D = 8192); at our default D = 256 it is close to the
1/D that later analyses suggest, so it is kept rather than exposed as a flag. The projector is
the paper's shape: Linear → BN → ReLU twice, then Linear (``proj_hidden`` wide, ``out_dim``
out). No predictor, no momentum encoder.

Under DDP the batch statistics and C are over the global batch, as in the paper's Algorithm 1
(there: synchronised BN and an all-reduce of C). Here every rank gathers all ranks' embeddings
with their gradient (``gather_with_grad``) and computes the same global L; the gather's backward
sums the W ranks' gradients of L for this rank's rows (W·∂L/∂z) and DDP's average over the W
ranks divides by W again, so the weights get ∂L/∂θ of the global loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..moco import Branch
from .base import Method, gather_with_grad

LAMBDA = 5e-3  # Zbontar et al. 2021, section 4 (the off-diagonal weight)


def barlow_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear → BN → ReLU, Linear → BN → ReLU, Linear: the last layer has no BN (L standardises)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=False))


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ẑ: each dimension centred and scaled over the batch (rows), biased variance."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """L above, in fp32, over the global batch (every rank's rows, gathered with their gradient)."""
    a, _ = gather_with_grad(z1.float())
    b, _ = gather_with_grad(z2.float())
    # fp32 even under autocast: C_ii near 1 in bf16 (3 significant digits) would blur 1 − C_ii
    with torch.autocast(device_type=a.device.type, enabled=False):
        c = standardise(a).T @ standardise(b) / a.shape[0]  # [D, D]
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lam * off_diag


class BarlowTwins(Method):
    """Backbone + projector; the loss drives the views' cross-correlation to the identity."""

    name, title = "barlow-twins", "Barlow Twins"

    def __init__(self, backbone: nn.Module, embed_dim: int, out_dim: int = 256, proj_hidden: int = 4096) -> None:
        super().__init__()
        self.base = Branch(backbone, barlow_projector(embed_dim, proj_hidden, out_dim))

    @classmethod
    def from_options(cls, backbone: nn.Module, embed_dim: int, options: Any) -> BarlowTwins:
        return cls(backbone, embed_dim, options.out_dim, options.proj_hidden)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, detached backbone features of both views, for monitoring)."""
        z1, z2, features = self.base(x1, x2)
        return barlow_loss(z1, z2), features.detach()
