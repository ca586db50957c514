"""ONNX models into PyTorch: `torch.onnx.export` files of torchvision models (the default dynamo exporter, which
keeps the parameter names and folds every BatchNorm into its conv, and the legacy one, which loses the conv names
too) read back into fresh torchvision models, and silero-vad's own ONNX files into a PyTorch port, with outputs
equal to onnxruntime's. ResNet-18 gets random BatchNorm statistics and MobileNetV2 holds its real ImageNet
weights, so the folded kernels differ from the originals."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import load_file

import torchgraft as tg
from torchgraft.cli import main
from torchgraft.errors import CheckpointError
from torchgraft.io.onnx_reader import OnnxRunner, module_path_from_scope

sys.path.insert(0, str(Path(__file__).parent))
from silero_port import CHUNK, CONTEXT, silero_vad_16k  # noqa: E402

SILERO = Path(__import__("silero_vad").__file__).parent / "data"
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _export(model: nn.Module, path: Path, dynamo: bool = True, x: torch.Tensor = X, **options) -> Path:
    """`torch.onnx.export` with the exporter's chatter silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, **options)
    return path


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():  # statistics that make every folded kernel differ from its conv's
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


def _mobilenet(path: Path) -> nn.Module:
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, mobilenet_v2_path) -> dict[str, tuple[Path, nn.Module]]:
    """`{arch}_{dynamo|legacy}` -> (the .onnx file, the model it was exported from)."""
    root = tmp_path_factory.mktemp("onnx")
    models = {"resnet18": _resnet18(), "mobilenet_v2": _mobilenet(mobilenet_v2_path)}
    return {f"{arch}_{kind}": (_export(model, root / f"{arch}_{kind}.onnx", kind == "dynamo"), model)
            for arch, model in models.items() for kind in ("dynamo", "legacy")}


