"""`graft finetune`, `evaluate`, `predict` end to end on real digit scans with torchvision's real MobileNetV2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from torchgraft.cli import main

FAST = ["--image-size", "32", "--batch-size", "16", "--workers", "0", "--no-hflip", "--no-linear-probe",
        "--head-epochs", "1"]


def finetune_args(mobilenet_v2_path, digits, out, *extra) -> list[str]:
    return ["finetune", "--model", "torchvision:mobilenet_v2", "--weights", str(mobilenet_v2_path),
            "--data", str(digits), "--out", str(out), *FAST, *extra]


def graft(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="160")
    return subprocess.Popen([sys.executable, "-m", "torchgraft.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_finetune_writes_the_run_folder(capsys, tmp_path, mobilenet_v2_path, digits):
    out = tmp_path / "run"
    assert main(finetune_args(mobilenet_v2_path, digits, out, "--epochs", "2")) == 0
    text = capsys.readouterr().out
    assert "312 loaded" in text and "run summary" in text
    for name in ("model.safetensors", "last.ckpt", "metrics.jsonl", "config.yaml", "classes.txt", "curves.png",
                 "confusion.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # numbered from 1, as on the console
    assert [r["phase"] for r in rows] == ["head", "all"]
    assert all({"epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds"} <= set(r) for r in rows)
    assert (out / "classes.txt").read_text().split() == [str(i) for i in range(10)]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["image_size"] == 32
    state = load_file(out / "model.safetensors")
    assert state["classifier.1.weight"].shape == (10, 1280)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*.tmp"))


def test_head_phase_freezes_the_backbone(tmp_path, mobilenet_v2_path, digits):
    """One epoch of the head phase: convolutions stay bit-identical; norm layers train (fastai's default) unless
    --no-train-bn holds them in eval, statistics included."""
    source = torch.load(mobilenet_v2_path, weights_only=True)
    held = tmp_path / "held"
    assert main(finetune_args(mobilenet_v2_path, digits, held, "--epochs", "1", "--no-train-bn")) == 0
    state = load_file(held / "model.safetensors")
    for key in ("features.0.0.weight", "features.5.conv.1.1.running_mean", "features.18.1.running_var"):
        assert torch.equal(state[key], source[key]), key
    assert not torch.equal(state["classifier.1.weight"][:, :5], torch.zeros(10, 5))
    trained = tmp_path / "train_bn"
    assert main(finetune_args(mobilenet_v2_path, digits, trained, "--epochs", "1")) == 0
    state = load_file(trained / "model.safetensors")
    assert torch.equal(state["features.0.0.weight"], source["features.0.0.weight"])
    assert torch.equal(state["features.7.conv.1.0.weight"], source["features.7.conv.1.0.weight"])
    assert not torch.equal(state["features.5.conv.1.1.running_mean"], source["features.5.conv.1.1.running_mean"])
    assert not torch.equal(state["features.5.conv.1.1.weight"], source["features.5.conv.1.1.weight"])


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, mobilenet_v2_path, digits):
    straight = tmp_path / "straight"  # run as the killed one is: its own process, the same threads
    whole = graft(*finetune_args(mobilenet_v2_path, digits, straight, "--epochs", "3", "--head-epochs", "1"))
    assert whole.communicate(timeout=300) and whole.returncode == 0
    killed = tmp_path / "killed"
    proc = graft(*finetune_args(mobilenet_v2_path, digits, killed, "--epochs", "3", "--head-epochs", "1"))
    deadline = time.time() + 240
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert done in (2, 3)
    resumed = graft("finetune", "--resume", str(killed))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    best_a = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(rows[-1]["val_acc"] - best_a["val_acc"]) < 1e-9
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_evaluate_and_predict(capsys, tmp_path, mobilenet_v2_path, digits):
    out = tmp_path / "run"
    assert main(finetune_args(mobilenet_v2_path, digits, out, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", "torchvision:mobilenet_v2", "--weights", str(out / "model.safetensors"),
                 "--data", str(digits), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"accuracy", "num_samples", "per_class", "confusion", "scored"}
    assert result["num_samples"] == 60 and result["scored"] == str(digits / "val")  # held out: scored as given
    assert sum(map(sum, result["confusion"])) == 60
    assert set(result["per_class"]["3"]) == {"precision", "recall", "support"}
    best = max(json.loads(line)["val_acc"] for line in (out / "metrics.jsonl").read_text().splitlines())
    assert abs(result["accuracy"] - best) < 1e-9
    image = next((digits / "val" / "7").iterdir())
    assert main(["predict", "--model", "torchvision:mobilenet_v2", "--weights", str(out / "model.safetensors"),
                 str(image), "--topk", "3", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert predictions[0]["image"] == str(image)
    assert len(predictions[0]["top"]) == 3
    probs = [p["probability"] for p in predictions[0]["top"]]
    assert probs == sorted(probs, reverse=True) and all(p["class"] in [str(i) for i in range(10)]
                                                        for p in predictions[0]["top"])


def test_bad_input(capsys, tmp_path, mobilenet_v2_path, digits):
    assert main(finetune_args(mobilenet_v2_path, tmp_path / "nothing", tmp_path / "o")) == 1
    assert "not a folder" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(tmp_path / "nope")]) == 1
    assert "no config.yaml" in capsys.readouterr().err
    assert main(finetune_args(mobilenet_v2_path, digits, tmp_path / "o", "--epochs", "0")) == 2  # usage
    assert "`--epochs 0` must be at least 1" in capsys.readouterr().err
    assert main(finetune_args(mobilenet_v2_path, digits, tmp_path / "o", "--unfreeze-at", "layer4")) == 2
    assert "EPOCH:PATTERN" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_freezing_flags(capsys, tmp_path, mobilenet_v2_path, digits):
    """--unfreeze trains more from the first epoch; --freeze keeps a part frozen; a typo names the closest."""
    out = tmp_path / "flags"
    assert main(finetune_args(mobilenet_v2_path, digits, out, "--epochs", "1", "--unfreeze", "features.1[78].*",
                              "--freeze", "features.17.conv.0.*", "--no-train-bn")) == 0
    source = torch.load(mobilenet_v2_path, weights_only=True)
    state = load_file(out / "model.safetensors")
    assert not torch.equal(state["features.18.0.weight"], source["features.18.0.weight"])  # --unfreeze
    assert not torch.equal(state["features.17.conv.2.weight"], source["features.17.conv.2.weight"])
    assert torch.equal(state["features.17.conv.0.0.weight"], source["features.17.conv.0.0.weight"])  # --freeze
    assert torch.equal(state["features.10.conv.0.0.weight"], source["features.10.conv.0.0.weight"])
    assert main(finetune_args(mobilenet_v2_path, digits, tmp_path / "bad", "--freeze", "featurs.0.*")) == 1
    assert "closest" in capsys.readouterr().err
