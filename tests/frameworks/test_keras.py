"""Keras files (`.keras`, `.weights.h5`, legacy `.h5`) into PyTorch models, with real files made here by Keras 3
on the torch backend: `keras.applications` models with `weights=None` (nothing downloads) whose BatchNorm
statistics are set to non-trivial values (`keras_ports.calibrate_batchnorms`), small hand-made models, and
their PyTorch counterparts. Every transfer is checked against Keras' own output on the same input."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras

import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import torchgraft as tg  # noqa: E402
from torchgraft.cli import main  # noqa: E402
from torchgraft.errors import CheckpointError  # noqa: E402
from torchgraft.io.keras_reader import KerasRunner  # noqa: E402
from torchgraft.layout import channels_last_kernel, flatten_channels_last  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import keras_ports as kp  # noqa: E402

PORTS = Path(__file__).parent / "keras_ports.py"
FORMATS = ("keras", "weights.h5", "h5")
X = torch.rand(2, 3, kp.IMAGE, kp.IMAGE, generator=torch.Generator().manual_seed(0))


def _save(model, folder: Path, name: str) -> dict[str, Path]:
    paths = {fmt: folder / f"{name}.{fmt}" for fmt in FORMATS}
    model.save(paths["keras"])
    model.save_weights(paths["weights.h5"])
    model.save(paths["h5"])  # Keras 3 still writes the legacy HDF5 format (layer_names / weight_names)
    return paths


def _keras_output(model, x: torch.Tensor) -> torch.Tensor:
    """Keras' own output for a PyTorch-layout input (channels last for Keras when it is an image batch)."""
    import keras

    y = model(x.permute(0, 2, 3, 1) if x.dim() == 4 else x, training=False)
    return torch.as_tensor(keras.ops.convert_to_numpy(y))


def _max_diff(model: torch.nn.Module, x: torch.Tensor, expected: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x) - expected).abs().max())


def _tolerance(expected: torch.Tensor) -> float:
    """float32 sums of a deep network: 1e-4, or 1e-5 of the outputs' scale when that is larger."""
    return 1e-4 + 1e-5 * float(expected.abs().max())


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """Each application saved in the three formats, with Keras' output on `X` and the Keras model itself."""
    folder = tmp_path_factory.mktemp("keras_apps")
    made = {}
    for name in ("DenseNet121", "ResNet50", "MobileNetV2"):
        model = kp.application(name)
        made[name] = (_save(model, folder, name), _keras_output(model, X), model)
    return made


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_small")
    model = kp.keras_small_convnet()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return _save(model, folder, "small"), x, _keras_output(model, x), model


@pytest.fixture(scope="module")
def recurrent(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_rnn")
    model = kp.keras_recurrent()
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(2))
    return _save(model, folder, "rnn"), x, _keras_output(model, x)


# ---- keras.applications into torchvision ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_densenet121_from_each_file_gives_keras_outputs(apps, fmt):
    """DenseNet has no padding Keras and torchvision place differently: both files with a config give Keras'
    outputs."""
    paths, expected, keras_model = apps["DenseNet121"]
    model = torchvision.models.densenet121(num_classes=kp.CLASSES)
    report = tg.transfer(paths[fmt], model, source_model=None, strict=True, input_shape=(1, 3, 64, 64))
    assert not report.unused_source
    assert _max_diff(model, X, expected) < _tolerance(expected)
    # by value: the stem conv is Keras' conv1_conv kernel laid out (out, in, kh, kw)
    stem = report.entry("features.conv0.weight")
    assert stem.layout == "channels_last_kernel" and stem.source == "conv1_conv.weight"
    kernel = torch.as_tensor(keras_model.get_layer("conv1_conv").get_weights()[0])
    assert torch.equal(model.features.conv0.weight.detach(), channels_last_kernel(kernel))
    head = report.entry("classifier.weight")
    assert head.source == "predictions.weight" and head.layout == "dense_kernel"
    assert model.features.norm0.eps == pytest.approx(1.001e-5)  # Keras' epsilon and momentum, from the config
    assert model.features.norm0.momentum == pytest.approx(0.01)


