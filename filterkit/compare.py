"""Which self-supervised method suits a folder at a given compute: short runs of each method
at an equal wall-clock budget (same preset, data and seed), then one ranking.

Ranked by weighted kNN top-1 on a labelled folder when one is given (``evaluate.py``, with the
random-init and raw-pixel baselines measured in the same run); else by label-free signals of
the backbone's embeddings of the folder itself:

- RankMe (Garrido et al. 2023, "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank"): exp of the entropy of the normalised
  singular values, p_k = σ_k / ‖σ‖₁ + ε, RankMe = exp(−Σ p_k log p_k). From 1 (every image
  at one point) to min(N, D); a collapsed method scores low.
- alignment (Wang & Isola 2020, "Understanding Contrastive Representation Learning through
  Alignment and Uniformity on the Hypersphere"): E ‖f(x) − f(y)‖² over the two augmented views
  (x, y) of an image, f unit-norm. 0: the views coincide; lower is better.
- uniformity (same paper): log E exp(−2 ‖f(x) − f(y)‖²) over pairs of distinct images; from 0
  (one point) down to about −4 on a sphere uniformly covered; lower is better.
- with exemplars: the keep-like AUROC of the exemplars against the folder, each exemplar scored
  leave-one-out against the others (``filtering.leave_one_out_scores``), each folder image
  against all of them, after the filter's normaliser. It is what ``filter --keep-like`` relies
  on (the exemplars stand out from the collection), but the folder also holds unlabelled
  keep-like images, so it is a relative signal between methods, not a filter accuracy.

The label-free ranking is by the exemplar AUROC when exemplars are given, else by RankMe;
alignment and uniformity are reported beside it (a method with a high RankMe whose views do not
align has learnt little invariance).

    >>> result = compare_methods("./images", "compare", minutes=2, methods=["moco-v3", "simclr"])
    >>> result.winner, [r.method for r in result.ranked()]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import methods as method_table
from .compare_record import RESULT_FILE
from .errors import FilterkitError, ImageError
from .fsutil import atomic_write_bytes

RANKME_EPS = 1e-7  # the paper's ε
UNIFORMITY_T = 2.0  # Wang & Isola's t
MAX_IMAGES = 1000  # of FOLDER, evenly spaced over the sorted paths, for the label-free signals
VIEW_PAIRS = 256  # images whose two augmented views give the alignment
TEST_EVERY = 5  # a labelled folder without train/ and test/: every 5th image of a class is a test image


# -- the signals ---------------------------------------------------------------------------------
def rankme(z: torch.Tensor | np.ndarray, eps: float = RANKME_EPS) -> float:
    """exp of the entropy of the normalised singular values of ``z`` [N, D] (Garrido et al. 2023)."""
    z = torch.as_tensor(np.asarray(z, dtype=np.float64) if isinstance(z, np.ndarray) else z.double())
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def alignment(z1: torch.Tensor | np.ndarray, z2: torch.Tensor | np.ndarray, alpha: float = 2.0) -> float:
    """E ‖z1_i − z2_i‖^α over the rows (positive pairs) of unit vectors (Wang & Isola 2020)."""
    z1, z2 = torch.as_tensor(z1).double(), torch.as_tensor(z2).double()
    return float((z1 - z2).norm(dim=1).pow(alpha).mean())


def uniformity(z: torch.Tensor | np.ndarray, t: float = UNIFORMITY_T) -> float:
    """log E exp(−t ‖z_i − z_j‖²) over the pairs i < j of unit vectors (Wang & Isola 2020)."""
    z = torch.as_tensor(z).double()
    if len(z) < 2:
        raise FilterkitError("uniformity needs at least two embeddings")
    return float(torch.pdist(z).pow(2).mul(-t).exp().mean().log())


def exemplar_auroc(folder_vectors: np.ndarray, exemplar_vectors: np.ndarray) -> float:
    """AUROC of the exemplars' leave-one-out keep-like scores against the folder images'
    scores (top-m mean cosine, after the filter's default normaliser fitted on both; the filter's
    default blends in the exemplars' mean direction, but the recorded method tables used top-m)."""
    from sklearn.metrics import roc_auc_score

    from .filtering import DEFAULT_NORMALIZE, exemplar_scores, leave_one_out_scores
    from .normalize import Normalizer

    if len(exemplar_vectors) < 2 or len(folder_vectors) < 1:
        raise FilterkitError("the exemplar AUROC needs at least two exemplars and one other image")
    normalizer = Normalizer.fit(np.concatenate([folder_vectors, exemplar_vectors]), DEFAULT_NORMALIZE)
    ex, pool = normalizer(exemplar_vectors), normalizer(folder_vectors)
    positives = leave_one_out_scores(ex)
    negatives = exemplar_scores(pool, ex).values
    truth = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    return float(roc_auc_score(truth, np.r_[positives, negatives]))


@dataclass
class Signals:
    """What one encoder measured; None: not measured (no labelled folder, no exemplars)."""

    rankme: float
    alignment: float
    uniformity: float
    exemplar_auroc: float | None = None
    knn_top1: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {k: None if v is None else round(v, 4) for k, v in self.__dict__.items()}


# -- the evaluation sets, fixed once and shared by every encoder ------------------------------------
def _spread(paths: list[Path], n: int) -> list[Path]:
    """At most ``n`` of ``paths``, evenly spaced (deterministic)."""
    if len(paths) <= n:
        return list(paths)
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


def _split_labelled(root: Path):
    """(train, test) LabelledImages: root/train and root/test when both exist, else every
    TEST_EVERY-th image of each class (sorted) held out."""
    from .evaluate import LabelledImages, labelled_images

    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = labelled_images(root / "train"), labelled_images(root / "test")
        if train.classes != test.classes:
            raise FilterkitError(f"{root}/train and {root}/test have different classes: {train.classes} vs "
                                 f"{test.classes}")
        return train, test
    everything = labelled_images(root)
    position = np.zeros(len(everything.paths), dtype=np.int64)
    for c in range(len(everything.classes)):
        members = np.flatnonzero(everything.labels == c)
        position[members] = np.arange(len(members))
    held = position % TEST_EVERY == TEST_EVERY - 1
    for c, name in enumerate(everything.classes):
        if not held[everything.labels == c].any():
            raise FilterkitError(f"--labelled {root}: class {name} has fewer than {TEST_EVERY} images, too few to "
                                 f"hold one out (give {root}/train and {root}/test, or more images)")

    def pick(mask):
        return LabelledImages([p for p, keep in zip(everything.paths, mask) if keep], everything.labels[mask],
                              everything.classes)

    return pick(~held), pick(held)


class EvaluationSets:
    """The images every encoder is measured on: a spread of FOLDER, the two augmented views of
    some of them (seeded per image, so every encoder sees the same views), the exemplars and
    the labelled split."""

    def __init__(self, folder: Path, labelled: Path | None = None, exemplars: Path | None = None,
                 max_images: int = MAX_IMAGES, view_pairs: int = VIEW_PAIRS, min_crop_scale: float = 0.08,
                 batch_size: int = 128, workers: int | None = None, progress: bool = False) -> None:
        from .images import discover_images

        self.paths = _spread(discover_images(folder), max_images)
        self.exemplars = None
        if exemplars is not None:
            if not exemplars.is_dir():
                raise FilterkitError(f"--exemplars folder not found: {exemplars}")
            self.exemplars = discover_images(exemplars)
            if len(self.exemplars) < 2:
                raise FilterkitError(f"--exemplars {exemplars} has {len(self.exemplars)} images; the leave-one-out "
                                     "AUROC needs at least 2")
            chosen = {p.resolve() for p in self.exemplars}  # exemplars inside FOLDER are not its "other" images
            self.paths = [p for p in self.paths if p.resolve() not in chosen]
        if len(self.paths) < 2:
            raise FilterkitError(f"{folder} has {len(self.paths)} images to measure on; at least 2 are needed")
        self.view_paths = _spread(self.paths, view_pairs)
        self.labelled = _split_labelled(labelled) if labelled is not None else None
        self.min_crop_scale, self.batch_size, self.workers, self.progress = min_crop_scale, batch_size, workers, progress

    def _vectors(self, encoder, paths: list[Path], name: str) -> np.ndarray:
        from .evaluate import features

        vectors, _ = features(paths, encoder.transform, encoder.config.img_size, encoder.embed_batch,
                              self.batch_size, self.workers, self.progress, name)
        return vectors

    def _views(self, encoder) -> tuple[np.ndarray, np.ndarray]:
        """Both views' embeddings [M, D] of the view images (those that decode)."""
        from .augment import TwoViews
        from .images import load_image

        cfg = encoder.config
        views = TwoViews(cfg.img_size, self.min_crop_scale, cfg.mean, cfg.std)
        out1, out2, batch1, batch2 = [], [], [], []
        for i, path in enumerate(self.view_paths):
            try:
                image = load_image(path, cfg.img_size)
            except ImageError:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1_000_003 + i)
                x1, x2 = views(image)
            batch1.append(x1)
            batch2.append(x2)
            if len(batch1) == self.batch_size:
                out1.append(encoder.embed_batch(torch.stack(batch1)))
                out2.append(encoder.embed_batch(torch.stack(batch2)))
                batch1, batch2 = [], []
        if batch1:
            out1.append(encoder.embed_batch(torch.stack(batch1)))
            out2.append(encoder.embed_batch(torch.stack(batch2)))
        if not out1:
            raise FilterkitError("none of the images for the alignment could be decoded")
        return torch.cat(out1).numpy(), torch.cat(out2).numpy()

    def measure(self, encoder, name: str = "model") -> Signals:
        """Every signal of ``encoder`` (kNN only with a labelled folder, AUROC only with exemplars)."""
        from .evaluate import encoder_knn_top1

        was_training = encoder.backbone.training
        encoder.backbone.eval()
        try:
            folder = self._vectors(encoder, self.paths, f"{name}: folder")
            z1, z2 = self._views(encoder)
            found = Signals(rankme(folder), alignment(z1, z2), uniformity(folder))
            if self.exemplars is not None:
                found.exemplar_auroc = exemplar_auroc(folder, self._vectors(encoder, self.exemplars,
                                                                            f"{name}: exemplars"))
        finally:
            encoder.backbone.train(was_training)
        if self.labelled is not None:
            found.knn_top1 = encoder_knn_top1(encoder, *self.labelled, batch_size=self.batch_size,
                                              workers=self.workers, progress=self.progress, name=f"{name}: kNN")
        return found

    def raw_pixels(self) -> dict[str, float]:
        """The raw-pixel baseline of the signals that compare across dimensions (kNN, AUROC)."""
        from .augment import eval_transform
        from .evaluate import RAW_PIXEL_SIZE, features, knn_top1, raw_pixel_embed

        out: dict[str, float] = {}
        transform = eval_transform(RAW_PIXEL_SIZE)
        if self.exemplars is not None:
            def vectors(paths, what):
                return features(paths, transform, RAW_PIXEL_SIZE, raw_pixel_embed, self.batch_size, self.workers,
                                self.progress, f"raw pixels: {what}")[0]
            out["exemplar_auroc"] = exemplar_auroc(vectors(self.paths, "folder"), vectors(self.exemplars, "exemplars"))
        if self.labelled is not None:
            out["knn_top1"] = knn_top1(*self.labelled, transform, RAW_PIXEL_SIZE, raw_pixel_embed,
                                       batch_size=self.batch_size, workers=self.workers, progress=self.progress,
                                       name="raw pixels: kNN")
        return out


