"""pretrain --minutes: the plan's arithmetic, the schedules ending with the planned step, the
time limit, provenance, and resume."""

import json
import math

import pytest
import torch

from filterkit import Encoder, FilterkitError
from filterkit.cli import main
from filterkit.modeldir import CONFIG_FILE
from filterkit.train import TrainOptions, lr_at, pretrain
from filterkit.train.budget import (
    PLAN_MARGIN,
    epoch_start_seconds,
    plan_options,
    planned_steps,
    replanned_steps,
    step_seconds,
)

TINY = dict(preset="vit-mini-8-32", depth=1, batch_size=8, proj_hidden=32, pred_hidden=32, out_dim=16,
            checkpoint_every=100)


def test_step_time_is_the_median_after_the_first_step():
    assert step_seconds([5.0, 0.3, 0.1, 0.2]) == 0.2
    assert step_seconds([5.0, 0.1, 0.3]) == pytest.approx(0.2)
    assert step_seconds([2.0]) == 2.0
    assert epoch_start_seconds([5.0, 0.3, 0.1, 0.2]) == pytest.approx(4.8)  # the first step beyond the others
    assert epoch_start_seconds([2.0]) == 0.0


def test_planned_steps_fill_the_time_left_after_the_probe():
    assert planned_steps(1.0, 0.5, 2.0) == int(58.0 * PLAN_MARGIN / 0.5)
    # Each epoch's start costs 1 s more, 4 steps an epoch: the most steps whose time fits.
    left = 58.0 * PLAN_MARGIN
    steps = planned_steps(1.0, 0.5, 2.0, epoch_start_s=1.0, steps_per_epoch=4)

    def cost(t):
        return t * 0.5 + math.ceil(t / 4) * 1.0

    assert cost(steps) <= left < cost(steps + 1) and steps == 72
    with pytest.raises(FilterkitError, match=r"--minutes 0.01 is too small: one training step takes 2.00 s"):
        planned_steps(0.01, 2.0, 0.3)


def test_the_plan_compresses_the_recipe_and_keeps_the_callers_caps():
    resolved = TrainOptions(epochs=10, warmup_epochs=2.0, max_steps=None)
    options, total, warmup = plan_options(resolved, TrainOptions(), steps_per_epoch=7, planned=50, total=70)
    assert total == 50 and options.planned_steps == 50 and options.epochs == 8  # ceil(50 / 7)
    assert warmup == 10  # the recipe's 20 % of the schedule, not its 2 epochs (14 steps) of 50
    # --max-steps and --epochs given cap the plan; --warmup-epochs given is kept
    # and planned_steps records the steps the run will make, not the budget's 50
    options, total, _ = plan_options(resolved, TrainOptions(max_steps=30), 7, 50, 70)
    assert total == 30 and options.planned_steps == 30
    options, total, warmup = plan_options(TrainOptions(epochs=3, warmup_epochs=1.0), TrainOptions(epochs=3,
                                          warmup_epochs=1.0), 7, 50, 21)
    assert total == 21 and options.epochs == 3 and warmup == 7 and options.planned_steps == 21


def _plan_exactly(monkeypatch, steps):
    """The real probe runs, but the plan is ``steps`` whatever it measured."""
    import filterkit.train.loop as loop

    seen = {}

    def fixed(minutes, step_s, probe_s, *epoch_start):
        seen.update(step_s=step_s, probe_s=probe_s)
        return steps

    monkeypatch.setattr(loop, "planned_steps", fixed)
    monkeypatch.setattr(loop, "REPLAN_AT", ())  # and kept: no re-plan from the run's own pace
    return seen


