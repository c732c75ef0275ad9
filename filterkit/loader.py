"""The one image loader: decode + transform in DataLoader worker processes, in batches, and
the one loop that embeds them (:func:`embed_batches`).

Failures travel with the batch as :class:`Failure` records instead of raising, so one bad
file never stops a run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import ImageError, ImageReadError, WorkerDied
from .images import load_image

T = TypeVar("T")


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def ignore_stop_signals(_worker_id: int = 0, main_pid: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C and SIGTERM are the main process's to act on.
    A signal to the whole process group (a terminal's Ctrl-C, a scheduler's stop) would otherwise
    kill the workers mid-batch, and the main process's clean stop (a checkpoint, one line) would
    turn into a "worker killed" error. Only a SIGTERM from the main process itself (torch's, or
    multiprocessing's at exit, ``terminate()``) ends a worker; torch's watchdog ends them if the
    main process dies. The signals :func:`start_workers` held back while the worker started are
    taken here, once these rules are in place.

    Where the sender of a signal can be read (``sigwaitinfo``: Linux, BSDs), SIGTERM stays blocked
    in the worker's threads and one thread takes each: an "ignore the first, die on the second"
    rule could not tell the main process's ``terminate()`` from the group's signal, and a worker
    that had not seen the group's signal swallowed it, so the main process waited on it forever.
    Elsewhere (macOS, Windows) that rule stays: a worker swallows its first SIGTERM. ``main_pid``
    (:func:`stop_signal_rules`): the main process, which is not the parent under forkserver."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_end_on_sigterm_from, args=(main_pid or os.getppid(),), daemon=True,
                         name="filterkit-sigterm").start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return

    def first_sigterm(signum, frame):  # elsewhere: the main process's terminate() is the second
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, first_sigterm)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def stop_signal_rules() -> Callable[[int], None]:
    """The ``worker_init_fn`` of this process's DataLoaders: :func:`ignore_stop_signals`, told
    which process is the main one."""
    return functools.partial(ignore_stop_signals, main_pid=os.getpid())


def _end_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # as torch's own worker handler does for its main process's SIGTERM


def start_workers(batches: Iterable[T]) -> Iterator[T]:
    """``iter(batches)``, with Ctrl-C and SIGTERM held back in the workers it starts until
    :func:`ignore_stop_signals` runs in them. Between a worker's fork and its ``worker_init_fn``,
    torch's own SIGTERM handler is in place, and a signal to the process group then killed the
    worker (the main process saw "worker killed by signal" instead of stopping cleanly). The
    mask is inherited across fork (and exec); the main process's own is restored at once, so it
    takes a signal that came meanwhile as soon as the workers are started."""
    if not getattr(batches, "num_workers", 0) or not hasattr(signal, "pthread_sigmask"):
        return iter(batches)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(batches)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def worker_deaths_as_errors() -> Iterator[None]:
    """A decode worker that dies (torch: "DataLoader worker (pid ...) exited unexpectedly" or
    "... is killed by signal") becomes :class:`WorkerDied`, one line that says what to try."""
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith("DataLoader worker"):
            raise
        raise WorkerDied(f"a decode worker process died ({str(e).strip().rstrip('.')}); most often the system killed it for memory: "
                         "fewer --workers (0 decodes in this process) or a smaller --batch-size need less") from None


def default_workers() -> int:
    """Decode workers: one per core beyond the one the forward pass uses (at most 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 1) - 1))


class Failure(NamedTuple):
    """An input that did not become pixels."""

    index: int  # position in the input list
    reason: str  # shown to the user
    unreadable: bool  # its bytes could not be read here (ImageReadError): says nothing about the content


@dataclass
class Batch:
    indices: list[int]  # positions in the input list of the images in ``pixels``
    pixels: torch.Tensor  # [B, 3, S, S], B may be 0
    failures: list[Failure]