# -- the comparison --------------------------------------------------------------------------------
def has_classes(folder: Path) -> bool:
    """Whether ``folder``'s images all lie in first-level sub-folders, at least two of them (the
    labels --method supcon trains on)."""
    from .images import discover_images
    from .train.data import folder_labels

    try:
        folder_labels(folder, discover_images(folder), "supcon")
    except FilterkitError:
        return False
    return True


def choose_methods(folder: Path, asked: list[str] | None) -> list[str]:
    """The methods to run: ``asked`` (checked), else every method, supcon only where FOLDER has
    class sub-folders (it trains on those labels)."""
    labels = has_classes(folder)
    if not asked:
        return [m for m in method_table.METHODS if labels or not method_table.method_class(m).needs_labels]
    for name in asked:
        method_table.method_class(name)  # unknown: a clear error listing the methods
    if len(set(asked)) != len(asked):
        raise FilterkitError(f"--methods lists a method twice: {','.join(asked)}")
    for name in asked:
        if method_table.method_class(name).needs_labels and not labels:
            raise FilterkitError(f"--methods {name} is supervised: it needs {folder} to hold its images in class "
                                 "sub-folders (at least 2, no loose images)")
    return list(asked)


@dataclass
class MethodRun:
    """One method's run: where its model went (relative to --out), how far it got, what it measured."""

    method: str
    model: str
    supervised: bool
    steps: int = 0
    total_steps: int = 0
    stopped_by: str | None = None
    wall_seconds: float = 0.0
    final_loss: float | None = None
    signals: Signals | None = None
    error: str | None = None  # the run stopped on a health check (NaN loss, collapse)
    model_id: str | None = None  # of the model measured: a rerun checks the folder still holds it
    resumed_at_step: int | None = None  # continued from an interrupted run's checkpoint of this step

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "signals"}
        out["signals"] = None if self.signals is None else self.signals.to_dict()
        return out

    def to_record(self) -> dict[str, Any]:
        """As ``to_dict``, with the signals unrounded: a resumed comparison ranks on the same values."""
        return {**self.to_dict(), "signals": None if self.signals is None else dict(self.signals.__dict__)}

    @classmethod
    def from_record(cls, doc: dict[str, Any]) -> MethodRun:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        signals = values.pop("signals", None)
        return cls(**values, signals=None if signals is None else Signals(**signals))