def test_schedules_end_at_the_planned_step_and_the_run_is_the_max_steps_run(tmp_path, train_dir, monkeypatch):
    seen = _plan_exactly(monkeypatch, 6)
    budget = pretrain(train_dir, tmp_path / "b", TrainOptions(minutes=5, **TINY), device="cpu", workers=0,
                      progress=False)
    assert seen["step_s"] > 0 and seen["probe_s"] >= seen["step_s"]
    assert budget.steps == budget.total_steps == 6 and budget.stopped_by == "steps"
    training = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())["training"]
    assert training["stopped_by"] == "steps" and training["planned_steps"] == 6 and training["minutes"] == 5
    assert training["total_steps"] == 6 and training["epochs"] == 2  # 24 images / batch 8: 3 steps an epoch
    log = [json.loads(line) for line in (tmp_path / "b" / "training" / "log.jsonl").read_text().splitlines()]
    warmup = int(round(training["warmup_epochs"] * 3))
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["lr"] == pytest.approx(lr_at(5, 6, warmup, training["lr"]))  # the last cosine step
    # The probe left no trace: the same run planned by hand gives the same weights.
    plain = pretrain(train_dir, tmp_path / "p", TrainOptions(max_steps=6, epochs=2,
                                                             warmup_epochs=training["warmup_epochs"], **TINY),
                     device="cpu", workers=0, progress=False)
    for key, value in plain.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(budget.model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_budget_run_resumes_exactly(tmp_path, train_dir, monkeypatch):
    _plan_exactly(monkeypatch, 6)
    opts = TrainOptions(minutes=5, **TINY)
    straight = pretrain(train_dir, tmp_path / "a", opts, device="cpu", workers=0, progress=False)
    first = pretrain(train_dir, tmp_path / "b", opts, device="cpu", workers=0, progress=False, stop_at_step=4)
    assert first.steps == 4 and first.stopped_by is None
    resumed = pretrain(train_dir, tmp_path / "b", TrainOptions(minutes=5), resume=True, device="cpu", workers=0,
                       progress=False)
    assert resumed.steps == resumed.total_steps == 6 and resumed.stopped_by == "steps"
    for key, value in straight.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_the_time_limit_stops_a_run_whose_plan_overran(tmp_path, train_dir, monkeypatch, capsys):
    _plan_exactly(monkeypatch, 100_000)  # as if the probe had measured a far faster step
    # 15 s: room for the probe and a first step even on a loaded machine (3 s was not)
    code = main(["pretrain", str(train_dir), "--out", str(tmp_path / "m"), "--minutes", "0.25", "--preset",
                 "vit-mini-8-32", "--depth", "1", "--batch-size", "8", "--workers", "0", "-q"])
    out = capsys.readouterr().out
    assert code == 0 and "the --minutes budget was spent first" in out
    training = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["training"]
    assert training["stopped_by"] == "minutes" and training["planned_steps"] == 100_000
    assert 0 < training["steps"] < training["total_steps"] == 100_000
    assert training["compute"]["wall_seconds"] >= 0.25 * 60 - 0.1
    Encoder.load(tmp_path / "m", device="cpu")  # a valid model directory
    # A resume of a spent budget trains no further step unless --minutes gives it more time.
    again = pretrain(train_dir, tmp_path / "m", TrainOptions(), resume=True, device="cpu", workers=0, progress=False)
    assert again.steps == training["steps"] and again.stopped_by == "minutes"


def test_a_re_plan_fits_the_time_left_at_the_run_s_own_pace():
    # 100 s left of 300 at 0.5 s a step, from step 40: 190 more steps within the margin
    assert replanned_steps(40, 300.0, 200.0, 0.5, cap=10_000) == 40 + int(100 * PLAN_MARGIN / 0.5)
    assert replanned_steps(40, 300.0, 200.0, 0.5, cap=100) == 100  # --max-steps / --epochs given still cap it
    assert replanned_steps(40, 300.0, 310.0, 0.5, cap=10_000) == 41  # spent: the time limit stops it
    # each epoch still to start costs 2 s more, 10 steps an epoch: the most steps whose time fits
    from filterkit.train.budget import epoch_starts

    assert epoch_starts(40, 41, 10) == 1 and epoch_starts(40, 50, 10) == 1 and epoch_starts(41, 50, 10) == 0
    t = replanned_steps(40, 300.0, 200.0, 0.5, 10_000, epoch_start_s=2.0, steps_per_epoch=10)

    def cost(n):
        return (n - 40) * 0.5 + epoch_starts(40, n, 10) * 2.0

    assert cost(t) <= 100 * PLAN_MARGIN < cost(t + 1)


def test_a_probe_that_misjudged_the_pace_is_corrected_by_the_run_s_own(tmp_path, train_dir, monkeypatch):
    import filterkit.train.loop as loop

    # The probe says a step takes 8x what it does (a busy machine while it measured): the first plan
    # would end with a fraction of the budget used; the run re-plans, and still ends its schedules.
    measured = loop.step_seconds
    monkeypatch.setattr(loop, "step_seconds", lambda times: 8 * measured(times))
    result = pretrain(train_dir, tmp_path / "m", TrainOptions(minutes=0.25, **TINY), device="cpu", workers=0,
                      progress=False)
    log = [json.loads(line) for line in (tmp_path / "m" / "training" / "log.jsonl").read_text().splitlines()]
    plans = [r["replanned"] for r in log if "replanned" in r]
    assert plans and plans[0]["to_steps"] > plans[0]["from_steps"] and plans[0]["seconds_per_step"] > 0
    assert all(a["to_steps"] == b["from_steps"] for a, b in zip(plans, plans[1:]))
    training = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["training"]
    assert training["planned_steps"] == training["total_steps"] == result.total_steps == plans[-1]["to_steps"]
    assert training["epochs"] * 3 >= training["total_steps"]  # 3 steps an epoch: --resume gets the same horizon
    assert result.stopped_by == "steps" or result.steps >= 0.8 * result.total_steps
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, result.steps + 1))
    if result.stopped_by == "steps":  # the cosine schedule ran to its end
        assert steps[-1]["lr"] == pytest.approx(lr_at(result.steps - 1, result.total_steps,
                                                      int(round(training["warmup_epochs"] * 3)), training["lr"]))


