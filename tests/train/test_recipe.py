"""The default recipe (issue 13): a converged probe, then LP-FT within the budget; model selection; data checks;
evaluate on the run's own validation split; timm heads; two processes like one; the in-memory uint8 cache."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from torchgraft.cli import main
from torchgraft.errors import GraftError
from torchgraft.train.checkpoint import load_checkpoint, save_checkpoint
from torchgraft.train.config import FinetuneConfig
from torchgraft.train.data import augment, crops_for, decode_images, find_splits, preprocessing_for
from torchgraft.train.digits import write_digits
from torchgraft.train.loop import _even_shares
from torchgraft.train.probe import L2_GRID, fit_probe, held_out_split
from torchgraft.train.recipe import (DEFAULT_BATCH, MIN_BATCH, MIN_EPOCH_STEPS, batch_size, forward_cost,
                                     plan_recipe, step_cost)

SMALL = ["--image-size", "32", "--batch-size", "16", "--workers", "0"]


def finetune(weights, data, out, *extra) -> list[str]:
    return ["finetune", "--model", "torchvision:mobilenet_v2", "--weights", str(weights), "--data", str(data),
            "--out", str(out), *SMALL, *extra]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def probe_in_two_processes_and_one(tmp_path: Path, weights, data: Path, *extra) -> tuple[list[dict], list[dict]]:
    """`--linear-probe` runs on `data`, with 2-process torchrun (tmp_path/ddp) and alone (tmp_path/one), each
    process with one thread (the alone run with the threads each of the two had: the features' float sums then
    differ only by the split); each run's metrics rows."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).parent / "torchrun"
    for launch, run in (([str(torchrun), "--standalone", "--nproc_per_node=2"], "ddp"), ([sys.executable], "one")):
        args = finetune(weights, data, tmp_path / run, "--linear-probe", *extra)
        proc = subprocess.run([*launch, "-m", "torchgraft.cli", *args], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return rows_of(tmp_path / "ddp"), rows_of(tmp_path / "one")


# ---- the rule, alone ---------------------------------------------------------------------------------------


def config(**kw) -> FinetuneConfig:
    return FinetuneConfig(model="m:f", weights="w", data="d", out="o", **kw)


def test_the_budget_pays_for_the_probe_and_validation_and_the_fine_tune_gets_the_rest():
    # 1,437 training and 360 validation digits, batch 32: 45 steps an epoch
    r = plan_recipe(config(epochs=3), 1437, 360, 10, 8)
    assert r.probe and r.steps_per_epoch == 45 and r.validate_every == 1
    # 134.8 steps (45 an epoch, the last of 29 images: 0.925 of one) + one validation (3.75) - the probe (18.7)
    # - its flip test (6.0: the held-out fifth, twice) - 3 validations (11.25)
    assert r.total_steps == 102 and r.epochs == 3 and r.steps_in(3) == 12
    assert plan_recipe(config(epochs=3, hflip=False), 1437, 360, 10, 8).total_steps == 108  # flips given: no test
    one = plan_recipe(config(epochs=1), 1437, 360, 10, 8)
    assert one.total_steps == 0 and "20 training steps after the probe" in one.why  # under half an epoch left
    one = plan_recipe(config(epochs=1), 5000, 360, 10, 8)  # 156.2 steps an epoch (the last of 8): the probe leaves 79
    assert one.total_steps == 79 and one.head_epochs == 0  # --epochs 1 still fine-tunes; no head-only epoch
    # 10 images per class in batches of 32: 4 steps an epoch, the last of 4 images (0.3 of a step), so an epoch
    # costs 3.3. The budget (36.75) less the probe and its flip test (5.2) leaves 31.5 steps; validating 360
    # images costs 3.75, so a fifth of them pays for one validation, at the end: 27.8 steps, 8 epochs (26.4)
    few = plan_recipe(config(epochs=10, batch_size=32), 100, 360, 10, 8)
    assert few.validate_every == 8 and few.total_steps == 32 and few.epochs == 8
    assert few.validates(8) and not any(few.validates(e) for e in range(1, 8))
    more = plan_recipe(config(epochs=30, batch_size=32), 100, 360, 10, 8)  # 5 validations fit in a fifth of 97.6
    assert more.validate_every == 5 and [e for e in range(1, 25) if more.validates(e)] == [5, 10, 15, 20, 24]
    tiny = plan_recipe(config(epochs=1, batch_size=32), 100, 360, 10, 8)
    assert tiny.total_steps == 0 and "the probe alone" in tiny.why  # under half an epoch left
    # under 10 training images per class (on average): the probe alone, whatever the budget
    for epochs in (10, 100):
        five = plan_recipe(config(epochs=epochs), 50, 360, 10, 8)
        assert five.total_steps == 0 and "50 training images of 10 classes, under 10 per class" in five.why
    assert plan_recipe(config(epochs=10), 100, 360, 10, 8).total_steps > 0  # 10 per class: a fine-tune
    short = plan_recipe(config(epochs=3, batch_size=32), 100, 360, 10, 8)  # 12 steps, 1 validation: 6 left
    assert short.total_steps == 0 and "under 20: the probe alone" in short.why


def test_few_images_per_class_give_the_probe_augmented_views_paid_from_the_budget():
    # 13 classes of 10 photographs, 96 px files, batches of 32: 5 steps an epoch; the probe also sees 4 views
    photos = plan_recipe(config(epochs=10, batch_size=32), 130, 260, 13, 96)
    assert photos.views == 4 and "4 augmented view(s) of each training image" in photos.why
    # 8 px files: crops keep 98%, a view is the image
    plain = plan_recipe(config(epochs=10, batch_size=32), 130, 260, 13, 8)
    assert plain.views == 0 and "view" not in plain.why
    # the views' forward passes (4 x 130 / 32 / 3 = 5.4 steps) come out of the fine-tune's: 41 -> 35 steps
    # after 2 validations (epochs of 5 steps, the last of 2 images; validating 260 images costs 2.7)
    assert (plain.total_steps, photos.total_steps) == (41, 35)
    assert plan_recipe(config(epochs=10), 780, 260, 13, 96).views == 0  # 60 per class: enough already
    assert plan_recipe(config(epochs=10), 260, 260, 13, 96).views == 2  # 20 per class: at least 50 takes two
    assert plan_recipe(config(epochs=10, augment=False), 130, 260, 13, 96).views == 0
    assert plan_recipe(config(epochs=10, linear_probe=False), 130, 260, 13, 96).views == 0  # no probe
    assert plan_recipe(config(epochs=1, linear_probe=True), 130, 260, 13, 96).views == 1  # a third of the budget
    # views take at most a third of the budget: 1000 images of 100 classes want 4, but 1 epoch (32 steps and
    # 2.7 of validation) has room for one view of 10.4 steps
    assert plan_recipe(config(epochs=1), 1000, 260, 100, 96).views == 1


def test_after_a_probe_a_small_training_set_trains_in_smaller_batches_that_the_budget_pays_for():
    sizes = [10, 50, 100, 130, 200, 260, 500, 744, 745, 1437, 50_000]
    batches = [batch_size(config(), n) for n in sizes]
    assert batches == sorted(batches) and batches[0] == MIN_BATCH and batches[-1] == DEFAULT_BATCH
    for n, b in zip(sizes, batches):
        # smaller than 32 only while 31 images a step would give an epoch of MIN_EPOCH_STEPS steps, never under 8
        assert MIN_BATCH <= b <= DEFAULT_BATCH and (b == DEFAULT_BATCH) == (n > (DEFAULT_BATCH - 1) * MIN_EPOCH_STEPS)
        assert b == MIN_BATCH or math.ceil(n / b) >= MIN_EPOCH_STEPS - 1
    assert batch_size(config(batch_size=16), 100) == 16  # given: as given
    assert batch_size(config(linear_probe=False), 100) == DEFAULT_BATCH  # BatchNorm trains: the seeds' batch
    assert batch_size(config(), 100, world=16) == 16  # an image per process at least
    assert [batch_size(config(), 260, world=w) for w in (1, 2, 4)] == [11, 12, 12]  # equal shares per process
    for n, epochs in [(50, 10), (100, 3), (100, 10), (130, 10), (200, 10), (500, 5), (260, 1)]:
        small, as_loop = plan_recipe(config(epochs=epochs), n, 360, 10, 8), plan_recipe(
            config(epochs=epochs, batch_size=32), n, 360, 10, 8)
        assert small.batch == batch_size(config(), n) and as_loop.batch == 32
        assert small.steps_per_epoch == math.ceil(n / small.batch)
        # what the plan spends (probe, steps, validations) is within the seeds' loop's budget, counted alike
        # (every step its images and its fixed cost, an epoch's last step the images left over)
        budget = epochs * (n + 8 * math.ceil(n / 32)) / 40 + forward_cost(360)
        probe = forward_cost(n + 360 + 2 * 0.2 * n)
        validations = math.ceil(small.epochs / small.validate_every) if small.total_steps else 0
        leftover = n - (small.steps_per_epoch - 1) * small.batch
        spent = (probe + small.total_steps * step_cost(small.batch) + validations * forward_cost(360)
                 - (small.total_steps // small.steps_per_epoch) * (step_cost(small.batch) - step_cost(leftover)))
        assert spent <= budget + 1e-9
        # a step of 8 costs more than a quarter of a step of 32: fewer images for the same budget
        if as_loop.total_steps:
            assert small.total_steps * small.batch <= as_loop.total_steps * 32
        assert small.total_steps * small.batch <= epochs * n
        if small.total_steps and small.batch < 32:
            assert f"in batches of {small.batch} images" in small.why
    assert step_cost(8) > 8 / 32 and step_cost(32) == 1


def test_without_a_probe_the_head_phase_is_a_fraction_of_the_run():
    for epochs in (1, 2, 5, 10):
        r = plan_recipe(config(epochs=epochs, linear_probe=False), 1000, 200, 10, 8)
        assert r.head_epochs < epochs and r.head_epochs == min(epochs - 1, epochs // 5)
        assert r.total_steps == epochs * r.steps_per_epoch


def test_the_probe_converges_and_picks_its_l2_on_held_out_images():
    torch.manual_seed(0)
    y = torch.arange(300) % 3
    centres = torch.randn(3, 64) * 0.8
    x = (centres[y] + torch.randn(300, 64)).relu() * 5  # a non-negative scale, as pooled features are
    probe = fit_probe(x, y, 3)
    fit, held = held_out_split(y, 0)
    assert len(held) == 60 and set(held.tolist()).isdisjoint(fit.tolist())
    assert set(probe.held_out_loss) == set(L2_GRID) and probe.held_out == 60
    assert probe.held_out_loss[probe.l2] == min(probe.held_out_loss.values())
    assert probe.accuracy(x, y) > 0.9
    # converged: the penalised loss's gradient at the solution is ~0 (on the scaled features it was fitted on)
    mean, scale = x.mean(0), (x - x.mean(0)).pow(2).mean().sqrt()
    w = (probe.weight * scale).requires_grad_(True)
    b = (probe.bias + probe.weight @ mean).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(((x - mean) / scale) @ w.T + b, y) + 0.5 * probe.l2 * (w * w).sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-3 and float(b.grad.abs().max()) < 1e-3


def test_views_join_the_fit_but_never_the_held_out_images_choice():
    """Views of the fit part are more rows of the fit; the held-out images are scored as they are, so their own
    views must stay out of the fit: views identical to the images leave the mean loss, hence the probe, as it is."""
    torch.manual_seed(0)
    y = torch.arange(120) % 4
    x = (torch.randn(4, 32)[y] + torch.randn(120, 32)).relu() * 3
    alone, twice = fit_probe(x, y, 4), fit_probe(x, y, 4, views=[x.clone(), x.clone()])
    assert twice.l2 == alone.l2 and twice.held_out_loss == pytest.approx(alone.held_out_loss, rel=1e-3)
    assert torch.allclose(twice.weight, alone.weight, atol=1e-3)
    noisy = fit_probe(x, y, 4, views=[x + torch.randn_like(x) * 2])  # different rows: a different fit
    assert not torch.allclose(noisy.weight, alone.weight, atol=1e-3)
    part = fit_probe(x, y, 4, refit=False)  # the fit on the training part alone: what the flip test checks
    assert part.part is not None and torch.equal(part.weight, part.part.weight) and part.l2 == alone.l2
    assert torch.allclose(part.weight, alone.part.weight, atol=1e-6)
    with pytest.raises(GraftError, match="NaN or infinite"):
        fit_probe(x, y, 4, views=[x * float("nan")])


def test_crops_scale_with_the_native_size_and_flips_mirror():
    sizes = [8, 32, 64, 128, 224, 512]
    areas = [crops_for(n, True).min_area for n in sizes]
    assert areas == sorted(areas, reverse=True) and areas[0] > 0.97 and areas[-1] == pytest.approx(0.35)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    still = crops_for(0, False)  # no crop, no flip: the image itself
    u = torch.rand(4, 5)
    assert torch.allclose(augment(pixels, still, u), pixels.float() / 255, atol=1e-5)
    flipped = augment(pixels, crops_for(0, True), torch.zeros(4, 5))  # u[:, 4] = 0 < 0.5: every image mirrored
    assert torch.allclose(flipped, pixels.float().flip(3) / 255, atol=1e-5)


def test_the_uint8_cache_holds_what_evaluation_sees_and_decodes_files_when_it_does_not_fit(tmp_path, digits):
    import torchvision

    splits = find_splits(digits, None, 0)
    held = decode_images(splits.val, 24, budget=1 << 30)
    assert held.pixels is not None and held.pixels.dtype == torch.uint8 and held.pixels.shape == (60, 3, 24, 24)
    assert held.native == 32
    streamed = decode_images(splits.val, 24, budget=0)
    assert streamed.pixels is None
    index = [torch.tensor([0, 5, 59]), torch.tensor([7])]
    for a, b in zip(held.batches(index), streamed.batches(index)):
        assert torch.equal(a, b)
    model = torchvision.models.mobilenet_v2()
    from torchgraft.train.data import build_transforms, normalise

    pre = preprocessing_for(model, "torchvision:mobilenet_v2", 24)
    from PIL import Image

    evaluation = build_transforms(pre, train=False, augment=False, hflip=False)(Image.open(splits.val[5][0]))
    assert torch.allclose(normalise(held.pixels[5:6], pre)[0], evaluation, atol=1e-5)


# ---- runs --------------------------------------------------------------------------------------------------


def test_default_recipe_probes_then_fine_tunes_from_the_probed_head(capsys, tmp_path, mobilenet_v2_path, digits):
    """No recipe flags: epoch 0 is the probe, then everything fine-tunes with what the budget leaves; the summary
    says which epoch was kept and why, and the training speed."""
    out = tmp_path / "default"
    assert main(finetune(mobilenet_v2_path, digits, out, "--epochs", "5")) == 0
    text = " ".join(capsys.readouterr().out.split())
    rows = rows_of(out)
    assert [r["phase"] for r in rows] == ["probe", "all", "all", "all", "all"]
    # 5 epochs of 8 steps and one validation (1.04 steps of 16 images: a forward image costs a third of an
    # image's share of a step of 32, and a step of 16 0.6 of one), less the probe (3.12), its flip test (0.83)
    # and the fine-tune's 4 validations: 32 steps (charging 5 validations would leave 31)
    assert [r["steps"] for r in rows] == [0, 8, 8, 8, 8]
    assert "recipe: the budget of 5 epoch(s) (40 steps of 16 images) leaves 32 steps (4.0 epochs)" in text
    kept = re.search(r"kept epoch (\d)( \(the linear probe\))?: the highest val acc, (0\.\d{4})", text)
    assert kept, text
    best = max(rows, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert int(kept.group(1)) == best["epoch"] and float(kept.group(3)) == pytest.approx(best["val_acc"], abs=1e-4)
    assert load_file(out / "model.safetensors") is not None
    assert re.search(r"training ran at \d+ images/s", text) and all(r["images_per_s"] > 0 for r in rows)
    assert yaml.safe_load((out / "config.yaml").read_text())["linear_probe"] is None
    assert rows[0]["hflip"] is not None and "flips o" in rows[0]["note"]  # decided by the probe
    # after the probe, BatchNorm stays as the probe saw it: statistics and affine parameters unchanged
    source = torch.load(mobilenet_v2_path, weights_only=True)
    state = load_file(out / "model.safetensors")
    if best["epoch"] > 0:
        assert not torch.equal(state["features.0.0.weight"], source["features.0.0.weight"])
    assert torch.equal(state["features.5.conv.1.1.running_mean"], source["features.5.conv.1.1.running_mean"])
    assert torch.equal(state["features.5.conv.1.1.weight"], source["features.5.conv.1.1.weight"])


def test_without_batch_size_a_small_folder_trains_in_the_rules_batch(capsys, tmp_path, mobilenet_v2_path, digits):
    """120 training digits and no --batch-size: batches of 8 (15 steps an epoch) after the probe, each step of 8
    images, the steps within the budget of 5 epochs of 32 (4 steps each) as the rule counts it."""
    out = tmp_path / "run"
    args = ["finetune", "--model", "torchvision:mobilenet_v2", "--weights", str(mobilenet_v2_path), "--data",
            str(digits), "--out", str(out), "--image-size", "32", "--workers", "0", "--epochs", "5"]
    assert main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    plan = plan_recipe(config(epochs=5), 120, 60, 10, 32)
    assert plan.batch == 8 and plan.steps_per_epoch == 15 and plan.total_steps > 0
    assert f"leaves {plan.total_steps} steps in batches of 8 images (an epoch of 15 steps: 120 training" in text
    rows = rows_of(out)
    assert sum(r["steps"] for r in rows) == plan.total_steps and max(r["steps"] for r in rows) == 15
    assert yaml.safe_load((out / "config.yaml").read_text())["batch_size"] is None  # a resume applies the rule again
    # a resume whose rule would give another batch (another number of processes) is refused, nothing written
    state = load_checkpoint(out / "last.ckpt")
    assert state["batch"] == 8
    state["batch"] = 16
    save_checkpoint(state, out / "last.ckpt")
    before = (out / "metrics.jsonl").read_text()
    assert main(["finetune", "--resume", str(out), "--epochs", "6"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "trained in batches of 16 images" in err and "Traceback" not in err
    assert (out / "metrics.jsonl").read_text() == before


def test_ties_in_accuracy_are_broken_by_validation_loss(tmp_path, mobilenet_v2_path):
    """Two easy classes: several epochs reach the same accuracy; the kept one has the lowest loss among them."""
    data = write_digits(tmp_path / "two", size=32, train_per_class=24, val_per_class=8)
    for split in ("train", "val"):
        for cls in (data / split).iterdir():
            if cls.name not in ("0", "1"):
                shutil.rmtree(cls)
    out = tmp_path / "run"
    assert main(finetune(mobilenet_v2_path, data, out, "--epochs", "4", "--batch-size", "8")) == 0
    rows = [r for r in rows_of(out) if r["val_acc"] is not None]
    top = max(r["val_acc"] for r in rows)
    tied = [r for r in rows if r["val_acc"] == top]
    kept = load_file(out / "model.safetensors")
    expected = min(tied, key=lambda r: r["val_loss"])["epoch"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["epoch"] == str(expected), (rows, f.metadata())
    assert kept["classifier.1.weight"].shape == (2, 1280)


def test_data_is_checked_before_anything_is_written(capsys, tmp_path, mobilenet_v2_path, digits):
    """One class: refused. Undecodable files: one line naming the first and the count. Nothing written."""
    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    for f in list((digits / "train" / "3").iterdir())[:4]:
        (one / "cat" / f.name).write_bytes(f.read_bytes())
    assert main(finetune(mobilenet_v2_path, one, tmp_path / "o1")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "found 1 class (cat); expected at least two class folders" in err
    assert not (tmp_path / "o1").exists()

    broken = tmp_path / "broken"
    shutil.copytree(digits, broken)
    bad = sorted((broken / "train" / "4").iterdir())[:2]
    for f in bad:
        f.write_bytes(b"not an image")
    assert main(finetune(mobilenet_v2_path, broken, tmp_path / "o2")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert f"2 of 120 images cannot be read, the first {bad[0]} (" in err and "Nothing was written." in err
    assert not (tmp_path / "o2").exists()


def test_few_images_in_a_class_is_a_warning(caplog, tmp_path, mobilenet_v2_path):
    few = write_digits(tmp_path / "few", size=16, train_per_class=3, val_per_class=2)
    with caplog.at_level("WARNING", logger="torchgraft"):
        assert main(finetune(mobilenet_v2_path, few, tmp_path / "run", "--epochs", "1", "--image-size", "16")) == 0
    err = caplog.text
    assert "10 classes have fewer than 5 training images: 0 (3), 1 (3), 2 (3), 3 (3), 4 (3) and 5 more" in err


def test_evaluate_scores_the_runs_validation_split_not_its_training_images(capsys, tmp_path, mobilenet_v2_path,
                                                                           digits):
    """A single folder of classes is split by the run; `evaluate --data` on that folder would score training
    images too, so it scores the run's validation split (split.json) and says so; no --data does the same."""
    folder = tmp_path / "one_folder"
    for split in ("train", "val"):
        for cls in (digits / split).iterdir():
            (folder / cls.name).mkdir(parents=True, exist_ok=True)
            for f in cls.iterdir():
                (folder / cls.name / f"{split}_{f.name}").write_bytes(f.read_bytes())
    out = tmp_path / "run"
    assert main(finetune(mobilenet_v2_path, folder, out, "--epochs", "1", "--linear-probe")) == 0
    capsys.readouterr()
    weights = str(out / "model.safetensors")
    split = json.loads((out / "split.json").read_text())
    assert len(split["val"]) == 40 and len(split["train"]) == 140  # 20% of each class of 18 images
    assert main(["evaluate", "--model", "torchvision:mobilenet_v2", "--weights", weights, "--data", str(folder)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (f"on 40 images: the run's validation split ({out / 'split.json'}): {folder} holds 140 of the images "
            "the run trained on") in text
    assert main(["evaluate", "--model", "torchvision:mobilenet_v2", "--weights", weights, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 40 and result["scored"] == f"the run's validation split ({out / 'split.json'})"
    assert result["accuracy"] == pytest.approx(rows_of(out)[0]["val_acc"], abs=1e-6)


def test_a_timm_model_few_shot_learns_like_torchvisions(tmp_path, mobilenet_v2_path):
    """3 classes, 10 images each: timm's mobilenetv2_100 (torchvision's file through transfer) stayed at chance
    because timm initialises a 3-class head at +-0.58; every new head now starts alike, and the probe fits it."""
    data = write_digits(tmp_path / "three", size=32, train_per_class=10, val_per_class=8)
    for split in ("train", "val"):
        for cls in (data / split).iterdir():
            if cls.name not in ("0", "1", "2"):
                shutil.rmtree(cls)
    accs = {}
    for spec in ("timm:mobilenetv2_100", "torchvision:mobilenet_v2"):
        out = tmp_path / spec.split(":")[0]
        assert main(["finetune", "--model", spec, "--weights", str(mobilenet_v2_path), "--data", str(data),
                     "--out", str(out), "--epochs", "5", *SMALL]) == 0
        accs[spec] = max(r["val_acc"] for r in rows_of(out) if r["val_acc"] is not None)
    assert accs["timm:mobilenetv2_100"] >= 0.8, accs  # chance is 0.333
    assert abs(accs["timm:mobilenetv2_100"] - accs["torchvision:mobilenet_v2"]) <= 0.15, accs


def test_every_new_head_starts_alike():
    from torchgraft.train.loop import build_classifier_model, init_head

    for spec in ("timm:mobilenetv2_100", "torchvision:mobilenet_v2"):
        model, head = build_classifier_model(spec, {}, 3)
        init_head(model.get_submodule(head))
        weight = model.get_submodule(head).weight
        assert 0.005 < float(weight.std()) < 0.015 and float(model.get_submodule(head).bias.abs().max()) == 0


def test_two_processes_with_torchrun_match_one(tmp_path, mobilenet_v2_path, digits):
    """Two CPU processes (gloo), the default recipe: each step takes the same global batch as one process, so
    the probe, the learning rate per step and the accuracy match; files are written once, by rank 0."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # 12 images per class at 32 px: the default backbone rate sends this fine-tune to chance in both runs (the
    # probe is kept), where accuracy says nothing about parity; a slower backbone keeps it learning
    slow = ("--epochs", "5", "--backbone-lr-mult", "0.02")
    args = finetune(mobilenet_v2_path, digits, tmp_path / "ddp", *slow)
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "torchgraft.cli", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(finetune(mobilenet_v2_path, digits, tmp_path / "one", *slow)) == 0
    ddp, one = rows_of(tmp_path / "ddp"), rows_of(tmp_path / "one")
    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in one] == [0, 1, 2, 3, 4]
    assert proc.stdout.count("run summary") == 1
    assert ddp[0]["val_acc"] == pytest.approx(one[0]["val_acc"], abs=1e-9)  # the same features, the same probe
    assert ddp[0]["val_loss"] == pytest.approx(one[0]["val_loss"], rel=1e-3)
    assert [r["lr"] for r in ddp[1:]] == pytest.approx([r["lr"] for r in one[1:]])  # per global step
    assert [r["steps"] for r in ddp] == [r["steps"] for r in one]
    # the steps differ only by dropout's random masks (seeded per process) and float sums: accuracy within noise
    assert one[-1]["val_acc"] >= 0.5, one  # a fine-tune that learns (chance is 0.1)
    assert abs(ddp[-1]["val_acc"] - one[-1]["val_acc"]) <= 0.05, (ddp, one)
    state = load_file(tmp_path / "ddp" / "model.safetensors")
    assert not any(k.startswith("module.") for k in state)


def test_an_epochs_last_batch_gives_every_process_images(tmp_path, mobilenet_v2_path, digits):
    """120 training images in steps of 17: the epoch's last step has one image. Alone it would leave a second
    process none, and BatchNorm training on batch statistics cannot normalise one 32 px image (its last maps
    are 1x1); the step takes the epoch's first images again, and the run trains, on one process and on two."""
    order = torch.randperm(120)
    assert _even_shares(order[119:], order, 2).tolist() == [order[119], order[0]]
    assert _even_shares(order[:17], order, 2).tolist() == [*order[:17], order[0]]  # 17 images: 9 and 9
    assert len(_even_shares(order[:16], order, 2)) == 16  # already even: as it is
    assert len(_even_shares(order[:16], order, 1)) == 16 and len(_even_shares(order[119:], order, 1)) == 1
    assert _even_shares(order[119:], order, 1, least=2).tolist() == [order[119], order[0]]
    assert len(_even_shares(order[119:], order, 2, least=2)) == 4  # two images for each process
    args = ("--batch-size", "17", "--no-linear-probe", "--epochs", "1")
    assert main(finetune(mobilenet_v2_path, digits, tmp_path / "one", *args)) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "torchgraft.cli",
                           *finetune(mobilenet_v2_path, digits, tmp_path / "ddp", *args)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in ("one", "ddp"):
        (row,) = rows_of(tmp_path / run)
        assert row["steps"] == 8 and math.isfinite(row["train_loss"]) and row["val_acc"] is not None


def test_the_probes_augmented_views_are_the_same_in_two_processes(tmp_path, mobilenet_v2_path):
    """48 px files, 4 images per class: the probe fits views of each image too; their crops are drawn per image,
    not per process, so two processes fit the probe one process fits."""
    data = write_digits(tmp_path / "views", size=48, train_per_class=4, val_per_class=3)
    (ddp,), (one,) = probe_in_two_processes_and_one(tmp_path, mobilenet_v2_path, data, "--epochs", "3")
    # 40 images of 10 classes want 4 views (50 per class); a third of the budget (9 steps of 16 images, worth
    # 5.4 of 32, and 0.3 of validation) pays for 4 of 0.42 each
    assert "fitted 4 augmented view(s) of each training image (crops keeping 86%-100%" in one["note"], one
    assert ddp["note"] == one["note"]
    assert ddp["val_acc"] == pytest.approx(one["val_acc"], abs=1e-9)
    assert ddp["val_loss"] == pytest.approx(one["val_loss"], rel=1e-3)
    plain = tmp_path / "plain"  # the same run without augmentation has no views: a different probe
    assert main(finetune(mobilenet_v2_path, data, plain, "--linear-probe", "--epochs", "3", "--no-augment")) == 0
    (alone,) = rows_of(plain)
    assert "view" not in alone["note"] and alone["val_loss"] != pytest.approx(one["val_loss"], rel=1e-3)


def test_two_processes_compute_the_features_of_fewer_images_than_processes(tmp_path, mobilenet_v2_path):
    """A validation set of one image: one of two processes has none of its features to compute. It runs one
    image for the features' shape and keeps none, so the run goes on and scores that image as one process does."""
    data = write_digits(tmp_path / "one_val", size=32, train_per_class=3, val_per_class=1)
    kept = sorted((data / "val").rglob("*.png"))
    for extra in kept[1:]:
        extra.unlink()
    (ddp,), (one,) = probe_in_two_processes_and_one(tmp_path, mobilenet_v2_path, data, "--epochs", "1")
    assert ddp["val_acc"] == one["val_acc"] and abs(ddp["val_loss"] - one["val_loss"]) < 1e-3, (ddp, one)