def test_resnet50_conv_biases_move_into_the_norms(apps):
    """Keras' ResNet50 is ResNet v1: a bias on every conv before its BatchNorm, and the stride of each
    downsampling block on its first 1x1 conv. The biases move into the norms' running means
    (`bias_into_bn`), and the look-alike 1x1 convs of the first block (main path and shortcut, both 64 -> 256)
    are told apart by the config's data flow. torchvision's v1.5 strides the 3x3 conv instead, so the target
    is `keras_ports.resnet50_v1` (the stride moved back; the weights are the same)."""
    paths, expected, _ = apps["ResNet50"]
    model = kp.resnet50_v1()
    report = tg.transfer(paths["keras"], model, source_model=None, strict=True, input_shape=(1, 3, 64, 64))
    assert _max_diff(model, X, expected) < _tolerance(expected)
    moved = [e for e in report.entries if e.adapter == "bias_into_bn"]
    assert len(moved) == 53 and not report.unused_source
    assert report.entry("layer1.0.conv3.weight").source == "conv2_block1_3_conv.weight"
    assert report.entry("layer1.0.downsample.0.weight").source == "conv2_block1_0_conv.weight"
    assert report.entry("layer1.0.bn3.running_mean").source == ["conv2_block1_3_bn.running_mean",
                                                                 "conv2_block1_3_conv.bias"]
    # torchvision's own ResNet50 takes every tensor too, but strides elsewhere: its outputs are not Keras'
    plain = torchvision.models.resnet50(num_classes=kp.CLASSES)
    tg.transfer(paths["keras"], plain, source_model=None, input_shape=(1, 3, 64, 64))
    assert _max_diff(plain, X, expected) > 1.0


def test_mobilenet_v2_with_tensorflow_padding(apps):
    """Keras pads a stride-2 conv of an even-sized map by (0, 1) (TF `same`, `correct_pad`); PyTorch pads by 1
    on both sides. The weights place the same either way; with Keras' padding emulated in the target
    (`keras_ports.tf_padding`) the outputs are Keras'; without it they differ, and only the padding differs."""
    paths, expected, _ = apps["MobileNetV2"]
    for fmt in ("keras", "h5"):
        model = kp.mobilenet_v2_tf_padding()
        report = tg.transfer(paths[fmt], model, source_model=None, strict=True, input_shape=(1, 3, 64, 64))
        assert not report.unused_source
        assert _max_diff(model, X, expected) < _tolerance(expected)
        assert model.features[0][1].eps == 1e-3 and model.features[0][1].momentum == pytest.approx(0.001)
        assert report.entry("features.2.conv.1.0.weight").args is None  # a depthwise kernel, laid out only
        assert report.entry("features.2.conv.1.0.weight").layout == "channels_last_kernel"
    plain = torchvision.models.mobilenet_v2(num_classes=kp.CLASSES)
    tg.transfer(paths["keras"], plain, source_model=None, strict=True, input_shape=(1, 3, 64, 64))
    assert _max_diff(plain, X, expected) > 0.1


@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50"])
def test_a_weights_file_alone_places_nothing_by_position(apps, name):
    """A `.weights.h5` has no config: layers are named by the names Keras recorded, classes come from the
    paths (`conv2d_12` is a Conv2D), each class's order from Keras' counters, but how the classes interleave is
    a guess (`_file_order`). Its order is not trusted: only what names and shapes found once on each side
    prove is placed, each tensor where the `.keras` file puts it, and the report says what is missing and
    which file gives it. (By position alone, ResNet50's look-alike shortcut convs took wrong tensors.)"""
    paths, _, _ = apps[name]
    source = tg.load(paths["weights.h5"])
    assert source.format == "keras-weights" and source.metadata["order"].startswith("no config")
    assert not source.order_known and not source.module_attrs
    build = kp.mobilenet_v2_tf_padding if name == "MobileNetV2" else kp.resnet50_v1
    model = build()
    report = tg.transfer(source, model, source_model=None, input_shape=(1, 3, 64, 64))
    reference = build()
    tg.transfer(paths["keras"], reference, source_model=None, input_shape=(1, 3, 64, 64))
    placed = [e.target for e in report.entries if e.status != "new" and not e.target.endswith("num_batches_tracked")]
    assert placed, "names and unique shapes place some tensors"
    wrong = [t for t in placed if not torch.equal(model.state_dict()[t], reference.state_dict()[t])]
    assert wrong == []
    assert any("has no config" in n and ".keras file" in n for n in report.notes)


