"""Self-supervised pretraining of a ViT on a folder of images: MoCo v3 by default, or any
method of ``filterkit.methods`` (``TrainOptions(method=...)``, ``pretrain --method``).

    options.py      TrainOptions (recipe, then DEFAULTS), TrainResult, how a run stops
    data.py         the views dataset (two global, any local), the in-memory store, the epoch sampler, folder labels
    checkpoints.py  save, load, resume merge, export with provenance, --init-from
    monitor.py      NaN and collapse checks, the JSON log, rate, the kNN monitor
    budget.py       --minutes: the steps a measured step time fits in the budget, the plan's options
    loop.py         pretrain: prepare, then the steps; AdamW, LR and momentum schedules, DDP

    >>> result = pretrain("./images", "models/mine", TrainOptions(preset="vit-tiny-4-32", epochs=10))
"""

from ..images import discover_images
from ..moco import MoCo, gather_keys, momentum_at
from .checkpoints import (
    CHECKPOINT,
    _apply_init,
    _export,
    _Init,
    _load_init,
    _merge_resume_options,
    _options_from_init,
    _provenance_name,
    _resolve_init_path,
    _save_checkpoint,
    _scrubbed_data,
    _scrubbed_stage,
    _scrubbed_training,
    checkpoint_step,
    load_checkpoint,
)
from .data import (
    _check_decodable,
    _collate,
    _decode_store,
    _EpochSampler,
    _memory_batches,
    _TwoViewDataset,
    available_memory,
    folder_labels,
)
from .loop import _dist_setup, check_options, lr_at, make_optimizer, pretrain, train_step
from .monitor import (
    COLLAPSE_STD,
    LOG,
    MONITOR_WAIT,
    Monitor,
    _knn_monitor,
    _truncate_log,
)
from .options import (
    _SCHEDULE_KEYS,
    DEFAULTS,
    TrainingInterrupted,
    TrainingStopped,
    TrainOptions,
    TrainResult,
)

__all__ = [
    "CHECKPOINT",
    "COLLAPSE_STD",
    "DEFAULTS",
    "LOG",
    "MONITOR_WAIT",
    "_SCHEDULE_KEYS",
    "MoCo",
    "Monitor",
    "TrainOptions",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingStopped",
    "_EpochSampler",
    "_Init",
    "_TwoViewDataset",
    "_apply_init",
    "_check_decodable",
    "_collate",
    "_decode_store",
    "_dist_setup",
    "_export",
    "_knn_monitor",
    "_load_init",
    "_memory_batches",
    "_merge_resume_options",
    "_options_from_init",
    "_provenance_name",
    "_resolve_init_path",
    "_save_checkpoint",
    "_scrubbed_data",
    "_scrubbed_stage",
    "_scrubbed_training",
    "_truncate_log",
    "available_memory",
    "check_options",
    "checkpoint_step",
    "discover_images",
    "folder_labels",
    "gather_keys",
    "load_checkpoint",
    "lr_at",
    "make_optimizer",
    "momentum_at",
    "pretrain",
    "train_step",
]
