"""Numeric sanity: NaN/Inf tensors and all-zero weight tensors are flagged by inspect and transfer; --strict
fails on NaN/Inf loaded tensors. Real models: torchvision's resnet18 state and the real MobileNetV2 file."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torchvision
from safetensors.torch import save_file

from torchgraft import GraftError
from torchgraft.cli import main
from torchgraft.numeric import check_tensor
from torchgraft.transfer import transfer


@pytest.fixture(scope="module")
def resnet_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in torchvision.models.resnet18().state_dict().items()}


@pytest.fixture()
def damaged(tmp_path, resnet_state):
    """resnet18 with 3 NaN and 1 Inf in layer1.0.conv1.weight, and layer2.0.conv2.weight zeroed."""
    state = {k: v.clone() for k, v in resnet_state.items()}
    w = state["layer1.0.conv1.weight"].view(-1)
    w[:3] = float("nan")
    w[10] = float("inf")
    state["layer2.0.conv2.weight"].zero_()
    path = tmp_path / "resnet18-damaged.pth"
    torch.save(state, path)
    return path


def test_check_tensor_rules():
    assert check_tensor("a.weight", torch.tensor([1.0, float("nan"), float("-inf")])) == [
        {"key": "a.weight", "problem": "nan", "count": 1}, {"key": "a.weight", "problem": "inf", "count": 1}]
    assert check_tensor("a.weight", torch.zeros(4, 4)) == [{"key": "a.weight", "problem": "all_zero", "count": 16}]
    for healthy in (("a.bias", torch.zeros(4)), ("bn.running_mean", torch.zeros(4)),
                    ("bn.num_batches_tracked", torch.tensor(0)), ("a.scale", torch.zeros(1)),
                    ("ids", torch.zeros(4, dtype=torch.long)), ("a.weight", torch.randn(3, 3))):
        assert check_tensor(*healthy) == [], healthy[0]


def _by_definition(t: torch.Tensor) -> dict[str, int]:
    """What check_tensor must find, counted the slow, obvious way."""
    v = t.detach().double()
    nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
    if nan or inf:
        return {k: n for k, n in (("nan", nan), ("inf", inf)) if n}
    return {"all_zero": t.numel()} if t.numel() > 1 and not bool(v.any()) else {}


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, -0.0, 1.5, -2.0, 1e-30, 6e4, float("nan"), float("inf"),
                                        float("-inf")]), min_size=1, max_size=40),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       grad=st.booleans())
def test_check_tensor_agrees_with_the_definition(values, dtype, grad):
    t = torch.tensor(values, dtype=dtype).requires_grad_(grad)
    found = {p["problem"]: p["count"] for p in check_tensor("layer.weight", t)}
    assert found == _by_definition(t)


def test_healthy_resnet_has_no_problems(tmp_path, resnet_state, capsys):
    path = tmp_path / "ok.safetensors"
    save_file(resnet_state, path)
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["numeric"] == []


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_inspect_flags_nan_inf_and_zeroed_conv(tmp_path, damaged, capsys, fmt):
    path = damaged
    if fmt == "safetensors":
        path = tmp_path / "damaged.safetensors"
        save_file(torch.load(damaged, weights_only=True), path)
    assert main(["inspect", str(path), "--json"]) == 0
    numeric = json.loads(capsys.readouterr().out)["numeric"]
    assert {(p["key"], p["problem"], p["count"]) for p in numeric} == {
        ("layer1.0.conv1.weight", "nan", 3), ("layer1.0.conv1.weight", "inf", 1),
        ("layer2.0.conv2.weight", "all_zero", 147456)}
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "numeric: layer1.0.conv1.weight: 3 NaN values" in text
    assert "layer2.0.conv2.weight" in text and "all zero" in text


def test_transfer_warns_per_loaded_tensor(damaged):
    model = torchvision.models.resnet18(num_classes=10)
    report = transfer(damaged, model, allow_new=["fc.*"])
    problems = {(p["source"], p["problem"]) for p in report.numeric}
    assert problems == {("layer1.0.conv1.weight", "nan"), ("layer1.0.conv1.weight", "inf"),
                        ("layer2.0.conv2.weight", "all_zero")}
    assert sum("layer1.0.conv1.weight" in w and "NaN" in w for w in report.warnings) == 1
    assert any("layer2.0.conv2.weight" in w and "all zero" in w for w in report.warnings)
    assert report.to_dict()["numeric"] == report.numeric
    # the unloaded fc (1000 classes -> 10, adapted or new) is not what is checked: only the source's tensors
    with pytest.raises(GraftError, match=r"--strict: .*layer1\.0\.conv1\.weight: 3 NaN values") as err:
        report.check_strict(["fc.*"])
    assert "\n" not in str(err.value)


def test_strict_transfer_fails_before_changing_the_model(damaged):
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GraftError, match="NaN"):
        transfer(damaged, model, strict=True, allow_new=["fc.*"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_strict_allows_zeroed_layers_but_warns(tmp_path, resnet_state):
    state = {k: v.clone() for k, v in resnet_state.items()}
    state["conv1.weight"].zero_()
    path = tmp_path / "zeroed.pth"
    torch.save(state, path)
    report = transfer(path, torchvision.models.resnet18(), strict=True)
    assert [p["problem"] for p in report.numeric] == ["all_zero"]


def test_cli_transfer_strict_one_line_error(tmp_path, damaged, capsys):
    out = tmp_path / "out.safetensors"
    code = main(["transfer", str(damaged), "--model", "torchvision:resnet18", "--model-kwargs",
                 '{"num_classes": 10}', "--out", str(out), "--strict", "--allow-new", "fc.*"])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "NaN" in lines[0]
    assert main(["transfer", str(damaged), "--model", "torchvision:resnet18", "--out", str(out)]) == 0
    captured = capsys.readouterr()  # warnings go to stderr, the table to stdout
    assert "warning:" in captured.err and "layer1.0.conv1.weight" in captured.err and out.exists()
    assert "warning:" not in captured.out