def test_a_run_stopped_after_a_re_plan_resumes_with_the_re_planned_schedule(tmp_path, train_dir, monkeypatch):
    import filterkit.train.loop as loop

    # The first plan fixed at 12 steps (a probe that misjudged the pace), so the re-plan comes at
    # step 4 (its 3 timed steps) on any machine: scaling the measured step instead left a fast
    # machine's plan so long that the 10 % mark fell after step 6
    monkeypatch.setattr(loop, "planned_steps", lambda *args, **kwargs: 12)
    # --warmup-epochs given as 0.5 of a 3-step epoch: kept as given through the re-plan, or the
    # resume would refuse options that differ from the checkpoint's
    opts = TrainOptions(minutes=0.25, warmup_epochs=0.5, **TINY)
    first = pretrain(train_dir, tmp_path / "m", opts, device="cpu", workers=0, progress=False, stop_at_step=6)
    log = [json.loads(line) for line in (tmp_path / "m" / "training" / "log.jsonl").read_text().splitlines()]
    plans = [r["replanned"] for r in log if "replanned" in r]
    assert first.steps == 6 and plans and plans[0]["from_steps"] == 12
    assert first.total_steps == plans[-1]["to_steps"] > 12
    resumed = pretrain(train_dir, tmp_path / "m", opts, resume=True, device="cpu", workers=0, progress=False,
                       stop_at_step=7)
    assert resumed.steps == 7 and resumed.total_steps == first.total_steps  # the re-planned horizon, kept
    training = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["training"]
    assert training["warmup_epochs"] == 0.5 and training["planned_steps"] == first.total_steps


def test_a_real_tiny_budget_plans_from_the_measured_step(tmp_path, train_dir, capsys):
    code = main(["pretrain", str(train_dir), "--out", str(tmp_path / "m"), "--minutes", "0.25", "--preset",
                 "vit-mini-8-32", "--depth", "1", "--batch-size", "8", "--workers", "0", "-q"])
    assert code == 0 and "planned for --minutes 0.25" in capsys.readouterr().out
    training = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["training"]
    assert training["stopped_by"] in ("steps", "minutes") and training["planned_steps"] >= 1
    assert training["steps"] <= training["total_steps"] == training["planned_steps"]
    assert training["compute"]["wall_seconds"] < 0.25 * 60 + 5  # the budget held (a step of slack)


def test_budget_errors_are_one_line(tmp_path, train_dir, capsys):
    code = main(["pretrain", str(train_dir), "--out", str(tmp_path / "a"), "--minutes", "0", "-q"])
    assert code == 1 and "error: --minutes must be a positive number of minutes, got 0" in capsys.readouterr().err
    code = main(["pretrain", str(train_dir), "--out", str(tmp_path / "b"), "--minutes", "0.0001", "--preset",
                 "vit-mini-8-32", "--depth", "1", "--batch-size", "8", "--workers", "0", "-q"])
    assert code == 1 and "is too small: one training step takes" in capsys.readouterr().err
