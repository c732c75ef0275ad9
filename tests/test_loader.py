"""loader.embed_batches: the one decode + embed loop."""

from __future__ import annotations

import numpy as np
import pytest

from filterkit.errors import ImageError, ImageReadError
from filterkit.loader import embed_all, embed_batches, ignore_stop_signals, start_workers


def test_embed_batches_keeps_input_order_and_tells_unreadable_from_undecodable(photos_dir, small_encoder,
                                                                               tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    photos = sorted(photos_dir.iterdir())[:3]
    paths = [photos[0], tmp_path / "missing.jpg", photos[1], tmp_path / "broken.jpg", photos[2]]
    enc = small_encoder
    batches = list(embed_batches(paths, enc.transform, enc.config.img_size, enc.embed_batch,
                                 batch_size=2, workers=0))
    assert [b.indices for b in batches] == [[0], [2], [4]]
    failures = [f for b in batches for f in b.failures]
    assert [(f.index, f.unreadable) for f in failures] == [(1, True), (3, False)]
    assert failures[0].reason.startswith("cannot read file") and failures[1].reason.startswith("not an image")
    vectors = np.concatenate([b.vectors for b in batches])
    np.testing.assert_allclose(vectors, enc.embed(photos), atol=1e-6)
    # embed_all, on the same loop, returns the same failures; Encoder.embed raises by their kind.
    _, kept, failed = embed_all(paths, enc.transform, enc.config.img_size, enc.embed_batch, 2, 0)
    assert kept == [0, 2, 4] and failed == failures
    with pytest.raises(ImageReadError, match="missing.jpg: cannot read file"):
        enc.embed([photos[0], tmp_path / "missing.jpg"])
    with pytest.raises(ImageError, match="broken.jpg: not an image") as raised:
        enc.embed([photos[0], tmp_path / "broken.jpg"])
    assert not isinstance(raised.value, ImageReadError)


def _slow_start_then_ignore_stop_signals(worker_id):
    import time

    time.sleep(1.0)  # widens the gap between a worker's fork and its handlers, where a signal once killed it
    ignore_stop_signals(worker_id)


def _loader_with_slow_starting_worker():
    from torch.utils.data import DataLoader

    return DataLoader(list(range(6)), batch_size=2, num_workers=1, worker_init_fn=_slow_start_then_ignore_stop_signals)


def _started_worker(batches_of):
    import multiprocessing

    before = set(multiprocessing.active_children())
    batches = start_workers(batches_of)
    (worker,) = set(multiprocessing.active_children()) - before
    return batches, worker


def test_a_group_sigterm_while_a_decode_worker_starts_is_the_main_process_s_to_act_on():
    import signal
    import subprocess
    import sys

    batches, worker = _started_worker(_loader_with_slow_starting_worker())
    # from another process, as a scheduler's signal to the group: it lands before the worker's handlers are set
    subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({worker.pid}, signal.SIGTERM)"], check=True)
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3], [4, 5]]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()  # this process's mask was given back


@pytest.mark.skipif(not hasattr(__import__("signal"), "sigwaitinfo"),
                    reason="without sigwaitinfo (macOS, Windows) a worker swallows its first SIGTERM, whoever sent it")
def test_a_decode_worker_that_saw_no_stop_signal_still_ends_on_the_main_process_s_terminate():
    # multiprocessing terminate()s live workers at exit; a worker that swallowed it hung the exit forever
    batches, worker = _started_worker(_loader_with_slow_starting_worker())
    assert next(batches).tolist() == [0, 1]
    worker.terminate()
    worker.join(timeout=20)
    assert worker.exitcode is not None, "the worker outlived its main process's terminate()"
    del batches


def test_a_decode_worker_killed_while_embedding_is_one_line(photos_dir, monkeypatch):
    import os
    import signal

    import torch

    import filterkit.loader as loader
    from filterkit.errors import WorkerDied
    from filterkit.images import discover_images

    load_image = loader.load_image

    def killed_in_the_worker(*args, **kwargs):  # as the kernel's OOM killer would
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return load_image(*args, **kwargs)

    monkeypatch.setattr(loader, "load_image", killed_in_the_worker)
    with pytest.raises(WorkerDied, match=r"decode worker process died .*fewer --workers"):
        list(loader.iter_batches(discover_images(photos_dir), lambda im: torch.zeros(3, 4, 4), None, 2, workers=1))
