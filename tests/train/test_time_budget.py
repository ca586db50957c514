"""--time-budget MINUTES (issue 13): the recipe planned for the training steps that fit in the minutes left, at the
seconds a step takes on this machine; the rule alone, then whole runs on real digit scans and a real MobileNetV2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchgraft.cli import main
from torchgraft.train.config import FinetuneConfig
from torchgraft.train.loop import BUDGET_FILE
from torchgraft.train.recipe import FORWARD_COST, fine_tune_steps, plan_recipe, steps_cost

SMALL = ["--image-size", "32", "--batch-size", "16", "--workers", "0"]


def config(**kw) -> FinetuneConfig:
    return FinetuneConfig(model="m:f", weights="w", data="d", out="o", **kw)


# ---- the rule, alone ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_epoch", [1, 4, 45, 157])
@pytest.mark.parametrize("val_steps", [0.0, 0.5, 3.75, 40.0])
@pytest.mark.parametrize("every", [1, 2, 5])
@pytest.mark.parametrize("last", [1.0, 0.3])
def test_the_fine_tune_takes_the_most_steps_whose_validations_still_fit(per_epoch, val_steps, every, last):
    for available in [0, 0.5, 1, 3.7, 10, 21.2, 99.9, 500, 2000.5]:
        steps, validations = fine_tune_steps(available, per_epoch, val_steps, every, last)
        epochs = math.ceil(steps / per_epoch)
        assert validations == math.ceil(epochs / every)  # every `every`-th epoch and the last
        # each epoch's last step (a partial batch) costs `last` of one
        assert steps_cost(steps, per_epoch, last) + validations * val_steps <= available + 1e-9  # it fits
        more = steps + 1  # and one step more does not
        assert (steps_cost(more, per_epoch, last) + math.ceil(math.ceil(more / per_epoch) / every) * val_steps
                > available)


def test_validations_are_charged_for_the_fine_tunes_epochs_not_for_every_epochs_epoch():
    # 100 training images in batches of 32 (4 steps an epoch, the last of 4 images: 0.3 of a step, so an epoch
    # costs 3.3), 48 to validate (0.5 steps each time): the budget is 33.5, the probe takes 1.54, so the
    # fine-tune has 9 epochs, not 10, and pays 9 validations, not 10: 33 steps (8 epochs and a step: 27.4);
    # charging 10 validations would leave 32
    r = plan_recipe(config(epochs=10, hflip=False, batch_size=32), 100, 48, 10, 8)
    probe, val = (100 + 48) * FORWARD_COST / 32, 48 * FORWARD_COST / 32
    assert r.validate_every == 1
    assert r.total_steps == 33 and r.epochs == 9
    budget = 10 * 3.3 + val
    assert steps_cost(33, 4, 0.3) + 9 * val + probe <= budget < steps_cost(34, 4, 0.3) + 9 * val + probe
    assert steps_cost(33, 4, 0.3) + 10 * val + probe > budget >= steps_cost(32, 4, 0.3) + 10 * val + probe


def test_a_time_budget_in_steps_plans_like_epochs_and_grows_with_the_minutes():
    # 1,437 training and 360 validation digits, batch 32: 45 steps an epoch; validation costs 3.75
    plans = [plan_recipe(config(time_budget=2), 1437, 360, 10, 8, budget_steps=steps)
             for steps in (10, 40, 60, 135, 138.525, 500, 5000)]
    assert [p.total_steps for p in plans] == sorted(p.total_steps for p in plans)
    assert plans[0].total_steps == 0 and plans[1].total_steps == 0 and "the probe alone" in plans[0].why
    assert "the budget of 2 minute(s) (10 steps" in plans[0].why
    # the same steps as --epochs 3 spends (3 epochs of 44.925, the last step 29 images, and one validation)
    # give the same recipe
    assert plans[4].total_steps == plan_recipe(config(epochs=3), 1437, 360, 10, 8).total_steps
    for p, steps in zip(plans, (10, 40, 60, 135, 138.525, 500, 5000)):
        probe = (1437 + 360 + 2 * 0.2 * 1437) * FORWARD_COST / 32
        # an epoch's last step has 29 images: 37 / 40 of a step
        spent = steps_cost(p.total_steps, 45, 37 / 40) + math.ceil(p.epochs / p.validate_every) * 3.75 + probe
        assert p.total_steps == 0 or spent <= steps
    # without a probe, the epochs are what fits; the classifier-only epochs a fifth of them
    free = plan_recipe(config(time_budget=1, linear_probe=False), 1437, 360, 10, 8, budget_steps=460)
    assert free.epochs == 10 and free.head_epochs == 2 and steps_cost(free.total_steps, 45, 37 / 40) <= 460 - 10 * 3.75
    tiny = plan_recipe(config(time_budget=1, linear_probe=False), 1437, 360, 10, 8, budget_steps=3)
    assert tiny.total_steps >= 1 and tiny.head_epochs == 0  # at least a step: the run must train something


def test_a_time_budget_is_checked_before_anything_runs():
    with pytest.raises(Exception, match="--time-budget 0"):
        config(time_budget=0)
    with pytest.raises(Exception, match="--unfreeze-at"):
        config(time_budget=1, unfreeze_at=["2:*"])
    assert config(time_budget=1, head_epochs=7).head_epochs == 7  # epochs are not known yet: not checked


# ---- whole runs ----------------------------------------------------------------------------------------------


def finetune(weights, data, out, *extra) -> list[str]:
    return ["finetune", "--model", "torchvision:mobilenet_v2", "--weights", str(weights), "--data", str(data),
            "--out", str(out), *SMALL, *extra]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_a_run_with_a_time_budget_trains_the_steps_it_measured_and_a_resume_keeps_its_plan(
        capsys, tmp_path, mobilenet_v2_path, digits):
    short, long = tmp_path / "short", tmp_path / "long"
    assert main(finetune(mobilenet_v2_path, digits, short, "--time-budget", "0.02")) == 0
    assert main(finetune(mobilenet_v2_path, digits, long, "--time-budget", "0.2")) == 0
    text = capsys.readouterr().out
    assert "recipe: the budget of 0.02 minute(s)" in text and "recipe: the budget of 0.2 minute(s)" in text
    budgets = [json.loads((run / BUDGET_FILE).read_text()) for run in (short, long)]
    assert budgets[0]["minutes"] == 0.02 and budgets[1]["minutes"] == 0.2
    # ten times the minutes, several times the steps (both pay the time before the plan and the end's seconds)
    assert budgets[1]["steps"] > 5 * max(budgets[0]["steps"], 1)
    trained = sum(r["steps"] for r in rows_of(long) if r["epoch"] >= 1)
    assert trained > 0 and trained <= budgets[1]["steps"]
    # 120 images in batches of 16: 8 steps an epoch; the plan, replayed from the saved budget, is what ran
    plan = plan_recipe(FinetuneConfig(model="m:f", weights="w", data="d", out="o", batch_size=16, time_budget=0.2),
                       120, 60, 10, 32, budget_steps=budgets[1]["steps"])
    assert trained == plan.total_steps
    # a resume replans from the saved budget, not from a new measurement: the finished run has nothing to train
    assert main(["finetune", "--resume", str(long)]) == 0
    assert "has finished its" in capsys.readouterr().out
    assert rows_of(long)[-1]["epoch"] == plan.epochs


def test_a_time_budget_and_epochs_together_are_refused(capsys, tmp_path, mobilenet_v2_path, digits):
    assert main(finetune(mobilenet_v2_path, digits, tmp_path / "both", "--time-budget", "1", "--epochs", "3")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --time-budget and --epochs are two budgets") and "Traceback" not in err
    assert not (tmp_path / "both").exists()
    run = tmp_path / "run"
    assert main(finetune(mobilenet_v2_path, digits, run, "--time-budget", "0.05")) == 0
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run), "--epochs", "9"]) == 2
    assert "was started with --time-budget 0.05" in capsys.readouterr().err


def test_two_processes_plan_one_run_from_a_time_budget(tmp_path, mobilenet_v2_path, digits):
    """Each process times its own step and has spent its own seconds before the plan; they must still train the
    same number of steps (else a collective waits forever): the fewest any of them has time for."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = tmp_path / "ddp"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "torchgraft.cli",
                           *finetune(mobilenet_v2_path, digits, run, "--time-budget", "0.3")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    budget = json.loads((run / BUDGET_FILE).read_text())["steps"]
    trained = sum(r["steps"] for r in rows_of(run) if r["epoch"] >= 1)
    assert 0 < trained <= budget and proc.stdout.count("run summary") == 1
