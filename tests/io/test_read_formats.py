"""`torchgraft.load` reads every checkpoint format people have, from real models and real files.

Every case checks names, shapes and values against the model or `torch.load` that wrote or reads the file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision

import torchgraft
from torchgraft import CheckpointError, IntegrityError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ---- helpers and shared real models ------------------------------------------------------------------------


def class_path(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def assert_same_tensors(source: torchgraft.Source, expected: dict[str, torch.Tensor], *, ordered: bool = True) -> None:
    if ordered:
        assert source.keys() == list(expected)
    else:
        assert sorted(source.keys()) == sorted(expected)
    for name, tensor in expected.items():
        info = source.info[name]
        assert info.shape == tuple(tensor.shape), name
        assert info.dtype == str(tensor.dtype).removeprefix("torch."), name
        got = source[name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


@pytest.fixture(scope="module")
def resnet10t() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t").eval()


@pytest.fixture(scope="module")
def resnet10t_sd(resnet10t) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in resnet10t.state_dict().items()}


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def small_zip(tmp_path_factory, resnet10t_sd) -> Path:
    path = tmp_path_factory.mktemp("small") / "resnet10t.pth"
    torch.save(resnet10t_sd, path)
    return path


# ---- the real torchvision file -----------------------------------------------------------------------------


def test_real_mobilenet_v2_file(mobilenet_v2_path):
    source = torchgraft.load(mobilenet_v2_path)
    model = torchvision.models.mobilenet_v2()
    expected = model.state_dict()

    assert source.format == "torch-legacy"
    assert source.wrapper is None and source.modules is None
    assert source.path == str(mobilenet_v2_path)
    assert len(source) == 314
    # torchvision's own key order, names and shapes
    assert source.keys() == list(expected)
    assert {k: i.shape for k, i in source.info.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    params = dict(model.named_parameters())
    assert sum(source.info[k].numel for k in params) == 3_504_872
    buffers = [k for k in source.keys() if k not in params]
    assert len(buffers) == 3 * 52  # running_mean, running_var, num_batches_tracked of 52 BatchNorm2d
    assert source.num_params == 3_504_872 + sum(source.info[k].numel for k in buffers)
    assert {source.info[k].dtype for k in buffers if k.endswith("num_batches_tracked")} == {"int64"}
    # values: exactly what torch.load(weights_only=True) reads
    reference = torch.load(mobilenet_v2_path, map_location="cpu", weights_only=True)
    assert_same_tensors(source, reference)
    # the torch.hub name carries the sha256 prefix, and the real file matches it (verify_hash ran)
    assert hashlib.sha256(Path(mobilenet_v2_path).read_bytes()).hexdigest().startswith("b0353104")


# ---- state_dicts in every container format -----------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_state_dict(tmp_path, resnet10t_sd, legacy):
    path = tmp_path / "weights.pth"
    torch.save(resnet10t_sd, path, _use_new_zipfile_serialization=not legacy)
    source = torchgraft.load(path)
    assert source.format == ("torch-legacy" if legacy else "torch-zip")
    assert source.wrapper is None
    assert_same_tensors(source, resnet10t_sd)
    assert source.state_dict().keys() == resnet10t_sd.keys()


def test_safetensors_single_file(tmp_path, resnet10t_sd):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(resnet10t_sd, path, metadata={"format": "pt", "arch": "resnet10t"})
    source = torchgraft.load(path)
    assert source.format == "safetensors"
    assert source.metadata["safetensors"] == {"format": "pt", "arch": "resnet10t"}
    assert_same_tensors(source, resnet10t_sd, ordered=False)


def _write_safetensors_shards(folder: Path, state: dict[str, torch.Tensor], n: int) -> Path:
    keys = list(state)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: state[k] for k in keys[i::n]}
        safetensors.torch.save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def test_safetensors_shards_with_index(tmp_path, resnet10t_sd):
    index = _write_safetensors_shards(tmp_path, resnet10t_sd, 3)
    source = torchgraft.load(index)
    assert source.format == "safetensors-sharded"
    assert source.metadata["shards"] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert source.metadata["index"]["total_size"] == sum(v.numel() * v.element_size() for v in resnet10t_sd.values())
    assert_same_tensors(source, resnet10t_sd, ordered=False)
    # the shards' tensors come from three different files
    assert len({source.tensors._files[k] for k in source.keys()}) == 3  # type: ignore[attr-defined]


def test_hf_folder_with_safetensors_shards(tmp_path, resnet10t_sd):
    _write_safetensors_shards(tmp_path, resnet10t_sd, 2)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet10t", "num_classes": 1000}))
    source = torchgraft.load(tmp_path)
    assert source.format == "safetensors-sharded"
    assert source.metadata["config"] == {"architecture": "resnet10t", "num_classes": 1000}
    assert source.metadata["folder"] == str(tmp_path)
    assert_same_tensors(source, resnet10t_sd, ordered=False)


def test_hf_folder_minilm(minilm_dir):
    import transformers

    source = torchgraft.load(minilm_dir)
    assert source.format == "safetensors"
    assert source.path == str(minilm_dir / "model.safetensors")
    assert source.metadata["folder"] == str(minilm_dir)
    config = source.metadata["config"]
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6

    with torch.device("meta"):  # shapes only: no need to initialise 22M parameters
        model = transformers.BertModel(transformers.BertConfig.from_pretrained(str(minilm_dir)))
    expected = model.state_dict()
    # the file also keeps the position_ids buffer that newer transformers no longer persist
    assert set(source.keys()) == set(expected) | {"embeddings.position_ids"}
    for name, tensor in expected.items():
        assert source.info[name].shape == tuple(tensor.shape), name
    assert source.info["embeddings.word_embeddings.weight"].shape == (30522, 384)
    reference = safetensors.torch.load_file(minilm_dir / "model.safetensors")
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.bias", "pooler.dense.weight"):
        assert torch.equal(source[name], reference[name])


def test_hf_folder_with_single_pytorch_model_bin(tmp_path, resnet10t_sd):
    torch.save(resnet10t_sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{not json")
    source = torchgraft.load(tmp_path)
    assert source.format == "torch-zip"
    assert source.metadata["config_error"] == "config.json is not valid JSON"
    assert_same_tensors(source, resnet10t_sd)


@pytest.mark.parametrize("via", ["index", "folder"])
def test_pytorch_model_bin_shards(tmp_path, resnet10t_sd, via):
    keys = list(resnet10t_sd)
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for name, part in zip(names, halves):
        torch.save({k: resnet10t_sd[k] for k in part}, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    source = torchgraft.load(index if via == "index" else tmp_path)
    assert source.format == "torch-sharded"
    assert source.metadata["shards"] == names
    assert_same_tensors(source, resnet10t_sd)


# ---- training checkpoints and wrapper prefixes -------------------------------------------------------------


def _optimizer_state(model: torch.nn.Module) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    opt.zero_grad()
    return opt.state_dict()


@pytest.fixture(scope="module")
def optimizer_state() -> dict:
    torch.manual_seed(0)
    return _optimizer_state(timm.create_model("resnet10t", num_classes=4))


@pytest.mark.parametrize("wrap_key", ["state_dict", "model", "model_state_dict", "module", "ema"])
def test_training_checkpoint_unwraps(tmp_path, resnet10t_sd, optimizer_state, wrap_key):
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 7, "best_acc": 0.75, wrap_key: resnet10t_sd, "optimizer": optimizer_state}, path)
    source = torchgraft.load(path)
    assert source.wrapper == f"[{wrap_key!r}]"
    assert_same_tensors(source, resnet10t_sd)
    checkpoint = source.metadata["checkpoint"]
    assert checkpoint["epoch"] == 7 and checkpoint["best_acc"] == 0.75
    assert checkpoint["optimizer"] == "<dict of 2>"
    assert wrap_key not in checkpoint


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_ema_weights_picked_with_key(tmp_path, resnet10t_sd, legacy):
    ema = {k: (v * 0.5 if v.is_floating_point() else v + 1) for k, v in resnet10t_sd.items()}
    path = tmp_path / "ema.pth"
    torch.save({"state_dict": resnet10t_sd, "ema": ema, "step": 100}, path, _use_new_zipfile_serialization=not legacy)

    default = torchgraft.load(path)
    assert default.wrapper == "['state_dict']"
    assert default.metadata["other_weights"] == ["ema"]
    assert_same_tensors(default, resnet10t_sd)

    picked = torchgraft.load(path, key="ema")
    assert picked.wrapper == "['ema']"
    assert picked.metadata["checkpoint"]["step"] == 100
    assert_same_tensors(picked, ema)

    with pytest.raises(CheckpointError, match=r"ema\.pth: no entry 'model_ema'; the checkpoint has \['ema', "):
        torchgraft.load(path, key="model_ema")


def test_lightning_checkpoint(tmp_path, resnet10t_sd, optimizer_state):
    path = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": resnet10t_sd,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.25)}},
            "optimizer_states": [optimizer_state],
            "lr_schedulers": [{"last_epoch": 3, "_step_count": 4}],
            "hyper_parameters": {"lr": 0.1, "arch": "resnet10t"},
        },
        path,
    )
    source = torchgraft.load(path)
    assert source.format == "torch-zip"
    assert source.wrapper == "lightning > ['state_dict']"
    assert source.metadata["lightning_version"] == "2.4.0"
    checkpoint = source.metadata["checkpoint"]
    assert checkpoint["epoch"] == 3 and checkpoint["global_step"] == 120
    assert checkpoint["optimizer_states"] == "<list of 1>"
    assert checkpoint["hyper_parameters"] == "<dict of 2>"
    assert_same_tensors(source, resnet10t_sd)


@pytest.mark.parametrize("wrapping", ["ddp", "compile", "ddp+compile"])
@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "safetensors"])
def test_wrapper_prefixes_are_stripped(tmp_path, wrapping, fmt):
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_050")
    expected = model.state_dict()
    wrapped = {
        "ddp": lambda: torch.nn.DataParallel(model),  # the same `module.` prefix as DistributedDataParallel
        "compile": lambda: torch.compile(model),
        "ddp+compile": lambda: torch.nn.DataParallel(torch.compile(model)),
    }[wrapping]()
    state = wrapped.state_dict()
    prefix = {"ddp": "module.", "compile": "_orig_mod.", "ddp+compile": "module._orig_mod."}[wrapping]
    assert all(k.startswith(prefix) for k in state)  # the real wrappers really add the prefix

    if fmt == "safetensors":
        path = tmp_path / "wrapped.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        path = tmp_path / "wrapped.pth"
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "torch-zip")
    source = torchgraft.load(path)
    assert source.format == fmt
    assert source.wrapper == {"ddp": "module.", "compile": "_orig_mod.", "ddp+compile": "module. > _orig_mod."}[wrapping]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in source.keys())
    assert_same_tensors(source, expected, ordered=fmt != "safetensors")


def test_prefix_kept_when_not_on_every_key(tmp_path, resnet10t_sd):
    state = {**{f"module.{k}": v for k, v in resnet10t_sd.items()}, "head.weight": torch.zeros(2)}
    torch.save(state, tmp_path / "mixed.pth")
    source = torchgraft.load(tmp_path / "mixed.pth")
    assert source.wrapper is None
    assert source.keys() == list(state)


def test_checkpoint_of_ddp_state_dict(tmp_path, resnet10t_sd):
    state = {f"module.{k}": v for k, v in resnet10t_sd.items()}
    torch.save({"model": state, "epoch": 1}, tmp_path / "ddp.pth")
    source = torchgraft.load(tmp_path / "ddp.pth")
    assert source.wrapper == "['model'] > module."
    assert_same_tensors(source, resnet10t_sd)


# ---- whole-model pickles and TorchScript -------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("arch", ["torchvision:resnet18", "timm:mobilenetv2_050"])
def test_whole_model_pickle(tmp_path, resnet18, arch, legacy):
    if arch == "torchvision:resnet18":
        model, root = resnet18, "torchvision.models.resnet.ResNet"
    else:
        torch.manual_seed(0)
        model, root = timm.create_model("mobilenetv2_050"), "timm.models.efficientnet.EfficientNet"
    path = tmp_path / "model.pth"
    torch.save(model, path, _use_new_zipfile_serialization=not legacy)
    source = torchgraft.load(path)
    assert source.format == ("torch-legacy" if legacy else "torch-zip")
    assert source.wrapper == f"whole model <{root}>"
    assert_same_tensors(source, model.state_dict())
    assert source.modules == {name: class_path(m) for name, m in model.named_modules()}
    assert source.modules[""] == root


def test_whole_model_of_data_parallel(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t")
    torch.save(torch.nn.DataParallel(model), tmp_path / "dp.pth")
    source = torchgraft.load(tmp_path / "dp.pth")
    assert source.wrapper == "whole model <torch.nn.parallel.data_parallel.DataParallel> > module."
    assert_same_tensors(source, model.state_dict())
    assert source.modules == {name: class_path(m) for name, m in model.named_modules()}


_THROWAWAY = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.gate = nn.Parameter(torch.full((c,), 0.5))
        self.register_buffer("scratch", torch.ones(c), persistent=False)

    def forward(self, x):
        return x + self.bn(self.conv(x)) * self.gate.view(1, -1, 1, 1)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 5)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]))
        self.note = "a plain attribute"

    def forward(self, x):
        return self.head(self.blocks(self.stem(x - self.mean.view(1, 3, 1, 1))).mean((2, 3)))
'''


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_whole_model_of_a_class_that_no_longer_exists(tmp_path, throwaway, legacy):
    module = throwaway.load(f"tg_throwaway_{'legacy' if legacy else 'zip'}", _THROWAWAY)
    name = module.__name__
    torch.manual_seed(0)
    model = module.TinyNet()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: class_path(m) for n, m in model.named_modules()}
    path = tmp_path / "tiny.pth"
    torch.save(model, path, _use_new_zipfile_serialization=not legacy)
    throwaway.forget()
    with pytest.raises(ModuleNotFoundError):  # the class really cannot be imported any more
        importlib.import_module(name)

    source = torchgraft.load(path)
    assert source.wrapper == f"whole model <{name}.TinyNet>"
    assert "scratch" not in " ".join(source.keys())  # non-persistent buffers are not state
    assert_same_tensors(source, expected)
    assert source.modules == classes
    assert source.modules["blocks.1"] == f"{name}.Block"
    assert name not in sys.modules  # reading it imported nothing


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive(tmp_path, resnet18):
    path = tmp_path / "scripted.pt"
    torch.jit.script(resnet18).save(str(path))
    source = torchgraft.load(path)
    assert source.format == "torchscript"
    assert source.metadata["torchscript"] is True
    assert source.wrapper == "scripted <torchvision.models.resnet.ResNet>"
    assert_same_tensors(source, resnet18.state_dict())
    # the same classes as the eager model: TorchScript's `___torch_mangle_N` parts are not part of the name
    assert source.modules == {name: class_path(m) for name, m in resnet18.named_modules()}
    assert source.modules["layer2.0.downsample.0"] == "torch.nn.modules.conv.Conv2d"


# ---- torch.hub hash names and seed 003 ---------------------------------------------------------------------


def test_hub_hash_in_name(tmp_path, small_zip):
    digest = hashlib.sha256(small_zip.read_bytes()).hexdigest()
    good = tmp_path / f"resnet10t-{digest[:8]}.pth"
    shutil.copy(small_zip, good)
    assert len(torchgraft.load(good)) == len(torch.load(small_zip, weights_only=True))

    wrong_prefix = ("0" if digest[0] != "0" else "1") + digest[1:8]
    bad = tmp_path / f"resnet10t-{wrong_prefix}.pth"
    shutil.copy(small_zip, bad)
    with pytest.raises(IntegrityError, match=rf"resnet10t-{wrong_prefix}\.pth: sha256 starts {digest[:8]}, but the "
                                             rf"name promises {wrong_prefix}"):
        torchgraft.load(bad)
    assert torchgraft.load(bad, verify_hash=False).keys() == torchgraft.load(good).keys()

    dated = tmp_path / "resnet10t-20240131.pth"  # all digits: a date, not a hash
    shutil.copy(small_zip, dated)
    assert len(torchgraft.load(dated)) == len(torchgraft.load(good))


def test_seed003_legacy_resnet18_without_num_batches_tracked(tmp_path, resnet18):
    state = {k: v for k, v in resnet18.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 102
    path = tmp_path / "resnet18-old.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    source = torchgraft.load(path)
    assert source.format == "torch-legacy"
    assert len(source) == 102
    assert not any("num_batches_tracked" in k for k in source.keys())
    assert_same_tensors(source, state)


def test_checkpoint_entries_are_summarised(tmp_path, resnet10t_sd):
    path = tmp_path / "ckpt.pth"
    torch.save({
        "state_dict": resnet10t_sd,
        "epoch": 2,
        "best": torch.tensor(0.5),
        "loss_curve": torch.zeros(10),
        "shapes_only": torch.empty(1, device="meta"),
        "args": ["--lr", "0.1"],
        "note": None,
    }, path)
    source = torchgraft.load(path)
    assert source.metadata["checkpoint"] == {"epoch": 2, "best": 0.5, "loss_curve": "tensor[10]",
                                             "shapes_only": "tensor[1]", "args": "<list of 2>", "note": None}
    assert_same_tensors(source, resnet10t_sd)


def test_chosen_entry_with_non_tensor_and_non_string_keys(tmp_path):
    path = tmp_path / "mixed.pth"
    weights = {"conv.weight": torch.ones(2, 2), 0: torch.zeros(1), "step": 5}
    torch.save({"weights_and_more": weights, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"mixed\.pth: found a dict with keys \['epoch', 'weights_and_more'\] "
                                              r"but no weights"):
        torchgraft.load(path)
    source = torchgraft.load(path, key="weights_and_more")
    assert source.keys() == ["conv.weight"]
    assert source.metadata["non_tensor_entries"] == ["0", "step"]
    assert torch.equal(source["conv.weight"], torch.ones(2, 2))
