"""A wall-clock budget for pretraining (``--minutes``): from a measured step time, the number
of steps that fits, and the schedule options that make the LR and momentum schedules end there.

The step time is measured by ``loop._probe`` on a throwaway copy of the method; this module
only does the arithmetic, so it can be tested without training anything.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..errors import FilterkitError
from .options import TrainOptions

PROBE_STEPS = 4  # timed steps of the probe, after one untimed warm-up step (allocations, workers)
PROBE_SHARE = 0.1  # a single process's probe stops early once it has used this share of the budget
# Share of the time left after the probe that the plan fills: epoch starts, checkpoints and the
# final export also take time, and a plan that overran would be cut before its schedules end.
PLAN_MARGIN = 0.95
# A fresh run re-plans from its own pace after these shares of its planned steps: a probe of a few
# steps misjudges the pace on a busy machine (measured: runs that used 60 % of their budget, and
# runs cut at 77 % of their schedule), which makes "equal wall-clock" comparisons unequal.
REPLAN_AT = (0.1, 0.25, 0.5)
REPLAN_MIN_STEPS = 3  # timed steps a pace needs (the session's first step, with its start-up, is not timed)
REPLAN_TOLERANCE = 0.05  # a horizon this close to the current one is kept: no schedule change for noise


def step_seconds(times: list[float]) -> float:
    """The step time from the probe's per-step times: the median of those after the first
    (which pays for allocations and worker start-up), the first alone if it is all there is."""
    timed = sorted(times[1:] or times)
    mid = len(timed) // 2
    return timed[mid] if len(timed) % 2 else 0.5 * (timed[mid - 1] + timed[mid])


def epoch_start_seconds(times: list[float]) -> float:
    """What starting an epoch adds to its first step (new loader, workers, a first batch not
    decoded ahead): the probe's first step beyond the step time. It also holds the first
    step's one-off allocations, so it errs towards fewer planned steps."""
    return max(0.0, times[0] - step_seconds(times)) if len(times) > 1 else 0.0


def planned_steps(minutes: float, step_s: float, probe_s: float, epoch_start_s: float = 0.0,
                  steps_per_epoch: int = 1) -> int:
    """The most steps T with T·step_s + ⌈T / steps_per_epoch⌉·epoch_start_s within
    PLAN_MARGIN of the time ``minutes`` leaves after the probe's ``probe_s``; refuses a budget
    that leaves no time for one step."""
    left = (minutes * 60.0 - probe_s) * PLAN_MARGIN
    steps = int(left / (step_s + epoch_start_s / steps_per_epoch)) + 1 if left > 0 else 0
    while steps > 0 and steps * step_s + math.ceil(steps / steps_per_epoch) * epoch_start_s > left:
        steps -= 1
    if steps < 1:
        need = (probe_s + 2 * (step_s + epoch_start_s) / PLAN_MARGIN) / 60.0
        raise FilterkitError(f"--minutes {minutes:g} is too small: one training step takes {step_s:.2f} s and "
                             f"measuring it took {probe_s:.1f} s; give at least --minutes {math.ceil(need * 100) / 100:g}")
    return steps


def plan_options(resolved: TrainOptions, given: TrainOptions, steps_per_epoch: int, planned: int,
                 total: int) -> tuple[TrainOptions, int, int]:
    """(options, total steps, warmup steps) of a run whose budget fits ``planned`` steps;
    ``total`` is the horizon without the budget (``--epochs`` / ``--max-steps``).

    The horizon becomes min(planned, --max-steps, --epochs x steps per epoch), the last two only
    where the caller gave them: the recipe's epochs do not cap a budget. Unless --warmup-epochs
    was given, the warmup keeps the recipe's share of the schedule (warmup epochs / epochs), so a
    short budget is the recipe's schedule compressed, not mostly warmup. The returned options
    reproduce this horizon on ``--resume`` (``loop._schedule``) without planning again; their
    ``planned_steps`` is the horizon, the steps the run will make, not the ``planned`` it was cut from.
    """
    horizon = min(planned, given.max_steps or planned)
    if given.epochs is not None:
        horizon = min(horizon, total)
    epochs = given.epochs if given.epochs is not None else math.ceil(horizon / steps_per_epoch)
    warmup_epochs = resolved.warmup_epochs
    if given.warmup_epochs is None:
        share = resolved.warmup_epochs / resolved.epochs if resolved.epochs else 0.0
        warmup_epochs = share * horizon / steps_per_epoch
    options = replace(resolved, epochs=epochs, warmup_epochs=warmup_epochs, planned_steps=horizon)
    return options, horizon, int(round(warmup_epochs * steps_per_epoch))


def replanned_steps(step: int, budget_s: float, spent_s: float, pace_s: float, cap: int,
                    epoch_start_s: float = 0.0, steps_per_epoch: int = 1) -> int:
    """The horizon T that ends with the budget at ``pace_s`` seconds a step, as measured on the
    run itself, plus ``epoch_start_s`` for each epoch still to start: the most T with
    (T - step)·pace_s + (⌈T / steps_per_epoch⌉ - ⌈step / steps_per_epoch⌉)·epoch_start_s within
    PLAN_MARGIN of the time left, as the first plan; at least one more step (the time limit stops
    a run whose budget is spent), at most ``cap`` (the caller's --max-steps / --epochs)."""
    left = max(0.0, (budget_s - spent_s) * PLAN_MARGIN)

    def cost(t: int) -> float:
        return (t - step) * pace_s + (epoch_starts(step, t, steps_per_epoch)) * epoch_start_s

    t = min(cap, step + int(left / (pace_s + epoch_start_s / steps_per_epoch)) + 1)
    while t > step + 1 and cost(t) > left:
        t -= 1
    return max(step + 1, min(cap, t))


def epoch_starts(after: int, upto: int, steps_per_epoch: int) -> int:
    """How many of the steps after ``after``, up to ``upto``, start an epoch (step k, counted from
    1, starts one when k - 1 is a multiple of the epoch's steps)."""
    return math.ceil(upto / steps_per_epoch) - math.ceil(after / steps_per_epoch)