@dataclass
class Comparison:
    folder: str  # the base name, never a path
    minutes: float
    preset: str
    seed: int
    ranked_by: str  # a Signals field
    runs: list[MethodRun] = field(default_factory=list)
    baselines: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def ranked(self) -> list[MethodRun]:
        """Best first: by ``ranked_by`` (higher is better), RankMe breaking ties; failed runs last."""
        def key(run: MethodRun):
            if run.signals is None:
                return (1, 0.0, 0.0)
            value = getattr(run.signals, self.ranked_by)
            return (0, -(value if value is not None and math.isfinite(value) else -math.inf), -run.signals.rankme)
        return sorted(self.runs, key=key)

    @property
    def winner(self) -> str | None:
        best = self.ranked()
        return best[0].method if best and best[0].signals is not None else None

    def to_dict(self) -> dict[str, Any]:
        winner = self.winner
        return {"folder": self.folder, "minutes_per_method": self.minutes, "preset": self.preset, "seed": self.seed,
                "ranked_by": self.ranked_by, "ranking": [r.method for r in self.ranked()],
                "winner": None if winner is None else {"method": winner, "model": winner},
                "runs": [r.to_dict() for r in self.ranked()], "baselines": self.baselines,
                "signals": {"rankme": "higher is better", "alignment": "lower is better",
                            "uniformity": "lower is better", "exemplar_auroc": "higher is better",
                            "knn_top1": "higher is better"}}