def _ort(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _outputs(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ---- reading ---------------------------------------------------------------------------------------------


def test_scope_names_give_full_module_paths():
    assert module_path_from_scope("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert module_path_from_scope("/layer2/layer2.0/downsample/downsample.0/Conv") == "layer2.0.downsample.0"
    assert module_path_from_scope("/features/features.0/features.0.0/Conv") == "features.0.0"
    assert module_path_from_scope("/fc/Gemm") == "fc"
    assert module_path_from_scope("node_Conv_291") is None


def test_dynamo_export_keeps_names_and_names_the_folded_bias_by_its_conv(exports):
    path, model = exports["resnet18_dynamo"]
    src = tg.load(path)
    assert src.format == "onnx" and src.folded_bn
    assert src.keys()[:4] == ["conv1.weight", "conv1.bias", "layer1.0.conv1.weight", "layer1.0.conv1.bias"]
    assert src.origins["conv1.bias"] == "conv1.weight_bias"  # the exporter's name for the folded bias
    assert src.keys()[-2:] == ["fc.weight", "fc.bias"]
    assert torch.equal(src["fc.weight"], model.fc.weight)  # a kept name holds the parameter as is
    bn = model.bn1
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(src["conv1.weight"], model.conv1.weight * scale[:, None, None, None])
    torch.testing.assert_close(src["conv1.bias"], bn.bias - bn.running_mean * scale)
    assert src.metadata["producer"].startswith("pytorch") and src.metadata["input_shape"] == [1, 3, 64, 64]
    assert src.metadata["convs"] == 20 and src.metadata["convs_followed_by_batchnorm"] == 0
    assert src.modules["layer1.0.conv1"] == "Conv" and src.modules["fc"] == "Gemm"


def test_legacy_export_names_lost_weights_by_their_scope_and_slot(exports):
    path, model = exports["resnet18_legacy"]
    src = tg.load(path)
    assert src.origins["layer2.0.downsample.0.weight"].startswith("onnx::Conv_")
    assert src.origins["layer2.0.downsample.0.bias"].startswith("onnx::Conv_")
    assert src.origins["fc.weight"] == "fc.weight"
    assert src.keys()[:3] == ["conv1.weight", "conv1.bias", "layer1.0.conv1.weight"]  # op order
    assert len(src) == 2 * 20 + 2


# ---- transfer into torchvision models --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18_dynamo", "resnet18_legacy", "mobilenet_v2_dynamo",
                                  "mobilenet_v2_legacy"])
def test_export_transfers_back_with_equal_outputs(exports, name):
    path, original = exports[name]
    target = getattr(torchvision.models, name.rsplit("_", 1)[0])().eval()
    report = tg.transfer(path, target)
    entries = {e.target: e for e in report.entries}
    assert entries[next(k for k in entries if k.endswith("running_var"))].adapter == "unfold_bn"
    assert all(e.status != "new" for e in report.entries if not e.target.endswith("num_batches_tracked"))
    y = _outputs(target)
    assert (y - _ort(path, X)).abs().max() < 1e-4
    assert (y - _outputs(original)).abs().max() < 1e-4
    assert report.verified is True  # verified against onnxruntime on the file's own input shape


def test_weights_with_no_names_and_no_scopes_align_by_op_order(exports, tmp_path):
    """Every initializer renamed and every node name erased: only the graph's order and shapes are left."""
    path, original = exports["mobilenet_v2_legacy"]
    proto = onnx.load(str(path))
    renames = {t.name: f"val_{i}" for i, t in enumerate(proto.graph.initializer)}  # as the dynamo exporter names values
    for t in proto.graph.initializer:
        t.name = renames[t.name]
    for node in proto.graph.node:
        node.name = ""
        node.input[:] = [renames.get(i, i) for i in node.input]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    src = tg.load(bare)
    assert src.keys()[:3] == ["Conv_0.weight", "Conv_0.bias", "Conv_1.weight"]
    assert src.keys()[-2:] == ["Gemm_52.weight", "Gemm_52.bias"]
    target = torchvision.models.mobilenet_v2().eval()
    report = tg.transfer(bare, target)
    assert {e.target: e.source for e in report.entries}["features.18.0.weight"] == "Conv_51.weight"
    assert (_outputs(target) - _outputs(original)).abs().max() < 1e-4


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(32, 10, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm(self.proj(x))
        x, _ = self.gru(x)
        return self.head(x)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_matmul_weights_and_recurrent_gates_take_pytorch_layouts(tmp_path, dynamo):
    torch.manual_seed(0)
    model, x = _Recurrent().eval(), torch.randn(2, 5, 8)
    path = tmp_path / "rnn.onnx"
    _export(model, path, dynamo, x)
    src = tg.load(path)
    assert sorted(src.keys()) == sorted(model.state_dict())  # the initial states (zeros) are not weights
    assert src.layouts["proj.weight"] == ("dense_kernel", {})  # MatMul by an (in, out) initializer
    assert src.layouts["lstm.weight_hh_l1_reverse"] == ("gate_order", {"order": [0, 2, 3, 1], "transpose": False})
    assert src.layouts["gru.bias_hh_l0"] == ("gate_order", {"order": [1, 0, 2], "transpose": False})
    for key, value in model.state_dict().items():  # each tensor by value, not by count
        assert torch.equal(src[key], value), key
    target = _Recurrent().eval()
    tg.transfer(src, target)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert (_outputs(target, x) - y).abs().max() < 1e-5


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_vit_matmul_weights_and_top_level_parameters(tmp_path, dynamo):
    """A timm ViT: attention and MLP weights reach ONNX as MatMuls by folded (in, out) transposes (`onnx::MatMul_*`,
    `val_*`), `pos_embed`/`cls_token` as top-level keys. The dynamo exporter folds `cls_token.expand(1, ...)` into a
    value named after its op (`expand`), which is no key: it is named by its node and a rename rule places it."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "vit.onnx"
    _export(model, path, dynamo, x)
    src = tg.load(path)
    assert src.layouts["blocks.1.mlp.fc2.weight"] == ("dense_kernel", {})
    assert torch.equal(src["blocks.0.attn.qkv.weight"], model.blocks[0].attn.qkv.weight)
    assert torch.equal(src["pos_embed"], model.pos_embed)
    folded = "Concat_1.concat_input0"
    assert ("cls_token" in src) != dynamo and (folded in src) == dynamo
    target = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10).eval()
    report = tg.transfer(src, target, rules={"rename": {folded: "cls_token"}} if dynamo else None)
    assert report.verified is True and not report.unused_source
    assert (_outputs(target, x) - _ort(path, x)).abs().max() < 1e-4


def _conv_bn(bias: bool, eps: float = 1e-5) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.BatchNorm2d(8, eps=eps), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, bias=bias), nn.BatchNorm2d(8))


def test_kept_batchnorms_take_the_conv_bias_into_the_running_mean_and_carry_eps(tmp_path):
    """An export that keeps its norms (the dynamo exporter with optimize=False): a conv bias whose output only its
    BatchNorm takes moves into the norm's running mean for a target conv without one; eps 1e-3 is carried."""
    torch.manual_seed(0)
    source = _conv_bn(True, eps=1e-3).eval()
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "convbn.onnx"
    _export(source, path, x=x, optimize=False)
    src = tg.load(path)
    assert not src.folded_bn and src.foldable_bias == {"0.bias": "1", "3.bias": "4"}
    assert src.module_attrs["1"] == {"eps": 0.001, "momentum": 0.1}
    target = _conv_bn(False).eval()
    report = tg.transfer(src, target)
    entries = {e.target: e for e in report.entries}
    assert entries["1.running_mean"].adapter == "bias_into_bn" and entries["1.running_mean"].source == ["1.running_mean", "0.bias"]
    assert target[1].eps == 1e-3 and target[4].eps == 1e-5
    assert (_outputs(target, x) - _ort(path, x)).abs().max() < 1e-5


def test_external_data_is_read_lazily_and_only_from_beside_the_model(tmp_path, exports):
    path, original = exports["resnet18_legacy"]
    proto = onnx.load(str(path))
    onnx.save(proto, str(tmp_path / "r18.onnx"), save_as_external_data=True, location="r18.data",
              size_threshold=1024)
    src = tg.load(tmp_path / "r18.onnx")
    assert torch.equal(src["fc.weight"], original.fc.weight)
    for t in proto.graph.initializer:  # point the data outside the model's folder
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    (tmp_path / "evil").mkdir()
    onnx.save(proto, str(tmp_path / "evil" / "r18.onnx"))
    with pytest.raises(CheckpointError, match="outside the model's folder"):
        tg.load(tmp_path / "evil" / "r18.onnx")["fc.weight"]


# ---- the command line ------------------------------------------------------------------------------------


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_inspects_diffs_and_transfers_with_verify(capsys, exports, tmp_path):
    path, original = exports["mobilenet_v2_legacy"]
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["format"] == "onnx" and shown["num_tensors"] == 2 * 52 + 2
    first = shown["tensors"][0]
    assert first["key"] == "features.0.0.weight" and first["shape"] == [32, 3, 3, 3]
    assert first["in_file"].startswith("onnx::Conv_")  # the name the exporter gave it

    code, out, _ = run(capsys, "diff", str(path), str(exports["mobilenet_v2_dynamo"][0]), "--json")
    diff = json.loads(out)
    assert code == 0 and diff["num_common"] == 106 and not diff["only_in_a"] and not diff["shape_mismatch"]

    out_file, report = tmp_path / "mnv2.safetensors", tmp_path / "report.json"
    code, out, err = run(capsys, "transfer", str(path), "--model", "torchvision:mobilenet_v2", "--out",
                         str(out_file), "--report", str(report), "--verify")
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["verified"] is True and data["summary"]["unused_source"] == 0
    target = torchvision.models.mobilenet_v2().eval()
    target.load_state_dict(load_file(out_file))
    assert (_outputs(target) - _ort(path, X)).abs().max() < 1e-4
    assert (_outputs(target) - _outputs(original)).abs().max() < 1e-4


@pytest.mark.parametrize("content", ["truncated", "not_onnx"])
def test_bad_onnx_file_is_one_error_line_and_nothing_written(capsys, exports, tmp_path, content):
    bad = tmp_path / "bad.onnx"
    whole = exports["resnet18_legacy"][0].read_bytes()
    bad.write_bytes(whole[: len(whole) // 3] if content == "truncated" else b"name,shape\nconv1.weight,3x3\n" * 50)
    out_file = tmp_path / "out.safetensors"
    for argv in (["inspect", str(bad)],
                 ["transfer", str(bad), "--model", "torchvision:resnet18", "--out", str(out_file)]):
        code, _, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ")
        assert str(bad) in lines[0] and "ONNX" in lines[0]
    assert not out_file.exists()
    with pytest.raises(CheckpointError, match="expected an ONNX protobuf|parses as no ONNX model"):
        tg.load(bad)


def test_missing_onnx_names_the_extra(monkeypatch, exports):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(CheckpointError, match=r"needs onnx, which is not installed.*pip install 'torchgraft\[onnx\]'"):
        tg.load(exports["resnet18_legacy"][0])


def test_missing_onnxruntime_names_the_extra_and_verification_says_why(monkeypatch, exports):
    path = exports["resnet18_legacy"][0]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(CheckpointError, match=r"needs onnxruntime.*pip install 'torchgraft\[onnxruntime\]'"):
        OnnxRunner(path)
    report = tg.transfer(path, torchvision.models.resnet18())
    assert report.verified is None and any("pip install 'torchgraft[onnxruntime]'" in n for n in report.notes)


def _gru_graph(path: Path, linear_before_reset: int) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W", (1, 12, 4)), ("R", (1, 12, 4)), ("B", (1, 24)))]
    node = helper.make_node("GRU", ["X", "W", "R", "B"], ["Y"], hidden_size=4,
                            linear_before_reset=linear_before_reset)
    graph = helper.make_graph([node], "gru", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 1, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    return path


def test_gru_without_a_pytorch_equivalent_is_refused(tmp_path):
    src = tg.load(_gru_graph(tmp_path / "ok.onnx", 1))
    assert src.keys() == ["GRU_0.weight_ih_l0", "GRU_0.weight_hh_l0", "GRU_0.bias_ih_l0", "GRU_0.bias_hh_l0"]
    with pytest.raises(CheckpointError, match="linear_before_reset=0, which no PyTorch GRU computes"):
        tg.load(_gru_graph(tmp_path / "old.onnx", 0))


# ---- silero-vad ------------------------------------------------------------------------------------------


def _speech_like(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    voiced = sum(torch.sin(2 * torch.pi * f * t) / k for k, f in enumerate((180, 360, 540, 720), 1))
    return (0.3 * voiced * (1 + torch.sin(2 * torch.pi * 4 * t)) + 0.02 * torch.randn(n, generator=g))[None]


def _runner(path: Path) -> OnnxRunner:
    return OnnxRunner(path, feeds={"state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)})


@pytest.mark.parametrize("file", ["silero_vad_16k_op15.onnx", "silero_vad.onnx"])
def test_silero_vad_onnx_into_a_pytorch_port_matches_onnxruntime(file):
    """op15: initializers under silero's PyTorch keys, the LSTM cell's read inside `If` branches; silero_vad.onnx
    (spox): no initializers, every weight a Constant inside one `If` branch per sample rate (8 and 16 kHz)."""
    path = SILERO / file
    src = tg.load(path)
    port = silero_vad_16k()
    report = tg.transfer(src, port, input_shape=(1, CONTEXT + CHUNK))
    sources = {e.target: e.source for e in report.entries}
    prefix = "model." if file.endswith("op15.onnx") else "then_branch."  # then: sr == 16000
    assert sources == {k: prefix + k for k in port.state_dict()}
    for key in port.state_dict():
        assert torch.equal(port.state_dict()[key], src[prefix + key])
    if file == "silero_vad.onnx":
        assert sorted(k for k in src.keys() if k.startswith("else_branch."))[0] == "else_branch.decoder.decoder.2.bias"
        assert src.info["else_branch.stft.forward_basis_buffer"].shape == (130, 1, 128)  # the 8 kHz model
    x = _speech_like(CONTEXT + CHUNK)
    with torch.no_grad():
        y_port, _ = port(x)
    y_onnx = _runner(path)(x)
    assert y_port.shape == y_onnx.shape == (1, 1)
    assert (y_port - y_onnx).abs().max() < 1e-5
    checked = tg.verify(_runner(path), port, report, inputs=x, atol=1e-5)  # the API's check, outputs only
    assert checked.agreed == checked.compared == 1 and checked.output_max_abs_diff < 1e-5


def test_silero_vad_state_carries_over_chunks_as_in_onnxruntime():
    path = SILERO / "silero_vad_16k_op15.onnx"
    port = silero_vad_16k()
    tg.transfer(path, port, input_shape=(1, CONTEXT + CHUNK))
    session = _runner(path).session
    audio = _speech_like(CONTEXT + 4 * CHUNK, seed=3)
    state_p, state_o = torch.zeros(2, 1, 128), np.zeros((2, 1, 128), np.float32)
    for i in range(4):
        x = audio[:, i * CHUNK:i * CHUNK + CONTEXT + CHUNK]
        with torch.no_grad():
            y_p, state_p = port(x, state_p)
        y_o, state_o = session.run(None, {"input": x.numpy(), "state": state_o, "sr": np.array(16000, np.int64)})
        assert np.abs(y_p.numpy() - y_o).max() < 1e-5
        assert np.abs(state_p.numpy() - state_o).max() < 1e-5
