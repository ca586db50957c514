"""`graft plan` and `graft transfer` end to end: files written, reports, --strict, --plan, --verify."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file

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
    edited = next(s for s in data["steps"] if s["target"] == "conv_head.weight")
    edited.update(action="new", source=None, method="none", note="left new by the reviewer")
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


def test_verify_from_cli(capsys, mobilenet_v2_path):
    code, stdout, _ = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "timm:mobilenetv2_100",
                          "--dry-run", "--verify", "--source-model", "torchvision:mobilenet_v2", "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["verify"]["ok"] is True and data["verify"]["compared"] >= 52
    code, _, err = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "timm:mobilenetv2_100",
                       "--dry-run", "--verify", "--source-model", "torchvision:resnet18")
    assert code == 1 and "does not load strictly" in err


def test_low_overlap_warning(capsys, tmp_path, minilm_dir):
    # A long path must not wrap the warning: it stays one greppable line whatever the terminal width.
    deep = tmp_path / ("long_folder_name_" * 6) / "minilm"
    deep.parent.mkdir()
    deep.symlink_to(minilm_dir, target_is_directory=True)
    code, stdout, stderr = run(capsys, "transfer", str(deep), "--model", "torchvision:resnet18", "--dry-run")
    assert code == 0
    assert "0 loaded" in stdout
    assert "warning:" not in stdout  # warnings go to stderr
    warning = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "right checkpoint for this model?" in warning[0]


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


# ---- the low-memory path: meta-device build, --dtype, progress -------------------------------------------------

NETS = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16))
        self.head = nn.Linear(16, classes)


def build(classes=5):
    return Net(classes)


def build_with_item(classes=5):
    net = Net(classes)
    net.depth = int(torch.tensor(len(net.body)).item())  # fails on the meta device, not with parameters there
    return net


def build_reading_a_weight(classes=5):
    net = Net(classes)
    net.scale = float(net.head.weight.detach().abs().max())  # fails with parameters on the meta device
    return net


def build_with_buffer(classes=5):
    net = Net(classes)
    net.register_buffer("table", torch.arange(4.0), persistent=False)
    return net
'''


def _nets(tmp_path):
    spec = tmp_path / "nets.py"
    spec.write_text(NETS)
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("nets_for_test", spec)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    torch.manual_seed(0)
    state = module.build().state_dict()
    ckpt = tmp_path / "net.safetensors"
    save_file(state, ckpt)
    return spec, ckpt, state


def test_transfer_builds_on_meta_and_writes_bfloat16(capsys, caplog, tmp_path):
    spec, ckpt, state = _nets(tmp_path)
    out, report = tmp_path / "bf16.safetensors", tmp_path / "r.json"
    caplog.set_level(logging.DEBUG, logger="torchgraft")
    code, stdout, _ = run(capsys, "transfer", str(ckpt), "--model", f"{spec}:build", "--model-kwargs",
                          '{"classes": 3}', "--out", str(out), "--report", str(report), "--dtype", "bfloat16")
    assert code == 0 and "6 loaded" in stdout and "2 new" in stdout
    assert "built with its parameters on the meta device" in caplog.text
    assert "filled on the meta device" in caplog.text
    written = load_file(out)
    assert {v.dtype for v in written.values()} == {torch.bfloat16}
    assert torch.equal(written["body.0.weight"], state["body.0.weight"].bfloat16())
    assert written["head.weight"].shape == (3, 16) and written["head.weight"].float().abs().sum() > 0
    notes = {e["target"]: e["note"] for e in json.loads(report.read_text())["entries"]}
    assert notes["body.0.weight"] == "cast float32 -> bfloat16"
    assert notes["head.bias"].endswith("cast float32 -> bfloat16")


def test_transfer_builds_on_meta_where_it_can_else_normally(capsys, caplog, tmp_path):
    spec, ckpt, state = _nets(tmp_path)
    caplog.set_level(logging.DEBUG, logger="torchgraft")
    for factory, said in (("build_reading_a_weight", "built normally, its factory fails with parameters on the "
                                                     "meta device"),
                          ("build_with_item", "filled on the meta device"),  # buffers and other tensors are real
                          ("build_with_buffer", "filled on the meta device")):
        caplog.clear()
        out = tmp_path / f"{factory}.safetensors"
        code, stdout, _ = run(capsys, "transfer", str(ckpt), "--model", f"{spec}:{factory}", "--out", str(out))
        assert code == 0 and "8 loaded" in stdout
        assert said in caplog.text
        written = load_file(out)
        assert all(torch.equal(written[k], v) for k, v in state.items())


def test_transfer_dtype_flag_help_and_verify(capsys, tmp_path):
    from torchgraft.cli.transfer import transfer_parser

    help_text = transfer_parser().format_help()
    assert "--dtype {float32,float16,bfloat16}" in help_text and "--dtype bfloat16" in help_text
    spec, ckpt, _ = _nets(tmp_path)
    code, _, err = run(capsys, "transfer", str(ckpt), "--model", f"{spec}:build", "--dry-run", "--verify",
                       "--source-model", f"{spec}:build", "--dtype", "float16")
    assert code == 2  # two flags that cannot go together: a usage error
    assert err.startswith("error: --verify runs both models on one float32 input, so it cannot check a --dtype "
                          "float16 output")
    assert main(["transfer", str(ckpt), "--model", f"{spec}:build", "--dry-run", "--dtype", "int8"]) == 2
    assert capsys.readouterr().err.startswith("error: argument --dtype: invalid choice: 'int8'")


def test_progress_bars_appear_only_after_the_delay():
    import io

    from rich.console import Console

    from torchgraft.cli.transfer import ProgressBars

    shown = io.StringIO()
    with ProgressBars(Console(file=shown, force_terminal=True, width=100), delay=0) as bars:
        update = bars.bar("writing out.safetensors")
        update(512, 1024)
        update(1024, 1024)
    assert bars.shown and "writing out.safetensors" in shown.getvalue() and "1.0/1.0 kB" in shown.getvalue()
    quiet = io.StringIO()
    with ProgressBars(Console(file=quiet, force_terminal=True), delay=60) as bars:
        bars.bar("placing tensors")(10, 10)
    assert not bars.shown and quiet.getvalue() == ""


def test_hugging_face_model_takes_the_low_memory_path(capsys, caplog, tmp_path, minilm_dir):
    """BERT holds non-persistent buffers (`position_ids`): with only its parameters on the meta device it is
    filled without a normal build, and the output equals what a normal build and load_state_dict give."""
    caplog.set_level(logging.DEBUG, logger="torchgraft")
    out = tmp_path / "bert3.safetensors"
    kwargs = json.dumps({"config": str(minilm_dir), "num_labels": 3})
    code, stdout, _ = run(capsys, "transfer", str(minilm_dir), "--model", "transformers:BertForSequenceClassification",
                          "--model-kwargs", kwargs, "--out", str(out))
    assert code == 0 and "filled on the meta device" in caplog.text and "built again normally" not in caplog.text
    written = load_file(out)
    source = load_file(minilm_dir / "model.safetensors")
    loaded = [k for k in written if k.startswith("bert.") and k.removeprefix("bert.") in source]
    assert len(loaded) >= 100
    assert all(torch.equal(written[k], source[k.removeprefix("bert.")]) for k in loaded)
    head = written["classifier.weight"]
    assert head.shape == (3, 384) and 0.015 < float(head.std()) < 0.025  # as BERT's own init: N(0, 0.02)
    assert not written["classifier.bias"].any()
