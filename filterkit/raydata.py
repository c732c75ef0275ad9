"""Embedding on a Ray cluster (the optional ``ray`` extra): decode + embed run as Ray Data
``map_batches`` over an actor pool, one encoder per actor; the driver writes the vectors into
the embedding cache as they arrive, so the cache, its keys and a rerun behave exactly as in
a local run.

    filterkit embed ./photos --ray local         # a Ray instance on this machine
    filterkit embed ./photos --ray auto          # the running cluster (RAY_ADDRESS / ray start)
    filterkit embed ./photos --ray ray://head:10001

The actors rebuild the encoder from its config and safetensors bytes (nothing is pickled but
Ray's own task plumbing); image paths must be readable at the same path on every node.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import FilterkitError


class _EmbedActor:
    """One encoder per Ray actor: decodes and embeds a batch of paths."""

    def __init__(self, config: dict, weights: bytes, draft_size: int | None, threads: int = 1,
                 precision: str = "auto") -> None:
        import torch
        from safetensors.torch import load as load_safetensors

        from .encoder import Encoder, ModelConfig, build_backbone

        torch.set_num_threads(threads)
        cfg = ModelConfig.from_dict(config)
        backbone = build_backbone(cfg)
        backbone.load_state_dict(load_safetensors(weights), strict=True)
        self.encoder = Encoder(backbone, cfg, device="cpu", precision=precision)
        self.draft_size = draft_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .images import decoder_version
        from .loader import embed_batches

        paths = [Path(os.fsdecode(p)) for p in batch["path"]]
        vectors = np.zeros((len(paths), self.encoder.dim), dtype=np.float32)
        errors = np.full(len(paths), "", dtype=object)
        unreadable = np.zeros(len(paths), dtype=bool)
        # One in-process batch: the actor is the unit of parallelism.
        for done in embed_batches(paths, self.encoder.transform, self.draft_size, self.encoder.embed_batch,
                                  batch_size=max(1, len(paths)), workers=0):
            if done.indices:
                vectors[done.indices] = done.vectors
            for f in done.failures:
                errors[f.index], unreadable[f.index] = f.reason, f.unreadable
        decoder = np.full(len(paths), decoder_version(), dtype=object)
        return {"position": batch["position"], "vector": vectors, "error": errors, "unreadable": unreadable,
                "decoder": decoder}


def ray_runner(address: str = "local", actors: int | None = None):
    """A ``runner`` for ``pipeline.embed_paths`` that embeds on Ray at ``address``
    ("local" starts one on this machine, "auto" joins the running cluster)."""
    try:
        import ray
    except ImportError:
        raise FilterkitError("--ray needs the ray extra: pip install 'filterkit[ray]'") from None

    def run(paths, encoder, draft_size, batch_size, workers) -> Iterator[tuple[list[int], np.ndarray, list, list]]:
        from .images import decoder_version

        if not ray.is_initialized():  # "local" always starts a new instance on this machine
            ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        here = decoder_version()
        pool = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        weights = encoder.weights_blob()
        ds = ray.data.from_items([{"position": i, "path": os.fsencode(p)} for i, p in enumerate(paths)],
                                 override_num_blocks=max(1, min(len(paths) // max(batch_size, 1), 4 * pool)))
        ds = ds.map_batches(_EmbedActor, batch_size=batch_size, batch_format="numpy", concurrency=pool,
                            num_cpus=1, fn_constructor_kwargs={"config": encoder.config.to_dict(),
                                                               "weights": weights, "draft_size": draft_size,
                                                               "precision": encoder.precision})
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ok = [i for i, e in enumerate(out["error"]) if not e]
            positions = [int(out["position"][i]) for i in ok]
            failures, transient = [], []
            for p, e, d, unreadable in zip(out["position"], out["error"], out["decoder"], out["unreadable"]):
                if e:  # remembered only if this decoder would fail too and the file was readable
                    lasting = d == here and not unreadable
                    (failures if lasting else transient).append((int(p), f"{e}" if lasting else f"on a Ray worker: {e}"))
            yield positions, out["vector"][ok], failures, transient

    return run