def ranking_signal(labelled: Path | None, exemplars: Path | None) -> str:
    return "knn_top1" if labelled is not None else "exemplar_auroc" if exemplars is not None else "rankme"


class ComparisonInterrupted(KeyboardInterrupt):
    """Ctrl-C during a comparison. The finished methods are in OUT's record; ``compare_methods``
    with ``resume=True`` skips them and continues ``method`` (from its checkpoint when it saved
    one, at ``step``)."""

    def __init__(self, out: Path, finished: list[str], total: int, method: str | None, step: int | None) -> None:
        from .compare_record import RECORD_FILE

        self.out, self.finished, self.total, self.method, self.step = out, finished, total, method, step
        where = ""
        if method is not None:
            where = (f"; {method} was interrupted and will continue from its checkpoint (step {step})"
                     if step is not None else f"; {method} was interrupted and will run again")
        super().__init__(f"{len(finished)} of {total} methods finished, recorded in {out / RECORD_FILE}{where}")


def compare_methods(folder: str | os.PathLike, out: str | os.PathLike, minutes: float,
                    methods: list[str] | None = None, labelled: str | os.PathLike | None = None,
                    exemplars: str | os.PathLike | None = None, preset: str | None = None, depth: int | None = None,
                    batch_size: int | None = None, seed: int = 0, device: str = "auto", workers: int | None = None,
                    data_in_memory: bool = False, max_images: int = MAX_IMAGES, progress: bool = True,
                    say: Callable[[str], None] = lambda line: None, max_steps: int | None = None,
                    resume: bool = False, overwrite: bool = False) -> Comparison:
    """Pretrain each method on ``folder`` for ``minutes`` of wall clock into ``out/<method>``,
    measure each (and the random-init baseline, plus raw pixels for kNN and AUROC), write
    ``out/compare.json`` after every method, and return the comparison. ``max_steps`` caps every
    run's steps as well (the same for all: a quick look, or a test that must not depend on the
    machine's speed).

    Each finished method is recorded in ``out/compare-record.json`` (``compare_record.py``) with
    the settings. ``resume=True`` continues the comparison recorded there, which must have the
    same settings: finished methods are kept, an interrupted run continues from its checkpoint
    (or starts again if it saved none), the rest run. ``overwrite=True`` deletes the recorded
    comparison's files first. Without either, an ``out`` holding files is refused. Ctrl-C
    raises ``ComparisonInterrupted`` (a KeyboardInterrupt) once the record is safe."""
    from .compare_record import RECORD_FILE, folder_fingerprint, open_record
    from .devices import pick_device
    from .encoder import Encoder, build_backbone
    from .train import TrainingInterrupted, TrainOptions, check_options

    folder, out = Path(folder), Path(out)
    labelled = Path(labelled) if labelled is not None else None
    exemplars = Path(exemplars) if exemplars is not None else None
    if not folder.is_dir():
        raise FilterkitError(f"folder not found: {folder}")
    if not (minutes > 0 and math.isfinite(minutes)):
        raise FilterkitError(f"--minutes must be a positive number of minutes per method, got {minutes:g}")
    chosen = choose_methods(folder, methods)
    sets = EvaluationSets(folder, labelled, exemplars, max_images, workers=workers, progress=progress)
    settings = {"folder": folder_fingerprint(folder), "methods": chosen, "minutes": minutes, "max_steps": max_steps,
                "seed": seed, "preset": preset, "depth": depth, "batch_size": batch_size,
                "device": pick_device(device).type, "data_in_memory": bool(data_in_memory),
                "labelled": folder_fingerprint(labelled), "exemplars": folder_fingerprint(exemplars),
                "max_images": max_images}
    for name in chosen:  # a bad option is refused before --overwrite deletes anything
        check_options(TrainOptions(method=name, preset=preset, depth=depth, batch_size=batch_size, seed=seed,
                                   minutes=minutes, max_steps=max_steps), 1, settings["device"])
    record = open_record(out, settings, resume, overwrite, say)
    comparison = Comparison(folder.resolve().name or "root", minutes, preset or "default", seed,
                            ranking_signal(labelled, exemplars))
    left = [m for m in chosen if m not in record.runs]
    kept = f" ({len(chosen) - len(left)} finished earlier)" if len(left) < len(chosen) else ""
    say(f"{len(left)} methods x {minutes:g} min{kept}: about {len(left) * minutes:g} min of training, then the "
        f"measurements (ranked by {comparison.ranked_by})")
    current = None
    try:
        for n, name in enumerate(chosen, 1):
            run = _recorded_run(out, record, name, say)
            if run is not None:
                say(f"[{n}/{len(chosen)}] {name}: finished earlier, kept from {out / RECORD_FILE}")
            else:
                say(f"[{n}/{len(chosen)}] {name}: pretraining for {minutes:g} min")
                current = name
                options = TrainOptions(method=name, preset=preset, depth=depth, batch_size=batch_size, seed=seed,
                                       minutes=minutes, max_steps=max_steps, data_in_memory=data_in_memory or None)
                run = _run_method(name, folder, out, sets, options, device, workers, progress, say)
                record.finish(out, name, run.to_record())  # first: now safe from an interruption
                current = None
            if run.signals is not None:
                comparison.preset = _config(out, run)["architecture"].get("preset") or comparison.preset
            comparison.runs.append(run)
            _write(out, comparison)
        measured = next((r for r in comparison.runs if r.signals is not None), None)
        if measured is None:
            raise FilterkitError("every method stopped on a health check (the messages above say why): nothing "
                                 "to rank. Try one of them with `filterkit pretrain --method M` and a lower --lr")
        if not record.baselines:  # the same architecture and views for every method: measured once
            say("baselines: random init, raw pixels")
            cfg = Encoder.load(out / measured.model, device="cpu").config
            sets.min_crop_scale = _config(out, measured)["training"]["min_crop_scale"]
            torch.manual_seed(0)
            random_init = Encoder(build_backbone(cfg), cfg, device=device)
            record.set_baselines(out, {"random_init": sets.measure(random_init, "random init").to_dict(),
                                       "raw_pixels": {k: round(v, 4) for k, v in sets.raw_pixels().items()}})
        comparison.baselines = record.baselines
        _write(out, comparison)
    except TrainingInterrupted as e:  # the run saved a checkpoint of step e.step
        raise ComparisonInterrupted(out, list(record.runs), len(chosen), current, e.step) from None
    except KeyboardInterrupt:
        from .train import CHECKPOINT, checkpoint_step

        step = None
        if current is not None and (out / current / CHECKPOINT).is_file():
            try:
                step = checkpoint_step(out / current / CHECKPOINT)
            except FilterkitError:
                pass  # say it will run again; the rerun reports the unreadable checkpoint
        raise ComparisonInterrupted(out, list(record.runs), len(chosen), current, step) from None
    return comparison


