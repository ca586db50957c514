"""`graft inspect`, `graft diff`, `graft demo` end to end: exit codes, one-line errors, JSON contracts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from torchgraft.cli import main

GRAFT = [sys.executable, "-m", "torchgraft.cli"]


def graft(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([*GRAFT, *args], capture_output=True, text=True, env=env, timeout=300)


def run_json(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 1) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def legacy_resnet18_102(tmp_path_factory) -> Path:
    """Seed 003: an old resnet18 file with 102 keys (no num_batches_tracked), in the pre-1.6 format."""
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path_factory.mktemp("legacy") / "resnet18-old.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path


def test_inspect_json_real_mobilenet(capsys, mobilenet_v2_path):
    out = run_json(capsys, "inspect", str(mobilenet_v2_path))
    expected = torchvision.models.mobilenet_v2().state_dict()
    assert out["format"] == "torch-legacy"
    assert out["wrapper"] is None
    assert out["num_tensors"] == len(expected) == 314
    assert [t["key"] for t in out["tensors"]] == list(expected)
    assert all(t["shape"] == list(expected[t["key"]].shape) for t in out["tensors"])
    assert out["num_params"] == sum(v.numel() for v in expected.values())


def test_inspect_table_collapses_layers(capsys, mobilenet_v2_path):
    assert main(["inspect", str(mobilenet_v2_path)]) == 0
    text = capsys.readouterr().out
    assert "torch-legacy" in text
    assert "features.{1..17}.conv" in text
    assert "classifier.1.weight" in text
    assert "3,539,036" in text  # total parameters and buffers


def test_inspect_whole_model_lists_classes(capsys, tmp_path):
    model = torchvision.models.resnet18(num_classes=7)
    torch.save(model, tmp_path / "whole.pth")
    out = run_json(capsys, "inspect", str(tmp_path / "whole.pth"))
    assert out["modules"][""] == "torchvision.models.resnet.ResNet"
    assert out["modules"]["layer1.0"] == "torchvision.models.resnet.BasicBlock"
    assert "whole model" in out["wrapper"]
    assert [t["key"] for t in out["tensors"]] == list(model.state_dict())


def test_inspect_model_spec_counts(capsys):
    out = run_json(capsys, "inspect", "--model", "torchvision:resnet18", "--model-kwargs", '{"num_classes": 21}')
    model = torchvision.models.resnet18(num_classes=21)
    total = sum(p.numel() for p in model.parameters())
    assert out["num_params"] == total
    assert out["trainable_params"] == total and out["frozen_params"] == 0
    assert out["num_buffers"] == len(list(model.buffers()))
    assert {m["name"]: m["type"] for m in out["modules"]}["fc"] == "Linear"
    assert next(p for p in out["parameters"] if p["key"] == "fc.weight")["shape"] == [21, 512]


def test_inspect_model_table(capsys):
    assert main(["inspect", "--model", "timm:resnet10t"]) == 0
    text = capsys.readouterr().out
    assert "trainable" in text and "frozen" in text
    assert "layer{1..4}" in text or "layer1" in text


def test_diff_explains_num_batches_tracked(capsys, legacy_resnet18_102):
    out = run_json(capsys, "diff", str(legacy_resnet18_102), "torchvision:resnet18")
    assert out["num_common"] == 102
    assert out["only_in_a"] == []
    assert len(out["only_in_b"]) == 20
    assert all(k.endswith("num_batches_tracked") for k in out["only_in_b"])
    assert out["shape_mismatch"] == []
    assert any("20 keys only in B" in n and "num_batches_tracked" in n for n in out["notes"])


def test_diff_head_and_same_shapes_under_other_names(capsys, mobilenet_v2_path):
    out = run_json(capsys, "diff", str(mobilenet_v2_path), "torchvision:mobilenet_v2", "--b-kwargs",
                   '{"num_classes": 10}')
    assert out["num_common"] == 314
    assert {m["key"] for m in out["shape_mismatch"]} == {"classifier.1.weight", "classifier.1.bias"}
    assert any(n.startswith("classifier.1: 1000 vs 10 rows") for n in out["notes"])
    out = run_json(capsys, "diff", str(mobilenet_v2_path), "timm:mobilenetv2_100")
    assert out["num_common"] == 0
    assert any("same sequence of shapes" in n for n in out["notes"])


def test_diff_prefix_note(capsys, tmp_path):
    state = torchvision.models.resnet18().state_dict()
    torch.save({f"backbone.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pth")
    torch.save(state, tmp_path / "plain.pth")
    out = run_json(capsys, "diff", str(tmp_path / "prefixed.pth"), str(tmp_path / "plain.pth"))
    assert out["num_common"] == 0
    assert any("prefix `backbone.`" in n and n.startswith("122 keys") for n in out["notes"])


def test_subprocess_inspect_and_help():
    proc = graft("inspect", "--help")
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "graft inspect --model torchvision:resnet18" in proc.stdout
    proc = graft("--help")
    assert proc.returncode == 0 and "inspect" in proc.stdout and "diff" in proc.stdout


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


_BAD_HEADER = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 999]}}'

BAD_INPUTS = {
    "missing": (lambda d: d / "missing.pth", ("missing.pth", "no such file")),
    "empty": (lambda d: _write(d / "empty.pth", b""), ("empty.pth", "empty")),
    "random": (lambda d: _write(d / "random.pth", bytes(range(256)) * 16), ("random.pth", "unrecognised")),
    "directory": (lambda d: (d / "folder").mkdir() or d / "folder", ("folder", "Hugging Face")),
    "corrupt-safetensors": (
        lambda d: _write(d / "bad.safetensors", len(_BAD_HEADER).to_bytes(8, "little") + _BAD_HEADER + b"\0" * 8),
        ("bad.safetensors", "past the end"),
    ),
    "header-not-json": (
        lambda d: _write(d / "nojson.safetensors", (12).to_bytes(8, "little") + b"{not json!!}" + b"\0" * 8),
        ("nojson.safetensors", "not valid JSON"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(tmp_path, case):
    make, needles = BAD_INPUTS[case]
    assert_one_line_error(graft("inspect", str(make(tmp_path))), *needles)


def test_truncated_and_bit_flipped_real_file(tmp_path, mobilenet_v2_path):
    data = Path(mobilenet_v2_path).read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert_one_line_error(graft("inspect", str(tmp_path / "cut.pth")), "cut.pth")
    zipped = tmp_path / "zip.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), zipped)
    flipped = bytearray(zipped.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flipped.pth").write_bytes(bytes(flipped))
    assert_one_line_error(graft("inspect", str(tmp_path / "flipped.pth")), "flipped.pth")


def test_unknown_spec_and_bad_kwargs():
    assert_one_line_error(graft("inspect", "--model", "torchvision:resnet_nope"), "resnet_nope", "resnet")
    assert_one_line_error(graft("inspect", "--model", "torchvision:resnet18", "--model-kwargs", "{num"),
                          "--model-kwargs", "JSON", code=2)  # a usage error, as in every other command
    assert_one_line_error(graft("diff", "timm:not_a_model", "torchvision:resnet18"), "not_a_model")


def test_debug_shows_traceback_and_usage_errors_exit_2(tmp_path):
    proc = graft("inspect", str(tmp_path / "missing.pth"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
    assert graft("no-such-command").returncode == 2
    assert graft("diff", "only-one").returncode == 2


def test_hostile_pickle_refused_from_cli(tmp_path):
    marker = tmp_path / "pwned"
    payload = tmp_path / "evil.pth"
    code = (
        "import os, torch\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'w': torch.zeros(2), 'x': Evil()}}, {str(payload)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert_one_line_error(graft("inspect", str(payload)), "posix.system", "nothing was run")
    assert not marker.exists()


def test_demo_runs_offline(tmp_path):
    proc = graft("demo", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "mobilenet_v2-b0353104.pth" in proc.stdout
    assert "same sequence of shapes" in proc.stdout
    assert "torchgraft_demo_tiny_net.TinyNet" in proc.stdout


# ---- freezing flags ---------------------------------------------------------------------------------------


def test_inspect_freeze_json_reports_trainable(capsys):
    out = run_json(capsys, "inspect", "--model", "torchvision:resnet18", "--freeze", "layer[1-3]")
    model = torchvision.models.resnet18()
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("layer1", "layer2", "layer3"))
    assert out["frozen_params"] == frozen
    assert out["trainable"]["frozen"] == frozen and out["trainable"]["total"] == out["num_params"]
    assert (out["trainable"]["norm_layers"], out["trainable"]["held_in_eval"]) == (20, 14)
    rows = {r["name"]: r for r in out["trainable"]["modules"]}
    assert rows["layer2"]["state"] == "frozen" and rows["layer4"]["state"] == "trainable"
    assert next(p for p in out["parameters"] if p["key"] == "layer1.0.conv1.weight")["trainable"] is False


def test_inspect_freeze_everything_then_unfreeze_with_train_bn(capsys):
    out = run_json(capsys, "inspect", "--model", "torchvision:resnet18", "--freeze", "--unfreeze", "fc", "--train-bn")
    trainable = {p["key"] for p in out["parameters"] if p["trainable"]}
    assert {"fc.weight", "fc.bias", "bn1.weight", "layer4.1.bn2.bias", "layer2.0.downsample.1.weight"} <= trainable
    assert not any("conv" in k for k in trainable)
    assert out["trainable"]["held_in_eval"] == 0  # norm layers keep training with --train-bn
    out = run_json(capsys, "inspect", "--model", "torchvision:resnet18")
    assert out["trainable"]["frozen"] == 0 and out["trainable"]["held_in_eval"] == 0


def test_inspect_freeze_table(capsys):
    assert main(["inspect", "--model", "torchvision:mobilenet_v2", "--freeze", "features.*",
                 "--unfreeze", "features.1[5-8]"]) == 0
    text = capsys.readouterr().out
    assert "BatchNorm held in eval 42 of 52" in text  # features.0: 1, features.1: 2, features.{2..14}: 3 each
    assert "features.{0..14}" not in text  # features.0 is another type
    assert "features.{1..14}  x14" in text and "features.{15..17}  x3" in text
    assert "BN in eval" in text and "frozen" in text and "trainable" in text


def test_inspect_freeze_errors_are_one_line():
    assert_one_line_error(graft("inspect", "--model", "torchvision:resnet18", "--freeze", "layr4.*"),
                          "freeze pattern 'layr4.*' matches no parameter or module; closest: layer4, layer4.0, "
                          "layer4.1.", "Nothing was changed")
    assert_one_line_error(graft("inspect", "--model", "torchvision:resnet18", "--unfreeze", "fc", "--train-bn"),
                          "--train-bn", "needs --freeze", code=2)


def test_inspect_freeze_flags_need_a_model(capsys, mobilenet_v2_path):
    from torchgraft.errors import GraftError

    with pytest.raises(GraftError, match=r"^--freeze, --unfreeze and --train-bn apply to a model, not a checkpoint"):
        from torchgraft.cli import inspect as inspect_cmd

        inspect_cmd.run(source=str(mobilenet_v2_path), model=None, model_kwargs=None, key=None, json=False,
                        all=False, freeze=["features.*"])
    proc = graft("inspect", "--help")
    assert "--freeze [PATTERN ...]" in proc.stdout and "--train-bn" in proc.stdout
    assert "graft inspect --model torchvision:resnet18 --freeze 'layer[1-3]'" in proc.stdout