# ---- small hand-made models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_dense_after_a_channels_last_flatten(small, fmt):
    """Keras flattens (H, W, C); PyTorch (C, H, W): the Dense kernel's inputs are reordered
    (`flatten_channels_last`), from the config's shapes (.keras, .h5) or the conv before it (.weights.h5)."""
    paths, x, expected, keras_model = small
    model = kp.small_convnet()
    if fmt == "weights.h5":  # no config, so no epsilon: the model is given Keras' default for its norm
        model[1].eps = 1e-3
    report = tg.transfer(paths[fmt], model, source_model=None, strict=True)
    assert _max_diff(model, x, expected) < 1e-5
    fc = report.entry("4.weight")
    assert fc.source == "fc.weight" and fc.layout == "flatten_channels_last"
    kernel = torch.as_tensor(keras_model.get_layer("fc").get_weights()[0])
    shape = [6, 6, 4] if fmt != "weights.h5" else [36, 4]  # without a config: (H*W, C), the same permutation
    assert torch.equal(model[4].weight.detach(), flatten_channels_last(kernel, shape))
    assert torch.equal(flatten_channels_last(kernel, [6, 6, 4]), flatten_channels_last(kernel, [36, 4]))
    assert report.entry("0.bias").adapter is None  # the target conv has a bias: it takes Keras' own


@pytest.mark.parametrize("fmt", FORMATS)
def test_lstm_and_gru_into_torch_recurrent_layers(recurrent, fmt):
    """LSTM gates i,f,c,o are torch's i,f,g,o (kernels transposed; Keras' one bias in bias_ih, zeros in
    bias_hh); GRU z,r,h become torch's r,z,n, its two bias rows bias_ih and bias_hh (reset_after=True)."""
    paths, x, expected = recurrent
    model = kp.recurrent()
    report = tg.transfer(paths[fmt], model, source_model=None, strict=True)
    assert _max_diff(model, x, expected) < 1e-5
    assert report.entry("encoder.weight_ih_l0").source == "lstm.weight_ih_l0"
    assert report.entry("decoder.weight_hh_l0").layout == "gate_order"
    assert "gates reordered [1, 0, 2], transposed" in report.entry("decoder.weight_hh_l0").note
    assert torch.equal(model.encoder.bias_hh_l0.detach(), torch.zeros(24))


def test_other_conv_kinds_and_channels_first(tmp_path):
    """Depthwise (multiplier 2), separable (two PyTorch convs), transposed and 1-D kernels, in a channels_first
    model: Keras stores every kernel channels last whatever the data_format, and a Flatten of a channels-first
    map already flattens as PyTorch does (the Dense kernel is only transposed)."""
    from collections import OrderedDict

    k = kp.keras()
    k.utils.set_random_seed(3)
    cf = {"data_format": "channels_first"}
    image = k.Input((3, 8, 8))
    y = k.layers.Conv2D(4, 3, name="conv", **cf)(image)
    y = k.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw", **cf)(y)
    y = k.layers.SeparableConv2D(5, 3, name="sep", **cf)(y)
    y = k.layers.Conv2DTranspose(3, 3, name="up", **cf)(y)
    y = k.layers.Dense(2, name="fc")(k.layers.Flatten(name="flat")(y))
    keras_model = k.Model(image, y)
    for layer in keras_model.layers:  # random biases too
        layer.set_weights([w + 0.1 * torch.randn(w.shape).numpy() for w in layer.get_weights()])
    keras_model.save(tmp_path / "kinds.keras")
    port = torch.nn.Sequential(OrderedDict(
        conv=torch.nn.Conv2d(3, 4, 3), dw=torch.nn.Conv2d(4, 8, 3, groups=4),
        sep_dw=torch.nn.Conv2d(8, 8, 3, groups=8, bias=False), sep_pw=torch.nn.Conv2d(8, 5, 1),
        up=torch.nn.ConvTranspose2d(5, 3, 3), flat=torch.nn.Flatten(), fc=torch.nn.Linear(48, 2)))
    report = tg.transfer(tmp_path / "kinds.keras", port, source_model=None, strict=True)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = torch.as_tensor(k.ops.convert_to_numpy(keras_model(x, training=False)))
    assert _max_diff(port, x, expected) < 1e-5
    assert report.entry("sep_dw.weight").source == "sep.depthwise.weight"
    assert report.entry("up.weight").args is None and report.entry("up.weight").layout == "channels_last_kernel"
    assert report.entry("fc.weight").layout == "dense_kernel"

    seq = k.Sequential([k.Input((10, 3)), k.layers.Conv1D(4, 3, name="c1d"), k.layers.GlobalAveragePooling1D(),
                        k.layers.Dense(2, name="out")])
    seq.save(tmp_path / "c1d.keras")
    port1d = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(),
                                 torch.nn.Linear(4, 2))
    tg.transfer(tmp_path / "c1d.keras", port1d, source_model=None, strict=True)
    t = torch.rand(2, 3, 10, generator=torch.Generator().manual_seed(4))  # (N, C, T) for PyTorch
    expected = torch.as_tensor(k.ops.convert_to_numpy(seq(t.permute(0, 2, 1), training=False)))
    assert _max_diff(port1d, t, expected) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_nested_model(tmp_path, fmt):
    """A functional model used as a layer of a Sequential (a base network under a new head): its layers are
    named under it (`inner.c`), the Flatten after it reads its last layer's channels last."""
    k = kp.keras()
    k.utils.set_random_seed(5)
    image = k.Input((8, 8, 3))
    inner = k.Model(image, k.layers.BatchNormalization(name="b")(k.layers.Conv2D(4, 3, name="c")(image)),
                    name="inner")
    outer = k.Sequential([k.Input((8, 8, 3)), inner, k.layers.Flatten(name="f"), k.layers.Dense(2, name="d")])
    kp.calibrate_batchnorms(outer, seed=5)
    paths = _save(outer, tmp_path, "nested")
    port = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, eps=1e-3)),
                               torch.nn.Flatten(), torch.nn.Linear(144, 2))
    report = tg.transfer(paths[fmt], port, source_model=None, strict=True)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    assert _max_diff(port, x, _keras_output(outer, x)) < 1e-5
    prefix = "" if fmt == "weights.h5" else "inner."  # a weights file records the layer names only
    assert report.entry("0.1.running_var").source == f"{prefix}b.running_var"
    assert report.entry("2.weight").layout == "flatten_channels_last"