def _config(out: Path, run: MethodRun) -> dict[str, Any]:
    from .compare_record import relative_model

    return json.loads((relative_model(out, run.model) / "config.json").read_text(encoding="utf-8"))


def _recorded_run(out: Path, record, name: str, say: Callable[[str], None]) -> MethodRun | None:
    """``name``'s run from the record, when it finished and its model folder still holds the
    model it measured; None: it has to run."""
    from .compare_record import RECORD_FILE, relative_model

    saved = record.runs.get(name)
    if saved is None:
        return None
    try:
        run = MethodRun.from_record(saved)
    except (TypeError, AttributeError) as e:  # an edited or foreign record: say so, no traceback
        raise FilterkitError(f"{out / RECORD_FILE}: the run of {name} cannot be read ({e}): move the record "
                             "away (or pass --overwrite), or choose another --out") from None
    if run.signals is None:
        return run  # stopped on a health check: a finished run, with its message
    model_dir = relative_model(out, run.model)
    if not (model_dir / "config.json").is_file():
        say(f"  {name}: recorded as finished, but {model_dir} no longer holds its model: training it again")
        del record.runs[name]
        return None
    found = _config(out, run).get("model_id")
    if run.model_id is not None and found != run.model_id:
        raise FilterkitError(f"{model_dir} holds model {found}, not the model {run.model_id} that {out / RECORD_FILE} "
                             "measured: put it back, delete the folder to train that method again, or pass "
                             "--overwrite to start the comparison again")
    return run


