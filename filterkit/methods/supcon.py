"""Supervised contrastive learning (SupCon; Khosla et al. 2020, "Supervised Contrastive
Learning"), the L^sup_out of its eq. (2), the one supervised method here:

    z = g(f(x)) for both views of N labelled images: 2N embeddings, I = {1..2N}; z̄ = z/‖z‖
    A(i) = I \\ {i},  P(i) = {p ∈ A(i) : y_p = y_i}   (the other view of i is always in P(i))
    ℓ_i = −1/|P(i)| · Σ_{p∈P(i)} log [ exp(z̄_i·z̄_p/τ) / Σ_{a∈A(i)} exp(z̄_i·z̄_a/τ) ]
    L = 1/2N · Σ_{i∈I} ℓ_i          (the paper's sum over I, averaged)

τ = ``--temperature`` (the paper uses 0.1). The projector is MoCo v3's 2-layer MLP with batch
norm, as SimCLR here uses; no predictor, no momentum encoder. The labels y are the first-level
sub-folders of the training folder (``train.data.folder_labels``); the loop passes them as
``labels=`` because the class says ``needs_labels``. Under DDP the 2N anchors of each rank are
contrasted with every rank's embeddings (gathered with their gradient) and labels (gathered
without), so DDP's average of the ranks' means is the gradient of the global L.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FilterkitError
from ..moco import Branch, mlp
from .base import Method, gather_no_grad, gather_with_grad


def supcon_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """L above over this rank's 2N anchors (z1[i], z2[i]: the views of image i, labelled
    ``labels[i]``), in fp32, against the embeddings and labels of every rank."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    y = torch.cat([labels, labels])
    z_all, offset = gather_with_grad(z)
    y_all = gather_no_grad(y)
    logits = z @ z_all.T / temperature
    own = torch.arange(z.shape[0], device=z.device)
    itself = torch.zeros_like(logits, dtype=torch.bool)
    itself[own, own + offset] = True
    log_prob = logits - logits.masked_fill(itself, float("-inf")).logsumexp(dim=1, keepdim=True)  # over A(i)
    positive = (y[:, None] == y_all[None, :]) & ~itself
    return (-(log_prob.masked_fill(~positive, 0.0).sum(1)) / positive.sum(1)).mean()


class SupCon(Method):
    """Backbone + projection MLP; the loss pulls together every view of a class."""

    name, title = "supcon", "SupCon"
    needs_labels = True

    def __init__(self, backbone: nn.Module, embed_dim: int, out_dim: int = 256, proj_hidden: int = 4096,
                 temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature
        self.base = Branch(backbone, mlp(2, embed_dim, proj_hidden, out_dim))

    @classmethod
    def from_options(cls, backbone: nn.Module, embed_dim: int, options: Any) -> SupCon:
        return cls(backbone, embed_dim, options.out_dim, options.proj_hidden, options.temperature)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, detached backbone features of both views, for monitoring)."""
        if labels is None:
            raise FilterkitError("--method supcon is supervised: it needs a label for every image")
        z1, z2, features = self.base(x1, x2)
        return supcon_loss(z1, z2, labels.to(z1.device), self.temperature), features.detach()