@pytest.mark.parametrize("fmt", FORMATS)
def test_bidirectional_layers(tmp_path, fmt):
    """A Bidirectional LSTM/GRU is one bidirectional nn.LSTM/nn.GRU: the backward layer takes the `_reverse`
    tensors; Keras concatenates the directions as PyTorch does."""
    import numpy as np

    k = kp.keras()
    k.utils.set_random_seed(6)
    model = k.Sequential([k.Input((5, 4)), k.layers.Bidirectional(k.layers.LSTM(3, return_sequences=True), name="bl"),
                          k.layers.Bidirectional(k.layers.GRU(2, return_sequences=True), name="bg")])
    rng = np.random.default_rng(6)
    for layer in model.layers:
        layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    paths = _save(model, tmp_path, "bi")

    class Port(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 3, batch_first=True, bidirectional=True)
            self.gru = torch.nn.GRU(6, 2, batch_first=True, bidirectional=True)

        def forward(self, x):
            return self.gru(self.lstm(x)[0])[0]

    port = Port()
    report = tg.transfer(paths[fmt], port, source_model=None, strict=True)
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(6))
    assert _max_diff(port, x, _keras_output(model, x)) < 1e-5
    assert report.entry("gru.weight_hh_l0_reverse").source == "bg.weight_hh_l0_reverse"


def test_embedding_and_layer_norm(tmp_path):
    """Embedding -> weight; LayerNormalization gamma/beta -> weight/bias with Keras' epsilon (1e-3) carried."""
    import numpy as np

    k = kp.keras()
    k.utils.set_random_seed(7)
    model = k.Sequential([k.Input((6,), dtype="int32"), k.layers.Embedding(20, 8, name="tok"),
                          k.layers.LayerNormalization(name="norm"), k.layers.Dense(3, name="head")])
    rng = np.random.default_rng(7)
    for layer in model.layers:
        layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    model.save(tmp_path / "text.keras")
    port = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    report = tg.transfer(tmp_path / "text.keras", port, source_model=None, strict=True)
    assert port[1].eps == 1e-3 and report.entry("1.weight").source == "norm.weight"
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(7))
    expected = torch.as_tensor(k.ops.convert_to_numpy(model(ids, training=False)))
    assert _max_diff(port, ids, expected) < 1e-5


def test_gru_reset_before_is_refused(tmp_path):
    model = kp.keras_recurrent(reset_after=False)
    model.save(tmp_path / "gru.keras")
    with pytest.raises(CheckpointError, match="reset_after=False, which has no PyTorch equivalent"):
        tg.load(tmp_path / "gru.keras")


# ---- running the source in Keras ------------------------------------------------------------------------------


def test_the_keras_runner_gives_keras_outputs_in_pytorch_layout(small):
    paths, x, expected, _ = small
    runner = KerasRunner(paths["keras"])
    with torch.no_grad():
        assert torch.allclose(runner(x), expected, atol=1e-6)
    (example,) = runner.example_input()
    assert example.shape == (2, 3, 8, 8)


def test_a_keras_already_on_another_backend_is_one_line(monkeypatch, small):
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(CheckpointError, match="^keras was already imported with the jax backend; .*KERAS_BACKEND"):
        KerasRunner(small[0]["keras"])


