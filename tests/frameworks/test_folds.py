"""The plan's stages for another framework's tensors, on real torchvision models: a BatchNorm an exporter folded
into its conv, a conv bias kept before a BatchNorm, a BatchNorm's epsilon, and layouts recorded per tensor.

The sources are made here from the real MobileNetV2 file the way the exporters and Keras store them (folded
kernels, channels-last kernels under layer names that say nothing PyTorch knows), so the expected outputs are
the original model's."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import torchgraft as tg
from torchgraft.io.frameworks import ForeignTensor, foreign_source
from torchgraft.layout import bias_into_bn, channels_last_kernel, dense_kernel, flatten_channels_last


def _real_mobilenet(path) -> nn.Module:
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _entry(name, value, layout=None, args=None, origin=None):
    value = value.detach().clone()
    shape = tuple(tg.adapt.ADAPTERS[layout].run([value], value, args or {}).shape) if layout else tuple(value.shape)
    return ForeignTensor(name, origin or name, lambda v=value: v, shape, "float32", layout, dict(args or {}))


def _folded(model: nn.Module) -> list[ForeignTensor]:
    """Every conv with the BatchNorm after it folded in (weight * gamma / std, beta - mean * gamma / std), in
    execution order, named by op order as an exporter that lost the names does: Conv_0, Conv_1, ..., Gemm_52."""
    entries, i = [], 0
    mods = list(model.named_modules())
    for (name, m), (_, nxt) in zip(mods, mods[1:] + [(None, None)]):
        if isinstance(m, nn.Conv2d):
            assert isinstance(nxt, nn.BatchNorm2d)
            scale = nxt.weight / torch.sqrt(nxt.running_var + nxt.eps)
            entries += [_entry(f"Conv_{i}.weight", m.weight * scale[:, None, None, None]),
                        _entry(f"Conv_{i}.bias", nxt.bias - nxt.running_mean * scale)]
            i += 1
        elif isinstance(m, nn.Linear):
            entries += [_entry(f"Gemm_{i}.weight", m.weight), _entry(f"Gemm_{i}.bias", m.bias)]
    return entries


def test_folded_batchnorms_unfold_into_equal_outputs(mobilenet_v2_path):
    original = _real_mobilenet(mobilenet_v2_path)
    source = foreign_source("exported.onnx", "onnx", _folded(original), folded_bn=True)
    model = torchvision.models.mobilenet_v2()
    report = tg.transfer(source, model, strict=True)
    unfolded = [e for e in report.entries if e.adapter == "unfold_bn"]
    assert len(unfolded) == 4 * 52  # every BatchNorm: weight, bias, running_mean, running_var
    assert report.entry("features.0.1.bias").source == "Conv_0.bias"
    assert report.entry("features.0.0.weight").source == "Conv_0.weight"
    assert not report.unused_source
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), original(x), atol=1e-4)


def test_a_plain_pytorch_source_never_unfolds(mobilenet_v2_path):
    """The same tensors without the exporter's word: convs with a bias do not meet bias-free convs, and no
    BatchNorm is made the identity."""
    source = foreign_source("weights.bin", "test", _folded(_real_mobilenet(mobilenet_v2_path)), folded_bn=False)
    report = tg.transfer(source, torchvision.models.mobilenet_v2())
    assert not [e for e in report.entries if e.adapter == "unfold_bn"]
    assert report.entry("features.0.1.bias").status == "new"


def _keras_style(model: nn.Module, eps: float) -> tuple[list[ForeignTensor], dict, dict]:
    """Every conv stored channels-last with a bias that feeds its BatchNorm (Keras ResNet's layout), the norms
    with Keras' names for their tensors and epsilon `eps`, the classifier as a dense kernel."""
    entries, foldable, attrs, biases = [], {}, {}, {}
    generator = torch.Generator().manual_seed(0)
    for k, (name, m) in enumerate(model.named_modules()):
        layer = f"layer_{k}"
        if isinstance(m, nn.Conv2d):
            kind = "depthwise" if m.groups > 1 else "conv"
            stored = m.weight.permute(2, 3, 1, 0) if kind == "conv" else m.weight.permute(2, 3, 0, 1)
            bias = torch.randn(m.out_channels, generator=generator) * 0.1
            entries += [_entry(f"{layer}.weight", stored, "channels_last_kernel", {"kind": kind},
                               origin=f"{layer}/kernel"),
                        _entry(f"{layer}.bias", bias, origin=f"{layer}/bias")]
            foldable[f"{layer}.bias"] = f"layer_{k + 1}"
            biases[f"layer_{k + 1}"] = bias
        elif isinstance(m, nn.BatchNorm2d):
            # the source's norm sees conv + bias: its mean holds the bias too
            entries += [_entry(f"{layer}.weight", m.weight, origin=f"{layer}/gamma"),
                        _entry(f"{layer}.bias", m.bias, origin=f"{layer}/beta"),
                        _entry(f"{layer}.running_mean", m.running_mean + biases[layer], origin=f"{layer}/moving_mean"),
                        _entry(f"{layer}.running_var", m.running_var, origin=f"{layer}/moving_variance")]
            attrs[layer] = {"eps": eps, "momentum": 0.01}
        elif isinstance(m, nn.Linear):
            entries += [_entry(f"{layer}.weight", m.weight.t(), "dense_kernel", origin=f"{layer}/kernel"),
                        _entry(f"{layer}.bias", m.bias, origin=f"{layer}/bias")]
    return entries, foldable, attrs


def test_conv_biases_move_into_the_norm_and_eps_is_carried(mobilenet_v2_path):
    original = _real_mobilenet(mobilenet_v2_path)
    entries, foldable, attrs = _keras_style(original, eps=1e-3)
    for m in original.modules():  # what the source computes: the same norms with Keras' epsilon
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3
    source = foreign_source("model.keras", "keras", entries, foldable_bias=foldable, module_attrs=attrs)
    model = torchvision.models.mobilenet_v2()
    report = tg.transfer(source, model, strict=True)
    moved = [e for e in report.entries if e.adapter == "bias_into_bn"]
    assert len(moved) == 52
    assert model.features[0][1].eps == 1e-3 and model.features[0][1].momentum == 0.01
    assert "eps 1e-05 -> 0.001" in report.entry("features.0.1.weight").note
    kernel = report.entry("features.0.0.weight")
    assert kernel.layout == "channels_last_kernel" and kernel.note.startswith(f"{kernel.source[:-7]}/kernel:")
    assert report.entry("features.1.conv.0.0.weight").args is None
    assert report.entry("classifier.1.weight").layout == "dense_kernel"
    assert not report.unused_source
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), original(x), atol=1e-4)


