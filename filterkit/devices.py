"""The one place that picks a device and a compute precision."""

from __future__ import annotations

import contextlib

import torch

from .errors import FilterkitError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` prefers cuda, then mps, then cpu; an explicit device must exist."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise FilterkitError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FilterkitError("--device cuda was asked for but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise FilterkitError("--device mps was asked for but MPS is not available")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), which oneDNN
    uses for bf16 matmuls. torch exposes the check only privately; absent means no."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, precision: str = "auto", training: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` on CUDA is bf16 where supported, else fp16. On CPU it is bf16 for inference where
    the CPU has native bf16 instructions: on a 2-core AVX512-BF16 EPYC the shipped model's
    forward ran 1.73-1.76x faster and the whole embed pipeline 1.30-1.35x (benchmarks/embed_speed.py
    --precision fp32 bf16), at a cosine of 0.99997 or more to the fp32 vector of the same image and
    held-out kNN 0.7399 vs 0.7409. Elsewhere it is fp32: on an AVX2 CPU without bf16 instructions,
    bf16 autocast made ViT-Tiny/16 inference 7x slower (29.5 vs 4.2 img/s, batch 32). CPU
    training stays fp32 under ``auto`` (``training=True``): bf16 training on CPU is not measured.
    """
    if precision not in PRECISIONS:
        raise FilterkitError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and not training and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype``, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