def _run_method(name: str, folder: Path, out: Path, sets: EvaluationSets, options, device: str,
                workers: int | None, progress: bool, say: Callable[[str], None]) -> MethodRun:
    """Pretrain one method into ``out/<name>`` (continuing an interrupted run's checkpoint
    there) and measure it."""
    from .compare_record import clear_unstarted
    from .encoder import Encoder
    from .train import CHECKPOINT, LOG, TrainingStopped, checkpoint_step, pretrain

    model_dir = out / name
    run = MethodRun(name, name, method_table.method_class(name).needs_labels)
    if model_dir.is_symlink():  # a run is written (and resumed) inside the comparison's folder only
        raise FilterkitError(f"{model_dir} is a symbolic link: the comparison writes each method's run inside "
                             f"{out}; remove the link or pass another --out")
    if (model_dir / CHECKPOINT).is_file():
        # The trainer's --resume: the same planned schedule, data order and RNG, and the budget
        # counts the training time already spent, so the run ends as an uninterrupted one would.
        run.resumed_at_step = checkpoint_step(model_dir / CHECKPOINT)
        say(f"  continuing its interrupted run from its checkpoint (step {run.resumed_at_step}); the "
            f"{options.minutes:g} min budget includes the training time it already had")
    else:
        clear_unstarted(model_dir)
    try:
        result = pretrain(folder, model_dir, options, resume=run.resumed_at_step is not None, device=device,
                          workers=workers, progress=progress)
    except TrainingStopped as e:  # this method's failure, not the comparison's: the others still run
        run.error = str(e)
        say(f"  {name} stopped: {e}")
        return run
    config = _config(out, run)
    training = config["training"]
    run.steps, run.total_steps, run.stopped_by = result.steps, result.total_steps, result.stopped_by
    run.wall_seconds = float(training["compute"]["wall_seconds"])  # over both sessions of a resumed run
    run.final_loss = result.final_loss if math.isfinite(result.final_loss) else _last_loss(model_dir / LOG)
    run.model_id = config["model_id"]
    encoder = Encoder.load(model_dir, device=device)
    sets.min_crop_scale = training["min_crop_scale"]  # the views the runs trained on (one recipe for all)
    run.signals = sets.measure(encoder, name)
    return run


def _last_loss(log: Path) -> float | None:
    """The last finite loss of a training log: a resumed run whose steps were all done before
    the interruption trains none, and its TrainResult has no loss."""
    if not log.is_file():
        return None
    for line in reversed(log.read_text(encoding="utf-8").splitlines()):
        try:
            loss = json.loads(line).get("loss")
        except json.JSONDecodeError:
            continue
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            return float(loss)
    return None


def _write(out: Path, comparison: Comparison) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / RESULT_FILE, (json.dumps(comparison.to_dict(), indent=2) + "\n").encode("utf-8"))