@dataclass
class EmbeddedBatch:
    indices: list[int]  # positions in the input list of the rows of ``vectors``
    vectors: np.ndarray | None  # [len(indices), D] float32; None when nothing in the batch decoded
    failures: list[Failure]


class _DecodeDataset(Dataset):
    def __init__(self, paths: Sequence[Path], transform: Callable, draft_size: int | None):
        self.paths, self.transform, self.draft_size = paths, transform, draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.paths[i], self.draft_size)), None
        except ImageError as e:
            return i, None, Failure(i, str(e), isinstance(e, ImageReadError))
        except Exception as e:  # a transform failure must not kill the worker either
            return i, None, Failure(i, f"cannot process image: {type(e).__name__}: {e}", False)


def _collate(items) -> Batch:
    good = [(i, x) for i, x, _ in items if x is not None]
    pixels = torch.stack([x for _, x in good]) if good else torch.empty(0)
    return Batch([i for i, _ in good], pixels, [f for _, x, f in items if x is None])


def embed_batches(
    paths: Sequence[Path],
    transform: Callable,
    draft_size: int | None,
    embed_batch: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    workers: int | None = None,
) -> Iterator[EmbeddedBatch]:
    """Decode ``paths`` (see :func:`iter_batches`) and embed each batch with ``embed_batch``,
    in input order: the one embedding loop behind Encoder.embed, folder embedding,
    evaluation and the Ray actors."""
    for batch in iter_batches(paths, transform, draft_size, batch_size=batch_size, workers=workers):
        vectors = embed_batch(batch.pixels).numpy() if batch.indices else None
        yield EmbeddedBatch(batch.indices, vectors, batch.failures)


def embed_all(
    paths: Sequence[Path],
    transform: Callable,
    draft_size: int | None,
    embed_batch: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    workers: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray | None, list[int], list[Failure]]:
    """Decode and embed ``paths``: (vectors [M, D] or None if none decoded, positions of those
    M paths, the failures). ``on_batch(n)`` reports progress."""
    vectors, kept, failures = [], [], []
    for batch in embed_batches(paths, transform, draft_size, embed_batch, batch_size, workers):
        if batch.indices:
            vectors.append(batch.vectors)
            kept += batch.indices
        failures += batch.failures
        if on_batch:
            on_batch(len(batch.indices) + len(batch.failures))
    return (np.concatenate(vectors) if vectors else None), kept, failures


def iter_batches(
    paths: Sequence[Path],
    transform: Callable,
    draft_size: int | None,
    batch_size: int = 64,
    workers: int | None = None,
) -> Iterator[Batch]:
    """Yield decoded batches in input order. ``workers=None``: in-process for a single
    batch (no start-up cost), else :func:`default_workers` processes."""
    if workers is None:
        workers = 0 if len(paths) <= batch_size else default_workers()
    loader = DataLoader(
        _DecodeDataset(list(paths), transform, draft_size),
        worker_init_fn=stop_signal_rules(),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    with worker_deaths_as_errors():
        yield from start_workers(loader)


def decode_all(
    paths: Sequence[Path],
    transform: Callable,
    draft_size: int | None,
    batch_size: int = 256,
    workers: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, list[int], list[Failure]]:
    """Decode ``paths`` once into one tensor (e.g. uint8 [M, 3, S, S] for training from
    memory): (tensor, positions of the M decoded paths, the failures)."""
    out: torch.Tensor | None = None  # filled in place: no second copy of a large store
    kept, failures = [], []
    for batch in iter_batches(paths, transform, draft_size, batch_size=batch_size, workers=workers):
        if batch.indices:
            if out is None:
                out = torch.empty((len(paths), *batch.pixels.shape[1:]), dtype=batch.pixels.dtype)
            out[len(kept):len(kept) + len(batch.indices)] = batch.pixels
            kept += batch.indices
        failures += batch.failures
        if on_batch:
            on_batch(len(batch.indices) + len(batch.failures))
    return (out[:len(kept)] if out is not None else torch.empty(0)), kept, failures
