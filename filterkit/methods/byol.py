"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning"), section 3.1:

    online:  z = g_θ(f_θ(x)),  p = q_θ(z)         (projector g, predictor q)
    target:  z' = g_ξ(f_ξ(x))                       (no gradient: sg)
    ℓ(p, z') = ‖p/‖p‖ − z'/‖z'‖‖² = 2 − 2·⟨p, z'⟩ / (‖p‖·‖z'‖)
    loss = mean_i ℓ(p1_i, sg(z'2_i)) + mean_i ℓ(p2_i, sg(z'1_i))    (symmetrised: L + L̃)
    after the optimiser step: ξ ← m·ξ + (1 − m)·θ   (backbone + projector, never the predictor)

    multi-crop (``local_views``, ``--local-crops N``): online predictions p_3 … p_{N+2} of the
    local views too, targets of the two global views only (``base.cross_view_pairs``):
    loss = 2/(2 + 2N) · [ ℓ(p1, z'2) + ℓ(p2, z'1) + Σ_v (ℓ(p_v, z'1) + ℓ(p_v, z'2)) ]   (N = 0: above)

m follows ``momentum_at``, which is BYOL's own schedule, 1 − (1 − m0)(cos(πk/K) + 1)/2. The
heads are the paper's: Linear, BatchNorm, ReLU, Linear (hidden ``proj_hidden`` / ``pred_hidden``,
output ``out_dim``). The loss is per image, so DDP needs no gathering.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..moco import Branch
from .base import Method, cross_view_pairs, ema_update


def byol_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector and predictor: Linear → BatchNorm → ReLU → Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_i (2 − 2·cos(p_i, z_i)), in fp32; ``z`` is the target and gets no gradient."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


class BYOL(Method):
    """The online network (backbone + projector + predictor) and its EMA target."""

    name, title, uses_momentum, needs_predictor = "byol", "BYOL", True, True
    supports_local_crops = True

    def __init__(self, backbone: nn.Module, embed_dim: int, out_dim: int = 256, proj_hidden: int = 4096,
                 pred_hidden: int = 4096) -> None:
        super().__init__()
        self.base = Branch(backbone, byol_mlp(embed_dim, proj_hidden, out_dim))
        self.predictor = byol_mlp(out_dim, pred_hidden, out_dim)
        self.target = copy.deepcopy(self.base)
        self.target.requires_grad_(False)

    @classmethod
    def from_options(cls, backbone: nn.Module, embed_dim: int, options: Any) -> BYOL:
        return cls(backbone, embed_dim, options.out_dim, options.proj_hidden, options.pred_hidden)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                local_views: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, detached backbone features of both global views, for monitoring)."""
        z1, z2, features = self.base(x1, x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1, t2, _ = self.target(x1, x2)
        if not local_views:
            return regression_loss(p1, t2) + regression_loss(p2, t1), features.detach()
        predictions = [p1, p2, *(self.predictor(z) for z in self.base.local(local_views))]
        pairs = cross_view_pairs(len(predictions))
        loss = sum(regression_loss(predictions[t], (t1, t2)[s]) for t, s in pairs)
        return loss * (2 / len(pairs)), features.detach()

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        ema_update(self.target, self.base, m)

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Online and target backbones start from ``state`` (ξ = θ, as at a fresh start)."""
        self.base.backbone.load_state_dict(state)
        self.target.backbone.load_state_dict(state)
