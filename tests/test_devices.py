"""The precision `auto` picks, and what a bf16 forward on CPU gives."""

import numpy as np
import pytest
import torch

from filterkit import devices
from filterkit.encoder import Encoder
from filterkit.errors import FilterkitError

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_for_cpu_inference_only_where_the_cpu_has_bf16_instructions(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert devices.autocast_dtype(CPU, "auto") == (torch.bfloat16 if native else None)
    assert devices.autocast_dtype(CPU, "auto", training=True) is None  # CPU training stays fp32
    assert devices.autocast_dtype(CPU, "fp32") is None
    assert devices.autocast_dtype(CPU, "bf16", training=True) == torch.bfloat16  # asked for: given


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(FilterkitError, match="unknown precision 'fp8'"):
        devices.autocast_dtype(CPU, "fp8")


def test_a_bf16_forward_stays_within_a_small_angle_of_fp32(tmp_path):
    Encoder.random("vit-mini-8-64", seed=3).save(tmp_path / "m")
    x = torch.randn(8, 3, 64, 64)
    fp32 = Encoder.load(tmp_path / "m", device="cpu", precision="fp32")
    bf16 = Encoder.load(tmp_path / "m", device="cpu", precision="bf16")
    assert fp32.amp_dtype is None and bf16.amp_dtype == torch.bfloat16
    a, b = fp32.embed(x), bf16.embed(x)
    assert a.dtype == b.dtype == np.float32
    cosines = (a * b).sum(axis=1)
    assert cosines.min() > 0.999
    assert not np.array_equal(a, b)  # bf16 really ran: the vectors differ in their low bits


def test_the_cli_embeds_at_the_precision_asked_for_and_refuses_an_unknown_one(tmp_path, capsys, small_model_dir,
                                                                          photos_dir):
    from filterkit.cli import main

    cache = tmp_path / "c.sqlite"
    base = ["embed", str(photos_dir), "--model", str(small_model_dir), "--cache", str(cache), "--quiet"]
    assert main(base + ["--precision", "fp8"]) != 0
    assert "unknown precision 'fp8'" in capsys.readouterr().err
    assert not cache.exists()  # refused before anything was written
    assert main(base + ["--precision", "fp32", "--workers", "0"]) == 0
    assert cache.exists()
