"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning"), its eq. (1)-(2)
and Algorithm 1:

    z = h_proj(f(x)),  p = h_pred(z)               for both views
    D(p, z) = −⟨p, z⟩ / (‖p‖·‖z‖)                   (negative cosine similarity)
    L = ½·mean_i D(p1_i, sg(z2_i)) + ½·mean_i D(p2_i, sg(z1_i))

multi-crop (``local_views``, ``--local-crops N``): predictions p_3 … p_{N+2} of the local views
too, against the stopped projections of the two global views only (``base.cross_view_pairs``):

    L = 1/(2 + 2N) · [ D(p1, sg(z2)) + D(p2, sg(z1)) + Σ_v (D(p_v, sg(z1)) + D(p_v, sg(z2))) ]   (N = 0: above)

The stop-gradient sg is the whole method: no momentum encoder, no negatives. The heads are the
paper's (section 4): a 3-layer projector with batch norm on every layer, the output layer's
without ReLU (MoCo v3's ``mlp(3, ...)``: Linear, BN, ReLU twice, then Linear, BN), and a 2-layer
bottleneck predictor, Linear → BN → ReLU → Linear, whose hidden width is ``out_dim // 4`` (the
paper's 2048 → 512 → 2048, a bottleneck by design, so ``--pred-hidden`` does not apply). The
loss is per image: DDP needs no gathering.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..moco import Branch, mlp
from .base import Method, cross_view_pairs


def bottleneck_predictor(dim: int) -> nn.Sequential:
    """SimSiam's h: dim → dim/4 (BN, ReLU) → dim; the output layer has neither BN nor ReLU."""
    hidden = max(dim // 4, 1)
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_i D(p_i, sg(z_i)) = mean_i −cos(p_i, z_i), in fp32; ``z`` gets no gradient."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2."""
    return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2


class SimSiam(Method):
    """Backbone + projector + bottleneck predictor, one encoder for both views."""

    name, title, needs_predictor, supports_local_crops = "simsiam", "SimSiam", True, True

    def __init__(self, backbone: nn.Module, embed_dim: int, out_dim: int = 256, proj_hidden: int = 4096) -> None:
        super().__init__()
        self.base = Branch(backbone, mlp(3, embed_dim, proj_hidden, out_dim))
        self.predictor = bottleneck_predictor(out_dim)

    @classmethod
    def from_options(cls, backbone: nn.Module, embed_dim: int, options: Any) -> SimSiam:
        return cls(backbone, embed_dim, options.out_dim, options.proj_hidden)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                local_views: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, detached backbone features of both global views, for monitoring)."""
        z1, z2, features = self.base(x1, x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if not local_views:
            return simsiam_loss(p1, p2, z1, z2), features.detach()
        predictions = [p1, p2, *(self.predictor(z) for z in self.base.local(local_views))]
        pairs = cross_view_pairs(len(predictions))
        loss = sum(negative_cosine(predictions[t], (z1, z2)[s]) for t, s in pairs)
        return loss / len(pairs), features.detach()
