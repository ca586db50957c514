"""The low-memory path: meta-device targets get the source tensors themselves and initialise only what stays new;
dtype policy; progress."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import torchgraft
from torchgraft.match.plan import plan
from torchgraft.transfer import apply, meta_blockers, parameters_on_meta, transfer


class Net(nn.Module):
    def __init__(self, classes: int = 5, vocab: int = 20) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.norm = nn.BatchNorm1d(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = self.norm(self.conv(x.transpose(1, 2))).transpose(1, 2)
        x = self.ln(x + self.attn(x, x, x)[0])
        return self.head(x.mean(1))


def trained(classes: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = Net(classes)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t))  # values no initialiser would give
        net.norm.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in net.state_dict().items()}


def on_meta(**kwargs) -> Net:
    with torch.device("meta"):
        return Net(**kwargs)


def test_meta_target_gets_every_loaded_tensor_from_the_map_and_initialises_the_new_head(tmp_path):
    state = trained(classes=5)
    safetensors.torch.save_file(state, tmp_path / "net.safetensors")
    source = torchgraft.load(tmp_path / "net.safetensors")
    model = on_meta(classes=3)
    report = transfer(source, model)
    assert {e.target for e in report.by_status("new")} == {"head.weight", "head.bias"}
    after = model.state_dict()
    assert not any(t.is_meta for t in [*after.values(), *model.buffers()])
    for e in report.by_status("loaded"):
        assert torch.equal(after[e.target], state[e.source]), e.target
        assert after[e.target].data_ptr() == source[e.source].data_ptr(), e.target  # the map itself, no copy
    assert after["norm.num_batches_tracked"].item() == 7
    head = model.head
    assert torch.isfinite(head.weight).all() and head.weight.abs().sum() > 0 and head.bias.abs().sum() > 0
    assert isinstance(head.weight, nn.Parameter) and head.weight.requires_grad
    assert all(p.requires_grad for p in model.parameters())
    out = model.eval()(torch.randint(0, 20, (2, 6)))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    model.train()(torch.randint(0, 20, (2, 6))).sum().backward()  # trainable, and the file is untouched
    assert torch.equal(safetensors.torch.load_file(tmp_path / "net.safetensors")["emb.weight"], state["emb.weight"])


def test_partly_loaded_modules_keep_their_loaded_values(tmp_path):
    state = trained()
    del state["head.bias"], state["norm.running_var"], state["attn.in_proj_bias"]
    torch.save(state, tmp_path / "partial.pth")
    source = torchgraft.load(tmp_path / "partial.pth")
    model = on_meta()
    report = transfer(source, model)
    assert {e.target for e in report.by_status("new")} == {"head.bias", "norm.running_var", "attn.in_proj_bias"}
    after = model.state_dict()
    for key in ("head.weight", "norm.weight", "norm.running_mean", "attn.in_proj_weight", "attn.out_proj.bias"):
        assert torch.equal(after[key], state[key]), key  # not overwritten by the module's reset_parameters
    assert torch.equal(after["norm.running_var"], torch.ones(16))  # BatchNorm's own initial values
    assert torch.equal(after["attn.in_proj_bias"], torch.zeros(48))  # MultiheadAttention's
    bound = 1 / 16 ** 0.5
    assert after["head.bias"].abs().max() <= bound and after["head.bias"].abs().sum() > 0  # Linear's
    # a torch zip file is memory-mapped too: loaded tensors are its tensors
    assert after["head.weight"].data_ptr() == source["head.weight"].data_ptr()


def test_adapters_that_build_on_the_initial_rows_work_on_meta(tmp_path):
    state = trained()
    source = torchgraft.Source("mem", "test", state, {k: torchgraft.io.read.TensorInfo(tuple(v.shape), str(
        v.dtype).removeprefix("torch.")) for k, v in state.items()})
    model = on_meta(vocab=24)
    report = transfer(source, model)
    assert report.entry("emb.weight").adapter == "embedding_resize"
    weight = model.emb.weight
    assert torch.equal(weight[:20], state["emb.weight"]) and torch.isfinite(weight[20:]).all()


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    torch.manual_seed(1)
    state = {"emb.weight": torch.randn(10, 4)}  # as safetensors stores a tied pair: once
    source = torchgraft.Source("mem", "test", state, {"emb.weight": torchgraft.io.read.TensorInfo((10, 4),
                                                                                                   "float32")})
    with torch.device("meta"):
        model = Tied()
    report = transfer(source, model)
    assert report.entry("out.weight").status == "new"
    assert model.out.weight is model.emb.weight and torch.equal(model.emb.weight, state["emb.weight"])


def test_untied_targets_of_one_stored_tensor_get_their_own_memory(tmp_path):
    shared = torch.randn(4, 4)
    torch.save({"a.weight": shared, "b.weight": shared}, tmp_path / "shared.pth")  # one storage in the file
    with torch.device("meta"):
        model = nn.ModuleDict({"a": nn.Linear(4, 4, bias=False), "b": nn.Linear(4, 4, bias=False)})
    transfer(tmp_path / "shared.pth", model)
    assert torch.equal(model.a.weight, shared) and torch.equal(model.b.weight, shared)
    with torch.no_grad():
        model.a.weight.add_(1)
    assert torch.equal(model.b.weight, shared)


def test_what_the_meta_path_cannot_fill_is_said():
    class Custom(nn.Module):  # no reset_parameters, and a buffer computed when it is built
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.custom = Custom()

    state = {k: v for k, v in Model().state_dict().items() if k.startswith("fc.")}
    source = torchgraft.Source("mem", "test", state, {k: torchgraft.io.read.TensorInfo(tuple(v.shape), "float32")
                                                      for k, v in state.items()})
    with torch.device("meta"):
        model = Model()
    decided = plan(source, model)
    assert meta_blockers(model, decided) == [
        "custom.scale stays new and its module Custom has no reset_parameters to initialise it",
        "custom.table is a non-persistent buffer, computed when the model is built"]
    report = apply(decided, source, model)
    assert "left at zero: Custom has no reset_parameters" in report.entry("custom.scale").note
    assert torch.equal(model.custom.scale, torch.zeros(3))
    assert report.warnings == [
        "1 tensors stay on the meta device (custom.table): they are not in the state_dict (non-persistent "
        "buffers the model computes when it is built), so no checkpoint can fill them. Build the model on the "
        "CPU instead of the meta device."]
    assert meta_blockers(Model(), decided) == []  # built normally, nothing is in the way


# ---- dtype policy and progress ------------------------------------------------------------------------------


def test_loaded_tensors_take_the_target_dtype_and_say_so(tmp_path):
    state = {k: v.half() if v.is_floating_point() else v for k, v in trained().items()}
    safetensors.torch.save_file(state, tmp_path / "half.safetensors")
    model = on_meta(classes=3)
    report = transfer(tmp_path / "half.safetensors", model)
    assert model.emb.weight.dtype == torch.float32
    assert torch.equal(model.emb.weight, state["emb.weight"].float())
    assert report.entry("emb.weight").note == "cast float16 -> float32"
    assert report.entry("norm.num_batches_tracked").note == ""  # int64 both sides
    assert "cast" not in report.entry("head.weight").note  # new: nothing was cast


def test_a_named_dtype_casts_every_floating_tensor(tmp_path):
    state = trained()
    state["emb.weight"] = state["emb.weight"].half()
    safetensors.torch.save_file(state, tmp_path / "mixed.safetensors")
    for meta in (True, False):
        model = on_meta(classes=3) if meta else Net(classes=3)
        report = transfer(tmp_path / "mixed.safetensors", model, dtype="bfloat16")
        after = model.state_dict()
        assert {k: v.dtype for k, v in after.items() if v.dtype != torch.bfloat16} == {
            "norm.num_batches_tracked": torch.int64}
        assert report.entry("emb.weight").note == "cast float16 -> bfloat16"
        assert report.entry("conv.weight").note == "cast float32 -> bfloat16"
        assert report.entry("head.weight").note.endswith("; cast float32 -> bfloat16")  # new, noted too
        assert torch.equal(after["conv.weight"], state["conv.weight"].bfloat16())
    model = Net()
    report = transfer(tmp_path / "mixed.safetensors", model, dtype=torch.float32)
    assert model.emb.weight.dtype == torch.float32 and report.entry("conv.weight").note == ""
    with pytest.raises(torchgraft.GraftError, match=r"dtype 'int8' is not supported; expected one of float32, "
                                                    r"float16, bfloat16"):
        transfer(tmp_path / "mixed.safetensors", Net(), dtype="int8")


def test_progress_reaches_the_total(tmp_path):
    state = trained()
    safetensors.torch.save_file(state, tmp_path / "net.safetensors")
    for model in (on_meta(classes=3), Net(classes=3)):
        calls: list[tuple[int, int]] = []
        report = transfer(tmp_path / "net.safetensors", model, progress=lambda d, t: calls.append((d, t)))
        total = sum(model.state_dict()[e.target].numel() * model.state_dict()[e.target].element_size()
                    for e in report.entries if e.status != "new")
        assert calls[-1] == (total, total) and len(calls) == len(report.entries) - 2
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_split_and_merge_rules_on_meta(tmp_path):
    g = torch.Generator().manual_seed(2)
    state = {"qkv.weight": torch.randn(12, 4, generator=g), "wide.weight": torch.randn(4, 8, generator=g),
             "a.weight": torch.randn(2, 4, generator=g), "b.weight": torch.randn(3, 4, generator=g)}
    safetensors.torch.save_file(state, tmp_path / "fused.safetensors")
    with torch.device("meta"):
        model = nn.ModuleDict({n: nn.Linear(4, 4, bias=False) for n in "qkvlr"})
        model["ab"] = nn.Linear(4, 5, bias=False)
    rules = {"split": [{"source": "qkv.weight", "dim": 0, "targets": ["q.weight", "k.weight", "v.weight"]},
                       {"source": "wide.weight", "dim": 1, "targets": ["l.weight", "r.weight"]}],
             "merge": [{"target": "ab.weight", "dim": 0, "sources": ["a.weight", "b.weight"]}]}
    transfer(tmp_path / "fused.safetensors", model, rules=rules, strict=True)
    assert torch.equal(model["k"].weight, state["qkv.weight"][4:8])
    assert torch.equal(model["r"].weight, state["wide.weight"][:, 4:]) and model["r"].weight.is_contiguous()
    assert torch.equal(model["ab"].weight, torch.cat([state["a.weight"], state["b.weight"]]))


def test_a_reset_that_reads_loaded_tensors_gets_the_whole_module():
    class Derived(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.empty(3, 2))
            self.b = nn.Parameter(torch.empty(2))
            self.reset_parameters()

        def reset_parameters(self) -> None:
            with torch.no_grad():
                self.a.fill_(1.0)
                self.b.copy_(self.a.mean(0))  # fails while `a` is on the meta device and `b` is not

    state = {"a": torch.full((3, 2), 4.0)}
    source = torchgraft.Source("mem", "test", state, {"a": torchgraft.io.read.TensorInfo((3, 2), "float32")})
    with torch.device("meta"):
        model = Derived()
    report = transfer(source, model)
    assert report.entry("b").status == "new"
    assert torch.equal(model.a, state["a"])
    assert torch.equal(model.b, torch.ones(2))  # reset ran again with the whole module on the CPU


def test_parameters_on_meta_keeps_buffers_real_and_is_undone(tmp_path):
    state = trained(classes=5)
    safetensors.torch.save_file(state, tmp_path / "net.safetensors")
    with parameters_on_meta():
        model = Net(classes=3)
        model.register_buffer("steps", torch.arange(4), persistent=False)  # computed, in no checkpoint
        lazy = nn.LazyLinear(4)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers()) and torch.equal(model.steps, torch.arange(4))
    assert not lazy.weight.is_meta  # uninitialised parameters are left alone
    assert meta_blockers(model, plan(tmp_path / "net.safetensors", model)) == []
    report = transfer(tmp_path / "net.safetensors", model)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert torch.equal(model.norm.running_var, state["norm.running_var"])  # a real buffer, copied into
    assert torch.equal(model.conv.weight, state["conv.weight"]) and report.entry("head.weight").status == "new"
    with pytest.raises(RuntimeError, match="boom"), parameters_on_meta():
        raise RuntimeError("boom")
    assert not nn.Linear(2, 2).weight.is_meta  # registration is restored, also after an error
