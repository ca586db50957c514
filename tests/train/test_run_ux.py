"""A fine-tune run as a user meets it (issue 14): --lr-mult in its documented forms, one epoch numbering (from 1),
--resume from another folder and for more epochs, Ctrl-C saying what was kept, labelled plots, and one readable
line for another model's weights or a truncated image."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchgraft.cli import main

FAST = ["--image-size", "32", "--batch-size", "16", "--workers", "0", "--no-hflip", "--no-linear-probe",
        "--head-epochs", "1"]


def finetune(weights, data, out, *extra) -> list[str]:
    return ["finetune", "--model", "torchvision:mobilenet_v2", "--weights", str(weights), "--data", str(data),
            "--out", str(out), *FAST, *extra]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, mobilenet_v2_path, digits) -> Path:
    """A finished two-epoch run, started with --lr-mult in its PATTERN=FACTOR form and --unfreeze-at 2:..."""
    out = tmp_path_factory.mktemp("runs") / "two"
    assert main(finetune(mobilenet_v2_path, digits, out, "--epochs", "2", "--unfreeze-at", "2:features.18.*",
                         "--lr-mult", "features.*=0.5")) == 0
    return out


def test_lr_mult_and_one_epoch_numbering(capsys, two_epochs, mobilenet_v2_path):
    rows = rows_of(two_epochs)
    assert [r["epoch"] for r in rows] == [1, 2]
    # `--unfreeze-at 2:` acts when console epoch 2 starts
    assert [r["phase"] for r in rows] == ["head", "+features.18.*"]
    state = torch.load(two_epochs / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2 and 1 <= state["best_epoch"] <= 2
    # the backbone group that unfroze in epoch 2 trains at lr * backbone_lr_mult * the --lr-mult factor
    lrs = sorted({g["initial_lr"] for g in state["optimizer"]["param_groups"]})
    assert any(abs(lr - 1e-3 * 0.5 * 0.5) < 1e-12 for lr in lrs), lrs


def test_lr_mult_json_form_runs(tmp_path, mobilenet_v2_path, digits):
    assert main(finetune(mobilenet_v2_path, digits, tmp_path / "run", "--epochs", "1", "--lr-mult",
                         '{"classifier.*": 2.0}')) == 0
    lrs = {g["initial_lr"] for g in torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["optimizer"]
           ["param_groups"]}
    assert any(abs(lr - 2e-3) < 1e-12 for lr in lrs), lrs


def test_resume_from_another_folder_continues_to_more_epochs(capsys, tmp_path, mobilenet_v2_path, digits,
                                                             monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "photos").symlink_to(digits, target_is_directory=True)
    monkeypatch.chdir(work)
    assert main(finetune(mobilenet_v2_path, "photos", "runs/pets", "--epochs", "2")) == 0  # relative paths
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["finetune", "--resume", str(work / "runs" / "pets"), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "from epoch 3 of 3" in out
    assert [r["epoch"] for r in rows_of(work / "runs" / "pets")] == [1, 2, 3]
    assert main(["finetune", "--resume", str(work / "runs" / "pets")]) == 0  # finished: says so, trains nothing
    assert "nothing to train" in capsys.readouterr().out
    assert len(rows_of(work / "runs" / "pets")) == 3


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, mobilenet_v2_path, digits):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="160", OMP_NUM_THREADS="1")
    # far more epochs than it will run: the interrupt must land in training, however late the poll sees epoch 2.
    # SIGINT back to its default in the child: a suite started in the background (`make test &`, nohup) runs
    # with SIGINT ignored, which children inherit, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, "-m", "torchgraft.cli", *finetune(mobilenet_v2_path, digits, out,
                                                                              "--epochs", "200")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # until a checkpoint of epoch 2 is in place
        if (out / "last.ckpt").exists() and len(rows_of(out)) >= 2:
            try:  # renamed into place whole, so what exists reads
                if torch.load(out / "last.ckpt", weights_only=True)["epoch"] >= 2:
                    break
            except (OSError, RuntimeError, EOFError):
                pass
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    kept = torch.load(out / "last.ckpt", weights_only=True)["epoch"]
    assert kept >= 2
    assert re.match(rf"error: interrupted in epoch {kept + 1}; kept epochs 1-{kept} in {re.escape(str(out))}",
                    lines[0]), lines[0]
    assert f"graft finetune --resume {out}" in lines[0] and "nothing was written" not in lines[0]


def test_plots_are_labelled_and_mark_the_kept_epoch(two_epochs):
    from torchgraft.train.metrics import confusion_figure, curves_figure

    rows = rows_of(two_epochs)
    fig = curves_figure(rows[:1], best_epoch=1)  # one epoch: an axis around epoch 1, not -0.04..0.04
    for ax in fig.axes:
        assert ax.get_xlim() == (0.5, 1.5)
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() in ("loss", "accuracy")
        assert "kept (epoch 1)" in [t.get_text() for t in ax.get_legend().get_texts()]
        assert "phase: head" in [t.get_text() for t in ax.texts]
    fig = curves_figure(rows, best_epoch=2)
    assert {t.get_text() for t in fig.axes[0].texts} == {"phase: head", "phase: +features.18.*"}
    confusion = torch.tensor([[3, 1], [0, 2]])
    fig = confusion_figure(confusion, ["cat", "dog"])
    matrix, per_class = fig.axes
    assert (matrix.get_xlabel(), matrix.get_ylabel()) == ("predicted class", "true class")
    assert per_class.get_title() == "per class"
    assert [round(p.get_width(), 3) for p in per_class.patches] == [0.75, 1.0]
    assert (two_epochs / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_with_another_models_weights_is_one_readable_line(capsys, two_epochs, digits):
    image = next((digits / "val" / "3").iterdir())
    assert main(["predict", "--model", "torchvision:resnet18", "--weights", str(two_epochs / "model.safetensors"),
                 str(image)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) <= 300, err
    assert "these weights are for another model (0 of 122 tensors" in err
    assert "the run beside them used --model torchvision:mobilenet_v2" in err


def test_evaluate_with_a_truncated_jpeg_is_one_readable_line(capsys, tmp_path, two_epochs, digits):
    data = tmp_path / "photos"
    for name in ("3", "7"):
        (data / name).mkdir(parents=True)
        for i, png in enumerate(sorted((digits / "val" / name).iterdir())[:2]):
            Image.open(png).convert("RGB").save(data / name / f"{i}.jpg", quality=95)
    jpeg = data / "3" / "0.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    assert main(["evaluate", "--model", "torchvision:mobilenet_v2", "--weights", str(two_epochs / "model.safetensors"),
                 "--data", str(data)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) <= 300, err
    assert err.startswith(f"error: {jpeg}: cannot read the image") and "DataLoader" not in err
