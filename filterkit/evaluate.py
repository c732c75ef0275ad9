"""Encoder quality on labelled folders: DINO's weighted kNN on frozen features, with the
baselines every figure must be printed beside (same architecture at random init, raw pixels).

Protocol (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"):
L2-normalised features, cosine similarity, k = 20 neighbours whose votes weigh exp(sim / 0.07),
top-1 accuracy on the test split. A labelled folder has one sub-folder per class.

    >>> report = evaluate(Encoder.load("models/x"), "cifar10/train", "cifar10/test")
    >>> report.knn_top1, report.baselines["random_init"], report.baselines["raw_pixels"]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .augment import eval_transform
from .encoder import Encoder, ModelConfig, build_backbone
from .errors import FilterkitError
from .images import discover_images
from .loader import embed_all
from .progress import progress_bar

RAW_PIXEL_SIZE = 32


@dataclass
class LabelledImages:
    paths: list[Path]
    labels: np.ndarray  # int64 [N], indices into ``classes``
    classes: list[str]


def labelled_images(root: str | os.PathLike, max_per_class: int | None = None) -> LabelledImages:
    """Images of ``root/<class>/...`` (any depth below the class folder), class names sorted.

    ``max_per_class`` keeps the first images of each class by sorted path (for quick monitors).
    """
    root = Path(root)
    if not root.is_dir():
        raise FilterkitError(f"folder not found: {root}")
    classes, paths, labels = [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        found = discover_images(sub)[:max_per_class]
        if found:
            labels += [len(classes)] * len(found)
            classes.append(sub.name)
            paths += found
    if len(classes) < 2:
        raise FilterkitError(f"{root} needs at least two class sub-folders with images; found {len(classes)}")
    return LabelledImages(paths, np.asarray(labels, dtype=np.int64), classes)


def weighted_knn_top1(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                      test_labels: np.ndarray, k: int = 20, temperature: float = 0.07,
                      chunk: int = 1024) -> float:
    """Top-1 accuracy of the exp(sim/T)-weighted vote of the k most similar training vectors.

    Vectors must be L2-normalised; the test set is processed in chunks (memory ~ chunk x N).
    """
    train_t = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    labels_t = torch.from_numpy(train_labels).long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_t))
    correct = 0
    for i in range(0, len(test), chunk):
        sims = torch.from_numpy(np.ascontiguousarray(test[i:i + chunk], dtype=np.float32)) @ train_t.T
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes)
        votes.scatter_add_(1, labels_t[top_idx], (top_sims / temperature).exp())
        correct += (votes.argmax(1).numpy() == test_labels[i:i + chunk]).sum()
    return float(correct) / max(len(test), 1)


def features(paths: list[Path], transform: Callable, draft_size: int | None,
             embed_batch: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 128,
             workers: int | None = None, progress: bool = False,
             description: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(vectors [M, D], positions [M] of the paths that decoded); failures are left out."""
    with progress_bar(description, len(paths), progress) as advance:
        vectors, kept, _ = embed_all(paths, transform, draft_size, embed_batch, batch_size, workers, advance)
    if vectors is None:
        raise FilterkitError("none of the evaluation images could be decoded")
    return vectors, np.asarray(kept, dtype=np.int64)


def raw_pixel_embed(pixels: torch.Tensor) -> torch.Tensor:
    return F.normalize(pixels.flatten(1), dim=1)


def knn_top1(train: LabelledImages, test: LabelledImages, transform: Callable, draft_size: int | None,
             embed_batch: Callable, k: int = 20, temperature: float = 0.07, batch_size: int = 128,
             workers: int | None = None, progress: bool = False, name: str = "") -> float:
    tr, tr_kept = features(train.paths, transform, draft_size, embed_batch, batch_size, workers,
                           progress, f"{name} train".strip())
    te, te_kept = features(test.paths, transform, draft_size, embed_batch, batch_size, workers,
                           progress, f"{name} test".strip())
    return weighted_knn_top1(tr, train.labels[tr_kept], te, test.labels[te_kept], k, temperature)


def encoder_knn_top1(encoder: Encoder, train: LabelledImages, test: LabelledImages, **kw) -> float:
    was_training = encoder.backbone.training
    encoder.backbone.eval()
    try:
        return knn_top1(train, test, encoder.transform, encoder.config.img_size, encoder.embed_batch, **kw)
    finally:
        encoder.backbone.train(was_training)


@dataclass
class EvalReport:
    knn_top1: float
    n_train: int
    n_test: int
    classes: list[str]
    k: int
    temperature: float
    baselines: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "knn_top1": self.knn_top1,
            "protocol": {"method": "weighted kNN (DINO)", "k": self.k, "temperature": self.temperature,
                         "n_train": self.n_train, "n_test": self.n_test, "classes": self.classes},
            "baselines": {name: {"knn_top1": value} for name, value in self.baselines.items()},
        }


def evaluate(encoder: Encoder, train_dir: str | os.PathLike, test_dir: str | os.PathLike, k: int = 20,
             temperature: float = 0.07, baselines: bool = True, max_per_class: int | None = None,
             batch_size: int = 128, workers: int | None = None, progress: bool = False) -> EvalReport:
    """Weighted kNN of ``encoder`` and, measured in the same run, of the same architecture at
    random initialisation and of raw 32x32 pixels."""
    train = labelled_images(train_dir, max_per_class)
    test = labelled_images(test_dir, max_per_class)
    if train.classes != test.classes:
        raise FilterkitError(f"train and test class folders differ: {train.classes} vs {test.classes}")
    kw = dict(k=k, temperature=temperature, batch_size=batch_size, workers=workers, progress=progress)
    report = EvalReport(encoder_knn_top1(encoder, train, test, name="model", **kw), len(train.paths),
                        len(test.paths), train.classes, k, temperature)
    if baselines:
        report.baselines = baseline_knn_top1(encoder.config, train, test, str(encoder.device),
                                             precision=encoder.precision, **kw)
    return report


def baseline_knn_top1(config: ModelConfig, train: LabelledImages, test: LabelledImages, device: str,
                      raw_pixels: bool = True, precision: str = "auto", **kw) -> dict[str, float]:
    """Weighted kNN of ``config``'s architecture at random initialisation (seed 0) and, unless
    ``raw_pixels`` is false, of raw 32x32 pixels: the baselines every quality figure prints."""
    torch.manual_seed(0)
    random_init = Encoder(build_backbone(config), config, device=device, precision=precision)
    found = {"random_init": encoder_knn_top1(random_init, train, test, name="random init", **kw)}
    if raw_pixels:
        found["raw_pixels"] = knn_top1(
            train, test, eval_transform(RAW_PIXEL_SIZE), RAW_PIXEL_SIZE, raw_pixel_embed, name="raw pixels", **kw)
    return found
