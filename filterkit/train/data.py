"""Training data: the two-view dataset (decoded per step), the in-memory store (decoded once,
augmented on the device), and the sampler that fixes each global batch and each sample's seed."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..augment import BatchTwoViews, TwoViews, store_size, store_transform
from ..errors import FilterkitError, ImageError
from ..images import OUTSIDE_LINK, Skip, discover_images, load_image, split_outside_links
from ..loader import decode_all, default_workers, stop_signal_rules
from ..progress import progress_bar


class _TwoViewDataset(Dataset):
    """Items are (index, seed): the seed fixes the sample's augmentations, so a resumed run or
    any number of workers sees exactly the same views. A file that fails to decode is
    replaced by the next one and reported. With ``labels`` (one class index per path) each
    item carries the label of the image it really returns; without, None. Items end with the
    image's multi-crop local views (``TwoViews.local``; an empty list without), drawn after
    the two global views so that a run without them draws exactly what it always did."""

    def __init__(self, paths: list[Path], views: TwoViews, draft_size: int, labels: list[int] | None = None) -> None:
        self.paths, self.views, self.draft_size, self.labels = paths, views, draft_size, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        failures = []
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            try:
                image = load_image(self.paths[i], self.draft_size)
            except ImageError as e:
                failures.append((i, str(e)))
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x1, x2 = self.views(image)
                local = self.views.local(image)
            return x1, x2, failures, None if self.labels is None else self.labels[i], local
        raise FilterkitError("no training image could be decoded")


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit; None
    where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _decode_store(paths: list[Path], img_size: int, workers: int | None, progress: bool,
                  local_world: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[Path], list[Skip]]:
    """Every image decoded once to uint8 [U, 3, S, S] (S = ``store_size``), for
    ``data_in_memory``: (store, store row of each kept path, kept paths, skips). Links to one
    file (a dataset repeated by linking) are decoded and stored once. Each of the
    ``local_world`` processes on this machine holds its own copy; refuses up front when those
    would not fit in half the available memory."""
    file_ids: dict[tuple[int, int], int] = {}
    unique: list[Path] = []
    slot: list[int] = []  # path -> position in ``unique``, -1: unreadable
    unreadable: dict[int, str] = {}
    for n, path in enumerate(paths):
        try:
            st = path.stat()
        except OSError as e:
            unreadable[n] = f"cannot read file: {e.strerror or e}"
            slot.append(-1)
            continue
        key = (st.st_dev, st.st_ino) if st.st_ino else (-1, n)  # some filesystems report inode 0
        if key not in file_ids:
            file_ids[key] = len(unique)
            unique.append(path)
        slot.append(file_ids[key])
    side = store_size(img_size)
    need = len(unique) * 3 * side * side * local_world
    free = available_memory()
    if free is not None and need > free / 2:
        copies = f" x {local_world} processes" if local_world > 1 else ""
        raise FilterkitError(f"--data-in-memory needs {need / 2**30:.1f} GiB for {len(unique)} images at "
                             f"{side} px{copies} but {free / 2**30:.1f} GiB is available: leave it out to "
                             "decode per step, or train on fewer images")
    if workers is None and local_world > 1:  # the processes of one machine share its cores
        workers = max(1, default_workers() // local_world)
    with progress_bar(f"decode to memory ({need / local_world / 2**30:.2f} GiB)", len(unique), progress) as advance:
        store, kept, failures = decode_all(unique, store_transform(side), side, workers=workers,
                                           on_batch=advance)
    row_of = {u: row for row, u in enumerate(kept)}
    failed = {f.index: f.reason for f in failures}
    rows = [row_of[u] for u in slot if u in row_of]
    kept_paths = [p for p, u in zip(paths, slot) if u in row_of]
    skips = [Skip(p, unreadable[n] if u < 0 else failed[u]) for n, (p, u) in enumerate(zip(paths, slot))
             if u not in row_of]
    return store, torch.tensor(rows, dtype=torch.long), kept_paths, skips


def _memory_batches(store: torch.Tensor, rows: torch.Tensor, views: BatchTwoViews, sampler: Sampler,
                    per_rank: int, device: torch.device, labels: torch.Tensor | None = None):
    """This rank's batches of the in-memory store, in the sampler's order, augmented on
    ``device``. The generator is seeded by the batch's first sample seed, so a resumed run sees
    the same views (a run on another number of processes draws them differently). The local
    views (``BatchTwoViews.local``) are drawn from the same generator after the global ones."""
    items = iter(sampler)
    while len(chunk := list(itertools.islice(items, per_rank))) == per_rank:
        picked = torch.tensor([i for i, _ in chunk])
        index = rows[picked]
        g = torch.Generator().manual_seed(chunk[0][1] % 2**63)  # parameters are drawn on the CPU
        images = store[index].to(device, non_blocking=True)
        x1, x2 = views(images, g)
        yield x1, x2, [], None if labels is None else labels[picked], views.local(images, g)


def _collate(items):
    x1 = torch.stack([it[0] for it in items])
    x2 = torch.stack([it[1] for it in items])
    labels = None if items[0][3] is None else torch.tensor([it[3] for it in items], dtype=torch.long)
    local = [torch.stack([it[4][v] for it in items]) for v in range(len(items[0][4]))]
    return x1, x2, [f for it in items for f in it[2]], labels, local


class _EpochSampler(Sampler):
    """This rank's share of each global batch of one epoch, from ``start_batch`` on."""

    def __init__(self, n: int, global_batch: int, steps: int, epoch: int, seed: int,
                 start_batch: int, rank: int, world: int) -> None:
        self.n, self.global_batch, self.steps, self.epoch = n, global_batch, steps, epoch
        self.seed, self.start_batch, self.rank, self.world = seed, start_batch, rank, world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.global_batch // self.world
        for b in range(self.start_batch, self.steps):
            lo = b * self.global_batch + self.rank * per_rank
            for j in range(lo, lo + per_rank):
                # The sample seed depends on (run seed, epoch, position), not on the worker.
                yield order[j], (self.seed * 1_000_003 + self.epoch) * 10_000_019 + j

    def __len__(self) -> int:
        return (self.steps - self.start_batch) * (self.global_batch // self.world)



def _check_decodable(paths: list[Path]) -> None:
    """Fail early, in one line, when no image decodes (workers would fail mid-epoch instead)."""
    reasons = []
    for path in paths:
        try:
            load_image(path, draft_size=32)
            return
        except ImageError as e:
            reasons.append(f"{path.name}: {e}")
    raise FilterkitError(f"none of the {len(paths)} images decodes (e.g. {reasons[0]})")



def load_images(data_dir: Path, follow_symlinks: bool, in_memory: bool, img_size: int, workers: int | None,
                progress: bool, world: int) -> tuple[list[Path], list[Skip], torch.Tensor | None, torch.Tensor | None]:
    """The training images under ``data_dir``: (paths, skipped, store, store rows); the store
    (``_decode_store``) only ``in_memory``. Refuses folders too small to train on."""
    paths = discover_images(data_dir, follow_symlinks=follow_symlinks)
    refused: list[Skip] = []
    if not follow_symlinks:
        paths, refused = split_outside_links(paths, data_dir)
    if len(paths) < 2:
        outside = sum(s.reason == OUTSIDE_LINK for s in refused)  # not the broken links
        note = f" ({outside} symlinks to files outside it were not read: pass --follow-symlinks)" if outside else ""
        raise FilterkitError(f"{data_dir} has {len(paths)} images{note}; pretraining needs at least 2")
    _check_decodable(paths)
    store = store_rows = None
    if in_memory:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        store, store_rows, paths, failed = _decode_store(paths, img_size, workers, progress, local_world)
        refused += failed
        if len(paths) < 2:
            reason = f" (e.g. {failed[0].path.name}: {failed[0].reason})" if failed else ""
            raise FilterkitError(f"{data_dir}: only {len(paths)} images decode{reason}; pretraining needs at least 2")
    return paths, refused, store, store_rows


def folder_labels(data_dir: Path, paths: list[Path], method: str) -> tuple[list[str], list[int]]:
    """(classes, class index of each path) for a supervised method: an image's class is its
    first-level sub-folder of ``data_dir``; classes sorted by name. An image directly in
    ``data_dir`` has no class, and is refused rather than skipped: silently leaving out part of
    the folder would train on other data than the user pointed at."""
    names = [p.relative_to(data_dir).parts for p in paths]
    loose = [p for p, parts in zip(paths, names) if len(parts) < 2]
    if loose:
        raise FilterkitError(f"--method {method} takes each image's class from its sub-folder of {data_dir}, but "
                             f"{len(loose)} images lie directly in it (e.g. {loose[0].name}): move them into class "
                             "folders")
    classes = sorted({parts[0] for parts in names})
    if len(classes) < 2:
        raise FilterkitError(f"--method {method} needs at least 2 classes (sub-folders of {data_dir}); found "
                             f"{len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[parts[0]] for parts in names]


class Batches:
    """This rank's (x1, x2, failures, labels, local) batches of an epoch's sampler: decoded per
    step by ``workers`` processes, or cut from the in-memory store and augmented on ``device``.
    Labels (a class index per image, ``folder_labels``) only when given; otherwise None.
    ``local``: ``local_crops`` batches [B, 3, local_size, local_size] (multi-crop), else []."""

    def __init__(self, paths: list[Path], store: torch.Tensor | None, rows: torch.Tensor | None, img_size: int,
                 min_crop_scale: float, mean, std, per_rank: int, workers: int, device: torch.device,
                 labels: list[int] | None = None, local_crops: int = 0, local_size: int | None = None) -> None:
        self.store, self.rows, self.per_rank, self.workers, self.device = store, rows, per_rank, workers, device
        self.labels = labels
        crops = dict(local_crops=local_crops, local_size=local_size)
        if store is None:
            self.dataset = _TwoViewDataset(paths, TwoViews(img_size, min_crop_scale, mean, std, **crops), img_size,
                                           labels)
        else:
            self.views = BatchTwoViews(img_size, min_crop_scale, mean, std, **crops)

    def __call__(self, sampler: Sampler, prefetch: int = 4):
        """``prefetch``: batches each worker decodes ahead (the --minutes probe takes 1, so its
        timed steps wait for decoding as a long run's do once the buffer is drained)."""
        if self.store is not None:
            labels = None if self.labels is None else torch.tensor(self.labels, dtype=torch.long)
            return _memory_batches(self.store, self.rows, self.views, sampler, self.per_rank, self.device, labels)
        return DataLoader(self.dataset, batch_size=self.per_rank, sampler=sampler, num_workers=self.workers,
                          collate_fn=_collate, worker_init_fn=stop_signal_rules(), drop_last=True, pin_memory=self.device.type == "cuda",
                          prefetch_factor=prefetch if self.workers else None)
