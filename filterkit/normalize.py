"""Collection-adapted similarity: a normaliser fitted on the vectors at hand, applied before
every cosine.

The embeddings of a small self-supervised encoder are anisotropic: every image shares a large
common component, so unrelated photos have cosines of 0.8-0.9 and raw cosine wastes most of the
range. Subtracting the mean of the collection at hand (``center``) removes that component;
``whiten`` also equalises the spread of every direction, with a covariance shrunk towards a
multiple of the identity (Ledoit & Wolf 2004, scikit-learn's ``LedoitWolf``) so that a
collection smaller than the dimension still gives a well-conditioned transform. Rows are
L2-normalised again afterwards, so scores stay cosines in [-1, 1].

    >>> norm = Normalizer.fit(np.concatenate([exemplars, incoming]), "center")
    >>> scores = norm(incoming) @ norm(exemplars).T

The cache keeps raw vectors; a normaliser is fitted per run (and stored with an on-disk
index), and its ``to_dict()`` goes into every JSON output and report.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FilterkitError
from .fsutil import atomic_write_bytes

KINDS = ("none", "center", "whiten")
# "auto" centres from this many vectors up: the mean of a handful is a noisy estimate of the
# collection's common direction (on the 17 example photos centring kept an unrelated photo
# that raw cosine rejected). Whitening is never automatic: it measured below centring
# (benchmarks/README.md, filter_quality.py).
AUTO_CENTER_MIN = 64
NORMALIZER_FILES = ("normalizer.json", "normalizer_mean.npy", "normalizer_transform.npy")  # save() writes them


@dataclass(frozen=True)
class Normalizer:
    kind: str  # "none" | "center" | "whiten"
    mean: np.ndarray | None = None  # [D] float32
    transform: np.ndarray | None = None  # [D, D] float32: x -> (x - mean) @ transform (whiten)
    fitted_on: int = 0  # vectors it was fitted on
    shrinkage: float | None = None  # Ledoit-Wolf's shrinkage of the covariance (whiten)
    reference: str | None = None  # a model's reference mean (reference.py): the images it was fitted on

    @classmethod
    def fit(cls, vectors: np.ndarray, kind: str = "center") -> Normalizer:
        """Fit on ``vectors`` [N, D]. ``kind="auto"``: centre when there are at least
        ``AUTO_CENTER_MIN`` vectors, else leave them raw."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise FilterkitError(f"a normaliser is fitted on vectors [N, D], got shape {list(vectors.shape)}")
        n = len(vectors)
        if kind == "auto":
            kind = "center" if n >= AUTO_CENTER_MIN else "none"
        if kind not in KINDS:
            raise FilterkitError(f"--normalize must be one of {', '.join(KINDS)} or auto, got {kind!r}")
        if kind == "none" or n < 2:  # one vector has no spread to remove
            return cls("none", fitted_on=n)
        mean = vectors.astype(np.float64).mean(axis=0)
        if kind == "center":
            return cls("center", mean.astype(np.float32), fitted_on=n)
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf(assume_centered=False).fit(vectors.astype(np.float64))
        values, vecs = np.linalg.eigh(lw.covariance_)
        values = np.maximum(values, values.max() * 1e-6)  # shrinkage keeps them positive; guard rounding
        transform = (vecs / np.sqrt(values)) @ vecs.T  # ZCA: C^(-1/2)
        return cls("whiten", mean.astype(np.float32), transform.astype(np.float32), n, float(lw.shrinkage_))

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        """The vectors in the normalised space, rows L2-normalised (float32)."""
        x = np.asarray(vectors, dtype=np.float32)
        if self.kind == "none":
            return np.ascontiguousarray(x)
        x = x - self.mean
        if self.transform is not None:
            x = x @ self.transform
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "fitted_on": self.fitted_on}
        if self.shrinkage is not None:
            out["shrinkage"] = round(self.shrinkage, 6)
        if self.reference is not None:
            out["reference"] = self.reference
        return out

    def describe(self) -> str:
        if self.kind == "none":
            return "raw cosine"
        extra = f", shrinkage {self.shrinkage:.3f}" if self.shrinkage is not None else ""
        if self.reference is not None:
            return f"centred on the model's {self.fitted_on} reference images"
        return f"{'centred' if self.kind == 'center' else 'whitened'} on {self.fitted_on} vectors{extra}"

    # -- stored beside an on-disk index: plain .npy arrays, read without pickle ------------------
    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        for name, array in (("normalizer_mean.npy", self.mean), ("normalizer_transform.npy", self.transform)):
            if array is not None:
                buffer = io.BytesIO()
                np.save(buffer, array, allow_pickle=False)
                atomic_write_bytes(folder / name, buffer.getvalue())
        atomic_write_bytes(folder / "normalizer.json", json.dumps(self.to_dict()).encode())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Normalizer:
        folder = Path(folder)
        doc = json.loads((folder / "normalizer.json").read_text(encoding="utf-8"))
        if doc.get("kind") not in KINDS:
            raise FilterkitError(f"{folder / 'normalizer.json'}: unknown kind {doc.get('kind')!r}")

        def array(name: str) -> np.ndarray | None:
            path = folder / name
            return np.load(path, allow_pickle=False) if path.is_file() else None

        norm = cls(doc["kind"], array("normalizer_mean.npy"), array("normalizer_transform.npy"),
                   int(doc.get("fitted_on", 0)), doc.get("shrinkage"))
        if (norm.kind != "none" and norm.mean is None) or (norm.kind == "whiten" and norm.transform is None):
            raise FilterkitError(f"{folder}: the {norm.kind} normaliser's arrays are missing")
        return norm
