"""SwAV (Caron, Misra, Mairal, Goyal, Bojanowski & Joulin 2020, "Unsupervised Learning of
Visual Features by Contrasting Cluster Assignments"), section 3.1, on two global views, and
section 3.2's multi-crop with ``local_views`` (``--local-crops N``):

    z = g(f(x))/‖g(f(x))‖ for both views;  C = [c_1 … c_K], each c_k L2-normalised (the paper
        renormalises the prototypes before every step; so does ``forward``)
    scores S = Zᵀ C  over the B images of the (global) batch
    codes Q* = Diag(u) exp(Cᵀ Z / ε) Diag(v), the Sinkhorn-Knopp projection onto equal
        partition (rows sum to 1/K, columns to 1/B), 3 iterations, ε = 0.05, no gradient;
        q_i = B · Q*[:, i] (each image's code sums to 1)
    p_t^(k) = softmax_k(z_tᵀ c_k / τ),   ℓ(z_t, q_s) = −Σ_k q_s^(k) log p_t^(k)
    L = ½ · mean_i [ ℓ(z1_i, q2_i) + ℓ(z2_i, q1_i) ]        (swapped prediction)

    multi-crop, V = 2 + N views, codes of the two global views only (as the paper's code):
    L = ½ Σ_{s∈{1,2}} 1/(V − 1) Σ_{t≠s} mean_i ℓ(z_t_i, q_s_i)      (N = 0: L above)

τ = ``--temperature`` (the paper uses 0.1). K = ``PROTOTYPES`` = 3000 (the paper's ImageNet
choice; it reports K matters little). The projector is Linear → BN → ReLU → Linear; the
prototypes are one bias-free Linear, trained with the rest. The local views pass the backbone
at their own grid's sin-cos positions (``encoder.forward_any_side``). Not in this slice: the
queue of past embeddings the paper adds for batches under 256, and freezing the prototypes
during the first epoch. Under DDP the Sinkhorn sums run over the global batch (all-reduced),
as in the paper's distributed code; the loss is then per image and needs no other gather.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..moco import Branch
from .base import Method, cross_view_pairs
from .byol import byol_mlp

PROTOTYPES = 3000  # K
EPSILON = 0.05  # ε, the entropic regularisation of the codes
SINKHORN_ITERATIONS = 3


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def _global_rows(n: int, device: torch.device) -> int:
    return int(_all_reduce(torch.tensor(n, device=device)).item())


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = EPSILON, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """The codes q [B, K] of this rank's B rows of ``scores`` (cosines, in [−1, 1]), equal
    partition over the global batch; each row sums to 1."""
    # exp((s − 1)/ε) ≤ 1: the constant shift cancels in the normalisations and cannot overflow
    q = torch.exp((scores.float() - 1) / epsilon).T  # [K, B]
    k, b = q.shape[0], _global_rows(q.shape[1], q.device)
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype: 1/K of the mass
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each image: 1/B of the mass (its own column: no gather)
        q /= b
    return (q * b).T


def swapped_prediction(s1: torch.Tensor, s2: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """L above from the scores S (with gradient) and codes q (without) of both views."""
    return (_ell(s1, q2, temperature) + _ell(s2, q1, temperature)) / 2


def _ell(s: torch.Tensor, q: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean_i ℓ(z_t_i, q_s_i) from the scores s of view t and the codes q of view s."""
    return -(q * F.log_softmax(s.float() / temperature, dim=1)).sum(dim=1).mean()


def multicrop_swapped_prediction(scores: list[torch.Tensor], codes: list[torch.Tensor],
                                 temperature: float) -> torch.Tensor:
    """Multi-crop's L above from the scores of all V views (the two global ones first) and the
    codes of the two global views."""
    per_code = len(scores) - 1
    return sum(_ell(scores[t], codes[s], temperature) for t, s in cross_view_pairs(len(scores))) / (2 * per_code)


class SwAV(Method):
    """Backbone + projector + prototypes; codes by Sinkhorn-Knopp, swapped between the views."""

    name, title, supports_local_crops = "swav", "SwAV", True

    def __init__(self, backbone: nn.Module, embed_dim: int, out_dim: int = 128, proj_hidden: int = 2048,
                 temperature: float = 0.1, prototypes: int = PROTOTYPES) -> None:
        super().__init__()
        self.temperature = temperature
        self.base = Branch(backbone, byol_mlp(embed_dim, proj_hidden, out_dim))
        self.prototypes = nn.Linear(out_dim, prototypes, bias=False)

    @classmethod
    def from_options(cls, backbone: nn.Module, embed_dim: int, options: Any) -> SwAV:
        return cls(backbone, embed_dim, options.out_dim, options.proj_hidden, options.temperature)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                local_views: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, detached backbone features of both global views, for monitoring)."""
        with torch.no_grad():  # the paper's renormalisation of C, before the step uses it
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        z1, z2, features = self.base(x1, x2)
        local = self.base.local(local_views) if local_views else []
        c = self.prototypes.weight.float()
        # fp32 even under autocast: exp(s/ε) multiplies a bf16 rounding of s by 1/ε = 20
        with torch.autocast(device_type=z1.device.type, enabled=False):
            s1, s2 = F.normalize(z1.float(), dim=1) @ c.T, F.normalize(z2.float(), dim=1) @ c.T
            s_local = [F.normalize(z.float(), dim=1) @ c.T for z in local]
        q1, q2 = sinkhorn(s1.detach()), sinkhorn(s2.detach())
        if not local:
            return swapped_prediction(s1, s2, q1, q2, self.temperature), features.detach()
        return multicrop_swapped_prediction([s1, s2, *s_local], [q1, q2], self.temperature), features.detach()