# ---- the command line -----------------------------------------------------------------------------------------


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_inspects_diffs_and_transfers_with_verify(capsys, small, tmp_path):
    paths, x, expected, _ = small
    code, out, _ = run(capsys, "inspect", str(paths["keras"]), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["format"] == "keras" and shown["num_tensors"] == 8
    assert shown["tensors"][0]["key"] == "conv.weight" and shown["tensors"][0]["shape"] == [4, 3, 3, 3]

    code, out, _ = run(capsys, "diff", str(paths["keras"]), str(paths["h5"]), "--json")
    diff = json.loads(out)
    assert code == 0 and diff["num_common"] == 8 and not diff["only_in_a"] and not diff["shape_mismatch"]

    for fmt in ("keras", "h5"):  # both hold the config: Keras builds and runs the model to verify
        out_file, report = tmp_path / f"small_{fmt}.safetensors", tmp_path / f"report_{fmt}.json"
        code, _, err = run(capsys, "transfer", str(paths[fmt]), "--model", f"{PORTS}:small_convnet", "--out",
                           str(out_file), "--report", str(report), "--verify")
        assert code == 0, err
        data = json.loads(report.read_text())
        assert data["verified"] is True and data["summary"]["unused_source"] == 0
        assert "eps 1e-05 -> 0.001 from bn" in next(e["note"] for e in data["entries"] if e["target"] == "1.weight")
        model = kp.small_convnet()
        model.load_state_dict(load_file(out_file))
        model[1].eps = 1e-3  # a state dict holds no epsilon: the report says it, the model must be given it
        assert _max_diff(model, x, expected) < 1e-5


def test_cli_verifies_an_application(capsys, apps, tmp_path):
    """`--verify` builds the Keras model from the file and runs it (at its 64x64 input) against the target."""
    paths, expected, _ = apps["MobileNetV2"]
    out_file, report = tmp_path / "mobilenet.safetensors", tmp_path / "report.json"
    code, _, err = run(capsys, "transfer", str(paths["keras"]), "--model", f"{PORTS}:mobilenet_v2_tf_padding",
                       "--input-shape", "1,3,64,64", "--out", str(out_file), "--report", str(report), "--verify")
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["verified"] is True and data["summary"]["unused_source"] == 0
    model = kp.mobilenet_v2_tf_padding()
    model.load_state_dict(load_file(out_file))
    for m in model.modules():  # Keras' epsilon, which the report says and a state dict cannot hold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-3
    assert _max_diff(model, X, expected) < _tolerance(expected)
    # torchvision's own padding: every tensor placed, the outputs not Keras' -- and --verify says so
    code, _, err = run(capsys, "transfer", str(paths["keras"]), "--model", "torchvision:mobilenet_v2",
                       "--model-kwargs", '{"num_classes": 10}', "--input-shape", "1,3,64,64",
                       "--out", str(tmp_path / "plain.safetensors"), "--verify")
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "plain.safetensors").exists()


def _truncated_keras(path: Path, out: Path) -> Path:
    whole = path.read_bytes()
    out.write_bytes(whole[: len(whole) // 2])
    return out


def _corrupt_h5(path: Path, out: Path) -> Path:
    whole = bytearray(path.read_bytes())
    whole[8:4096] = bytes(4088)  # the superblock and the first object headers zeroed, the signature kept
    out.write_bytes(bytes(whole))
    return out


def _reset_before(_: Path, out: Path) -> Path:
    kp.keras_recurrent(reset_after=False).save(out)
    return out


def _no_weights(path: Path, out: Path) -> Path:
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        dst.writestr("config.json", src.read("config.json"))
    return out


@pytest.mark.parametrize("make, name, said", [
    (_truncated_keras, "bad.keras", "not a readable .keras archive"),
    (_corrupt_h5, "bad.h5", "not a readable HDF5 file"),
    (_reset_before, "gru.keras", "reset_after=False, which has no PyTorch equivalent"),
    (_no_weights, "empty.keras", "a zip without config.json and model.weights.h5"),
])
def test_bad_keras_files_are_one_error_line_and_nothing_written(capsys, small, tmp_path, make, name, said):
    source = small[0]["keras"] if name.endswith(".keras") else small[0]["h5"]
    bad = make(source, tmp_path / name)
    out_file = tmp_path / "out.safetensors"
    for argv in (["inspect", str(bad)],
                 ["transfer", str(bad), "--model", f"{PORTS}:small_convnet", "--out", str(out_file)]):
        code, _, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert said in lines[0] and str(bad) in lines[0]
    assert not out_file.exists()


def test_missing_h5py_names_the_extra(monkeypatch, small):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(CheckpointError, match=r"needs h5py, which is not installed.*pip install 'torchgraft\[h5\]'"):
        tg.load(small[0]["h5"])