def test_a_plan_from_a_foreign_source_keeps_settings_and_layouts(mobilenet_v2_path, tmp_path):
    entries, foldable, attrs = _keras_style(_real_mobilenet(mobilenet_v2_path), eps=1e-3)
    source = foreign_source("model.keras", "keras", entries, foldable_bias=foldable, module_attrs=attrs)
    made = tg.plan(source, torchvision.models.mobilenet_v2())
    made.save(tmp_path / "plan.json")
    again = tg.Plan.read(tmp_path / "plan.json")
    assert again.settings == made.settings and again.settings["features.0.1"] == {"eps": 1e-3, "momentum": 0.01}
    assert [s.layout for s in again.steps] == [s.layout for s in made.steps]
    model = torchvision.models.mobilenet_v2()
    tg.transfer(source, model, plan=again)
    assert model.features[18][1].eps == 1e-3


def test_layout_functions_move_numbers_only():
    x = torch.randn(2, 5, 3, 4)  # N, C, H, W
    kernel = torch.randn(3 * 4 * 5, 7)  # a Dense after a channels-last Flatten of (3, 4, 5)
    keras = x.permute(0, 2, 3, 1).reshape(2, -1) @ kernel
    assert torch.allclose(x.reshape(2, -1) @ flatten_channels_last(kernel, [3, 4, 5]).t(), keras, atol=1e-5)
    conv = torch.randn(3, 3, 4, 8)
    assert channels_last_kernel(conv).shape == (8, 4, 3, 3)
    assert torch.equal(channels_last_kernel(conv)[5, 2], conv[:, :, 2, 5])
    depthwise = torch.randn(3, 3, 4, 2)  # (H, W, C, multiplier): output channel c * 2 + m
    assert torch.equal(channels_last_kernel(depthwise, "depthwise")[3, 0], depthwise[:, :, 1, 1])
    assert torch.equal(dense_kernel(kernel), kernel.t())
    assert torch.equal(bias_into_bn(torch.ones(3), torch.arange(3.0)), torch.tensor([1.0, 0.0, -1.0]))
    with pytest.raises(ValueError):
        channels_last_kernel(conv, "sideways")


def test_settings_travel_with_a_written_file(mobilenet_v2_path, tmp_path):
    """eps and momentum are module attributes, not tensors: a written file carries them as metadata and the
    report says a model built anew must set them."""
    import json

    from safetensors import safe_open

    entries, foldable, attrs = _keras_style(_real_mobilenet(mobilenet_v2_path), eps=1e-3)
    source = foreign_source("model.keras", "keras", entries, foldable_bias=foldable, module_attrs=attrs)
    out = tmp_path / "out.safetensors"
    report = tg.transfer(source, build="torchvision:mobilenet_v2", out=out)
    assert report.to_dict()["settings"]["features.18.1"] == {"eps": 1e-3, "momentum": 0.01}
    assert any("must set them too" in w for w in report.warnings)
    with safe_open(str(out), "pt") as f:
        written = json.loads(f.metadata()["torchgraft.settings"])
    assert written == report.settings and len(written) == 52
