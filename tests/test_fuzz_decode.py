"""Fuzzing the decoder: real JPEG/PNG/GIF/TIFF/WebP bytes, mutated by hypothesis (bit flips,
overwritten runs, cuts, inserted junk), fed to load_image. The only exception allowed is
ImageError (a reason for the skip list); each decode must finish within a few seconds."""

from __future__ import annotations

import faulthandler
import io
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import sample_photo
from filterkit.errors import ImageError
from filterkit.images import load_image

FORMATS = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "tif": "TIFF", "webp": "WEBP"}


def _seeds() -> dict[str, bytes]:
    photo = sample_photo("chelsea").resize((96, 64))
    out = {}
    for ext, fmt in FORMATS.items():
        buf = io.BytesIO()
        photo.save(buf, format=fmt)
        out[ext] = buf.getvalue()
    return out


SEEDS = _seeds()


@st.composite
def mutated(draw):
    ext = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[ext])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "overwrite", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            run = draw(st.binary(min_size=1, max_size=16))
            data[pos:pos + len(run)] = run
        elif kind == "cut":
            del data[pos:pos + draw(st.integers(1, 256))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
    return ext, bytes(data)


class _Timeout(BaseException):  # not Exception: load_image's catch-all must not swallow it
    pass


def _alarm(signum, frame):
    raise _Timeout


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated(), draft=st.sampled_from([None, 32]))
def test_mutated_images_decode_or_raise_image_error(scratch, case, draft):
    ext, data = case
    path = scratch / f"fuzz.{ext}"
    path.write_bytes(data)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    # SIGALRM cannot interrupt a hang inside C decoder code; this hard guard ends the run.
    faulthandler.dump_traceback_later(30, exit=True)
    try:
        im = load_image(path, draft)
        assert im.mode == "RGB" and im.width >= 1 and im.height >= 1
    except ImageError as e:
        assert str(e)  # a reason, for the skip list
    except _Timeout:
        pytest.fail(f"decoding hung on a mutated {ext} ({len(data)} bytes)")
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
