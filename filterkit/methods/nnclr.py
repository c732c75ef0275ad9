"""NNCLR (Dwibedi, Aytar, Tompson, Sermanet & Zisserman 2021, "With a Little Help from My
Friends: Nearest-Neighbor Contrastive Learning of Visual Representations"), section 3:

    z = g(f(x)), p = h(z) for both views; z̄ = z/‖z‖, p̄ = p/‖p‖; Q: the support queue
    NN(z̄, Q) = argmax_{q ∈ Q} ⟨z̄, q⟩                       (no gradient: it is a queue row)
    L¹_i = −log [ exp(⟨NN(z̄1_i, Q), p̄2_i⟩/τ) / Σ_k exp(⟨NN(z̄1_i, Q), p̄2_k⟩/τ) ]
    L = ½·mean_i L¹_i + ½·mean_i L²_i      (L²: the views swapped; k runs over the global batch)
    then Q ← Q with the batch's z̄1 pushed, oldest out (FIFO)

τ = ``--temperature`` (the paper uses 0.1; the recipes' 0.2 is MoCo v3's). The heads are the
paper's shapes: a 3-layer projector and a 2-layer predictor with batch norm (MoCo v3's ``mlp``;
``--no-predictor`` drops the predictor, an ablation the paper reports). The queue holds the
last ``QUEUE`` = 16384 projected embeddings (fp32, ``out_dim`` wide: 16 MiB at 256) in the
module's buffers (``base.EmbeddingQueue``), so checkpoints and ``--resume`` carry it; the
neighbour is searched only among the rows filled so far, and at the very first step, with the
queue still empty, each embedding is its own "neighbour" (the loss is then SimCLR-like). Under
DDP the negatives p̄_k are every rank's (gathered with their gradient) and every rank pushes
the gathered global batch into its queue, so all ranks' queues stay equal.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..moco import Branch, mlp
from .base import EmbeddingQueue, Method, gather_no_grad, gather_with_grad

QUEUE = 16384  # the support set's size (Dwibedi et al. 2021 use 98304 on ImageNet; 16384 fits a CPU)


def nearest_neighbour(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Each row of ``z`` (L2-normalised) replaced by its most similar row of ``support``
    (by itself while the support set is empty), without gradient."""
    z = z.detach()
    if support.shape[0] == 0:
        return z
    return support[(z @ support.T).argmax(dim=1)]


def nnclr_infonce(nn_z: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean_i −log softmax_k(⟨nn_z_i, p̄_k⟩/τ) at k = i, k over every rank's predictions."""
    p_all, offset = gather_with_grad(F.normalize(p.float(), dim=1))
    logits = nn_z.float() @ p_all.T / temperature
    return F.cross_entropy(logits, torch.arange(nn_z.shape[0], device=nn_z.device) + offset)


class NNCLR(Method):
    """Backbone + projector + predictor, and the support queue of projected embeddings."""

    name, title = "nnclr", "NNCLR"

    def __init__(self, backbone: nn.Module, embed_dim: int, out_dim: int = 256, proj_hidden: int = 4096,
                 pred_hidden: int = 4096, temperature: float = 0.1, predictor: bool = True,
                 queue_size: int = QUEUE) -> None:
        super().__init__()
        self.temperature = temperature
        self.base = Branch(backbone, mlp(3, embed_dim, proj_hidden, out_dim))
        self.predictor = mlp(2, out_dim, pred_hidden, out_dim) if predictor else nn.Identity()
        self.queue = EmbeddingQueue(queue_size, out_dim)

    @classmethod
    def from_options(cls, backbone: nn.Module, embed_dim: int, options: Any) -> NNCLR:
        return cls(backbone, embed_dim, options.out_dim, options.proj_hidden, options.pred_hidden,
                   options.temperature, options.predictor)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, detached backbone features of both views, for monitoring)."""
        z1, z2, features = self.base(x1, x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        z1n, z2n = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        support = self.queue.contents()
        nn1, nn2 = nearest_neighbour(z1n, support), nearest_neighbour(z2n, support)
        loss = (nnclr_infonce(nn1, p2, self.temperature) + nnclr_infonce(nn2, p1, self.temperature)) / 2
        self.queue.push(gather_no_grad(z1n.detach()))  # after the lookup: a batch never finds itself
        return loss, features.detach()
