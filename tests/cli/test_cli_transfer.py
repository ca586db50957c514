"""`graft plan` and `graft transfer` end to end: files written, reports, --strict, --plan, --verify."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

from torchgraft.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_transfer_writes_complete_state_dict_and_report(capsys, tmp_path, mobilenet_v2_path):
    out, report = tmp_path / "timm.safetensors", tmp_path / "report.json"
    code, stdout, _ = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "timm:mobilenetv2_100",
                          "--out", str(out), "--report", str(report), "--strict")
    assert code == 0
    assert "314 loaded" in stdout
    data = json.loads(report.read_text())
    assert data["summary"] == {"loaded": 314, "adapted": 0, "new": 0, "unused_source": 0}
    assert data["entries"][0] == {"target": "conv_stem.weight", "source": "features.0.0.weight", "status": "loaded",
                                  "method": "structure", "adapter": None, "note": data["entries"][0]["note"]}
    model = timm.create_model("mobilenetv2_100").eval()
    state = load_file(out)
    assert sorted(state) == sorted(model.state_dict())
    model.load_state_dict(state)
    reference = torchvision.models.mobilenet_v2().eval()
    reference.load_state_dict(torch.load(mobilenet_v2_path, weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".*.tmp"))


def test_strict_fails_and_writes_nothing_unless_head_allowed(capsys, tmp_path, mobilenet_v2_path):
    out = tmp_path / "o.safetensors"
    args = ["transfer", str(mobilenet_v2_path), "--model", "torchvision:mobilenet_v2", "--model-kwargs",
            '{"num_classes": 10}', "--out", str(out), "--strict"]
    code, _, err = run(capsys, *args)
    assert code == 1
    assert err.startswith("error: --strict: 2 target tensors would stay new (classifier.1.weight")
    assert "Nothing was written" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, stdout, _ = run(capsys, *args, "--allow-new", "classifier.1.*")
    assert code == 0 and out.exists()
    assert "2 new" in stdout


def test_dry_run_and_output_equal_to_input(capsys, tmp_path, mobilenet_v2_path):
    code, stdout, _ = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "torchvision:mobilenet_v2",
                          "--dry-run")
    assert code == 0 and "314 loaded" in stdout
    assert list(tmp_path.iterdir()) == []
    src = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    before = src.read_bytes()
    code, _, err = run(capsys, "transfer", str(src), "--model", "torchvision:resnet18", "--out", str(src))
    assert code == 1 and "also an input" in err
    assert src.read_bytes() == before


def test_plan_edit_then_transfer_with_plan(capsys, tmp_path, mobilenet_v2_path):
    plan_path = tmp_path / "plan.json"
    code, stdout, _ = run(capsys, "plan", str(mobilenet_v2_path), "--model", "timm:mobilenetv2_100",
                          "--out", str(plan_path))
    assert code == 0 and "plan written" in stdout
    data = json.loads(plan_path.read_text())
    edited = next(e for e in data["entries"] if e["target"] == "conv_head.weight")
    edited.update(status="new", source=None, method="none", note="left new by the reviewer")
    plan_path.write_text(json.dumps(data))
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    code, _, _ = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "timm:mobilenetv2_100",
                     "--plan", str(plan_path), "--out", str(out), "--report", str(report))
    assert code == 0
    state = load_file(out)
    source = torch.load(mobilenet_v2_path, weights_only=True)
    assert not torch.equal(state["conv_head.weight"], source["features.18.0.weight"])
    assert torch.equal(state["blocks.0.0.conv_dw.weight"], source["features.1.conv.0.0.weight"])
    assert json.loads(report.read_text())["summary"]["new"] == 1


def test_plan_for_another_model_is_refused(capsys, tmp_path, mobilenet_v2_path):
    plan_path = tmp_path / "plan.json"
    run(capsys, "plan", str(mobilenet_v2_path), "--model", "timm:mobilenetv2_100", "--out", str(plan_path))
    code, _, err = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "torchvision:mobilenet_v2",
                       "--plan", str(plan_path), "--out", str(tmp_path / "o.safetensors"))
    assert code == 1 and "expected a plan made for this --model" in err


def test_verify_from_cli(capsys, tmp_path, mobilenet_v2_path):
    report = tmp_path / "r.json"
    code, stdout, _ = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "timm:mobilenetv2_100",
                          "--dry-run", "--verify", "--source-model", "torchvision:mobilenet_v2", "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["verify"]["ok"] is True and data["verify"]["compared"] >= 52
    code, _, err = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "timm:mobilenetv2_100",
                       "--dry-run", "--verify", "--source-model", "torchvision:resnet18")
    assert code == 1 and "does not load strictly" in err


def test_low_overlap_warning(capsys, minilm_dir):
    code, stdout, _ = run(capsys, "transfer", str(minilm_dir), "--model", "torchvision:resnet18", "--dry-run")
    assert code == 0
    assert "0 loaded" in stdout and "warning:" in stdout and "right checkpoint" in stdout


def test_rules_file_and_bad_rules(capsys, tmp_path):
    state = torchvision.models.resnet18().state_dict()
    src = tmp_path / "renamed.pth"
    torch.save({k.replace("layer", "stage"): v for k, v in state.items()}, src)
    rules = tmp_path / "rules.yaml"
    rules.write_text('rename:\n  "stage{}.{}.{}": "layer{}.{}.{}"\n  "stage{}.{}.{}.{}": "layer{}.{}.{}.{}"\n')
    code, stdout, _ = run(capsys, "transfer", str(src), "--model", "torchvision:resnet18", "--rules", str(rules),
                          "--dry-run", "--json")
    assert code == 0
    data = json.loads(stdout)
    entry = next(e for e in data["entries"] if e["target"] == "layer3.1.conv2.weight")
    assert entry["method"] == "rule" and entry["source"] == "stage3.1.conv2.weight"
    rules.write_text("renam: {}\n")
    code, _, err = run(capsys, "transfer", str(src), "--model", "torchvision:resnet18", "--rules", str(rules),
                       "--dry-run")
    assert code == 1 and "unknown sections ['renam']" in err
