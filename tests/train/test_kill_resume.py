"""Killed fine-tunes: `graft finetune` is killed with SIGKILL at random points (three seeds), then `--resume`
always finishes the run, never reads a half-written checkpoint, and metrics.jsonl ends with each epoch once.
Divergence: a NaN loss stops the run with one `error:` line naming the epoch and step, and the last good
checkpoint stays loadable and unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch


FAST = ["--image-size", "32", "--batch-size", "16", "--workers", "0", "--no-hflip", "--no-linear-probe",
        "--head-epochs", "1"]
EPOCHS = 3


def graft(*args: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="160", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torchgraft.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def start_args(weights, digits, out, *extra) -> list[str]:
    return ["finetune", "--model", "torchvision:mobilenet_v2", "--weights", str(weights), "--data", str(digits),
            "--out", str(out), *FAST, "--epochs", str(EPOCHS), *extra]


def run_and_maybe_kill(args: list[str], delay: float) -> bool:
    """Run; SIGKILL after `delay` seconds unless it ended first. True when it was killed."""
    proc = graft(*args)
    try:
        proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        return True
    assert proc.returncode == 0, proc.stderr[-2000:]
    return False


def check_run_folder(out: Path) -> int:
    """What a killed run left must be whole: last.ckpt loads, metrics.jsonl rows parse, in epoch order.
    Returns the epochs finished according to last.ckpt (0 when there is none); epochs count from 1."""
    done = 0
    ckpt = out / "last.ckpt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # never half written: atomic rename
        done = state["epoch"]
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines() if line.strip()]
        assert epochs == list(range(1, len(epochs) + 1)), epochs
        assert len(epochs) >= done  # the row is appended before the checkpoint: at most one row ahead
        assert len(epochs) <= done + 1
    return done


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_points_then_resume(tmp_path, mobilenet_v2_path, digits, seed):
    rng = random.Random(seed)
    out = tmp_path / "run"
    killed = run_and_maybe_kill(start_args(mobilenet_v2_path, digits, out), rng.uniform(1.0, 6.0))
    kills = int(killed)
    for _ in range(4):  # up to four more kills, each during a resume
        if not killed:
            break
        done = check_run_folder(out)
        if not (out / "config.yaml").exists():  # killed before the run folder was written: start again
            killed = run_and_maybe_kill(start_args(mobilenet_v2_path, digits, out), rng.uniform(1.0, 6.0))
        else:
            # a planted half-written temp file, as a kill during a write leaves: it must never be read
            (out / ".last.ckpt.planted.tmp").write_bytes(b"PK\x03\x04 half written")
            killed = run_and_maybe_kill(["finetune", "--resume", out], rng.uniform(1.0, 6.0))
            if killed:
                assert check_run_folder(out) >= done  # a resume never goes backwards
        kills += int(killed)
    if killed:  # the last run goes to the end: a resume, or a fresh start if every kill came before the folder
        args = ["finetune", "--resume", out] if (out / "config.yaml").exists() else start_args(mobilenet_v2_path,
                                                                                               digits, out)
        proc = graft(*args)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert check_run_folder(out) == EPOCHS
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))  # each epoch exactly once
    assert not list(out.glob(".*.tmp")), list(out.glob(".*.tmp"))
    for name in ("model.safetensors", "curves.png", "confusion.png", "config.yaml", "classes.txt"):
        assert (out / name).is_file(), name
    print(f"seed {seed}: {kills} kills")


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, mobilenet_v2_path, digits):
    out = tmp_path / "run"
    proc = graft(*start_args(mobilenet_v2_path, digits, out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    # continue the finished run for more epochs with an absurd learning rate: the loss becomes NaN in epoch 4
    state = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = group["initial_lr"] = 1e30
    torch.save(state, out / "last.ckpt")
    before = hashlib.sha256((out / "last.ckpt").read_bytes()).hexdigest()
    best = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    proc = graft("finetune", "--resume", out, "--epochs", EPOCHS + 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err[-2000:]
    assert f"at epoch {EPOCHS + 1} step " in lines[0] and ("nan" in lines[0] or "inf" in lines[0]), lines[0]
    assert hashlib.sha256((out / "last.ckpt").read_bytes()).hexdigest() == before
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == best
    assert torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == EPOCHS
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1))
    assert not list(out.glob(".*.tmp"))


def test_nan_in_the_weights_fails_in_the_first_step(tmp_path, mobilenet_v2_path, digits):
    state = torch.load(mobilenet_v2_path, map_location="cpu", weights_only=True)
    state["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save(state, weights)
    proc = graft(*start_args(weights, digits, tmp_path / "run"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "at epoch 1 step 1" in errors[0], err[-2000:]
    assert err.rstrip().splitlines()[-1] == errors[0]
    # the transfer report's numeric warning named the damaged tensor before training started
    assert "features.0.0.weight: 1 NaN values" in out + err
    assert not (tmp_path / "run" / "last.ckpt").exists()
