"""The plan as data: stages in order, every adapter's arguments in the file, exact round trips, stale plans."""

from __future__ import annotations

import json
import types

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import torchgraft as tg
from torchgraft.errors import GraftError
from torchgraft.match.plan import STAGES, Plan, plan
from torchgraft.transfer import apply

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def unique(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every floating tensor filled with distinct values, so a misplaced tensor cannot pass for the right one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():  # variances positive, so a model with these values still computes
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if key.endswith("running_var")
                        else torch.randn(t.shape, generator=g))
    return model


def round_trip(p: Plan) -> Plan:
    return Plan.from_dict(json.loads(json.dumps(p.to_dict())))


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_stages_run_in_the_documented_order():
    assert [s.__name__ for s in STAGES] == ["drops", "merges_and_splits", "renames", "exact", "prefixes",
                                            "structure", "folds", "stem", "adapters", "orphans",
                                            "module_settings"]
    assert all(s.__doc__ for s in STAGES)


def test_a_plan_never_says_loaded(mobilenet_v2_path):
    p = plan(mobilenet_v2_path, timm.create_model("mobilenetv2_100", num_classes=10))
    data = p.to_dict()
    assert {s["action"] for s in data["steps"]} == {"load", "new"}
    assert "loaded" not in json.dumps(data["summary"]) and "entries" not in data
    step = p.step("blocks.1.0.conv_dw.weight")
    assert step.method == "structure" and step.how and step.source == "features.2.conv.1.0.weight"


def test_classifier_row_map_is_in_the_plan(mobilenet_v2_path):
    """A plan made with target class names applies without them: the row map is an argument of the step."""
    source = tg.load(mobilenet_v2_path)
    classes = ["tabby", "goldfish", "my own class"]
    direct = torchvision.models.mobilenet_v2(num_classes=3)
    torch.manual_seed(0)
    direct = torchvision.models.mobilenet_v2(num_classes=3)
    tg.transfer(source, direct, target_classes=classes)

    p = round_trip(plan(source, torchvision.models.mobilenet_v2(num_classes=3), target_classes=classes))
    step = p.step("classifier.1.weight")
    imagenet_tabby = 281
    assert step.adapter == "classifier_rows" and step.args == {"rows": [[imagenet_tabby, 0], [1, 1]]}
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=3)
    report = apply(p, source, model)
    assert report.entry("classifier.1.bias").adapter == "classifier_rows"
    assert report.entry("classifier.1.weight").args == step.args
    assert_same_state(model, direct)


def test_input_channels_embedding_and_pos_embed_round_trip():
    """Three adapters, each applied from a plan that went through JSON, equal the direct transfer."""
    cases = [
        (unique(timm.create_model("resnet18")), lambda: timm.create_model("resnet18", in_chans=4, num_classes=5),
         "conv1.weight", {"in_chans": 4}),
        (unique(timm.create_model("vit_tiny_patch16_224", img_size=64)),
         lambda: timm.create_model("vit_tiny_patch16_224", img_size=96), "pos_embed", {"num_prefix_tokens": 1}),
    ]
    for source_model, build, key, args in cases:
        state = source_model.state_dict()
        direct = build()
        tg.transfer(state, direct)
        p = round_trip(plan(state, build()))
        assert p.step(key).args == args and p.step(key).action == "adapt"
        model = build()
        apply(p, state, model)
        placed = [s.target for s in p.steps if s.action != "new"]
        assert key in placed and len(placed) > 10
        for k in placed:
            assert torch.equal(model.state_dict()[k], direct.state_dict()[k]), k

    class Tokens(nn.Module):
        def __init__(self, rows: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(rows, 8)

    state = unique(Tokens(10)).state_dict()
    p = round_trip(plan(state, Tokens(12)))
    assert p.step("embed.weight").args == {"num_rows": 12}
    model = Tokens(12)
    apply(p, state, model)
    assert torch.equal(model.embed.weight[:10], state["embed.weight"])


def test_split_merge_and_cast_round_trip():
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 12)

    class Separate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    fused = unique(Fused()).state_dict()
    rules = {"split": [{"source": "qkv.{}", "dim": 0, "targets": ["q.{}", "k.{}", "v.{}"]}]}
    p = round_trip(plan(fused, Separate(), rules=rules, dtype="bfloat16"))
    assert p.step("k.weight").args == {"dim": 0, "part": 1, "parts": 3} and p.step("k.weight").adapter == "split"
    assert p.step("k.weight").cast == "bfloat16" and p.dtype == "bfloat16"
    separate = Separate()
    report = apply(p, fused, separate)
    assert report.entry("k.weight").status == "loaded" and "cast float32 -> bfloat16" in report.entry("k.weight").note
    assert torch.equal(separate.k.weight, fused["qkv.weight"][4:8].bfloat16())

    parts = unique(Separate()).state_dict()
    merge = {"merge": [{"target": "qkv.{}", "dim": 0, "sources": ["q.{}", "k.{}", "v.{}"]}]}
    p = round_trip(plan(parts, Fused(), rules=merge))
    assert p.step("qkv.bias").adapter == "merge" and p.step("qkv.bias").args == {"dim": 0}
    model = Fused()
    apply(p, parts, model)
    assert torch.equal(model.qkv.bias, torch.cat([parts["q.bias"], parts["k.bias"], parts["v.bias"]]))


def test_edited_plan_is_applied_as_written():
    """A reviewer swaps two sources by hand: apply does what the file says, re-deriving nothing."""
    state = unique(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))).state_dict()
    data = plan(state, nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))).to_dict()
    for step in data["steps"]:
        step["source"] = step["source"].replace("0.", "X.").replace("1.", "0.").replace("X.", "1.")
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    apply(Plan.from_dict(data), state, model)
    assert torch.equal(model[0].weight, state["1.weight"]) and torch.equal(model[1].bias, state["0.bias"])


def test_plans_that_do_not_fit_are_refused_naming_the_key(tmp_path):
    net = lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))  # noqa: E731
    state = unique(net()).state_dict()
    safetensors.torch.save_file(state, tmp_path / "a.safetensors")
    p = plan(tmp_path / "a.safetensors", net())
    p.save(tmp_path / "plan.json")

    data = json.loads((tmp_path / "plan.json").read_text())
    data["steps"][0]["source"] = "nonexistent.weight"
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(GraftError, match=r"edited.json: the plan takes source tensor 'nonexistent.weight' \(for "
                                         r"0.weight\), which .*a.safetensors does not hold"):
        tg.transfer(tmp_path / "a.safetensors", net(), plan=Plan.read(tmp_path / "edited.json"))

    grown = dict(state, extra=torch.ones(2))
    safetensors.torch.save_file(grown, tmp_path / "a.safetensors")
    with pytest.raises(GraftError, match=r"plan.json: a stale plan: .*a.safetensors changed since it was made "
                                         r"\('extra' is not in the plan\)"):
        tg.transfer(tmp_path / "a.safetensors", net(), plan=Plan.read(tmp_path / "plan.json"))

    safetensors.torch.save_file(state, tmp_path / "a.safetensors")
    wider = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(GraftError, match=r"the model has 2 tensors the plan does not mention \(first: 3.weight\)"):
        tg.transfer(tmp_path / "a.safetensors", wider, plan=Plan.read(tmp_path / "plan.json"))
    half = net().half()
    with pytest.raises(GraftError, match="a stale plan: the model changed since it was made"):
        tg.transfer(tmp_path / "a.safetensors", half, plan=Plan.read(tmp_path / "plan.json"))

    for bad, pattern in (({"entries": []}, "written by an older torchgraft"),
                         ({**data, "version": 99}, "plan format version 99"),
                         ({**data, "steps": [{"target": "0.weight", "action": "loaded"}]}, "action 'loaded'"),
                         ({**data, "steps": [{"target": "0.weight", "action": "adapt", "source": "0.weight",
                                              "adapter": "split", "args": {"dim": 0}}]},
                          r"adapter 'split' has arguments \['dim'\]; expected exactly \['dim', 'part', 'parts'\]")):
        with pytest.raises(GraftError, match=pattern):
            Plan.from_dict(bad)


def test_state_dicts_and_sources_are_accepted():
    model = unique(torchvision.models.resnet18())
    target = torchvision.models.resnet18()
    report = tg.transfer({f"module.{k}": v for k, v in model.state_dict().items()}, target)
    assert report.counts()["loaded"] == len(model.state_dict()) and report.source == "state_dict"
    assert_same_state(model, target)
    source = tg.Source.from_state_dict(model.state_dict(), name="mine")
    assert source.wrapper is None and tg.plan(source, target).source == "mine"
    with pytest.raises(GraftError, match="entry 'fc.weight' is list; expected a state dict of tensor names"):
        tg.Source.from_state_dict({"fc.weight": [1, 2]})


def test_one_call_low_memory_transfer_writes_the_format_the_extension_names(tmp_path, mobilenet_v2_path):
    report = tg.transfer(mobilenet_v2_path, build="timm:mobilenetv2_100", out=tmp_path / "m.pth",
                         source_model="torchvision:mobilenet_v2")
    assert report.notes[:2] == ["built with its parameters on the meta device",
                                "filled on the meta device; only modules with new tensors are initialised"]
    assert any(n.startswith("target traced on the meta device") for n in report.notes)
    assert any(n.startswith("source model traced on the meta device") for n in report.notes)
    assert report.verified is True and report.to_dict()["verified"] is True
    written = torch.load(tmp_path / "m.pth", weights_only=True)
    reference = torch.load(mobilenet_v2_path, weights_only=True)
    assert torch.equal(written["conv_stem.weight"], reference["features.0.0.weight"])
    assert set(written) == set(report.model.state_dict())
    with pytest.raises(GraftError, match=r"extension '.onnx' names no weights format; expected one of "
                                         r"\.safetensors, \.pth"):
        tg.transfer(mobilenet_v2_path, build="timm:mobilenetv2_100", out=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(GraftError, match="exactly one of `model`"):
        tg.transfer(mobilenet_v2_path)


def test_functions_do_not_shadow_their_modules():
    import torchgraft.freeze as freeze_module
    import torchgraft.transfer as transfer_module
    import torchgraft.verify as verify_module

    for module, name in ((transfer_module, "transfer"), (freeze_module, "freeze"), (verify_module, "verify")):
        assert isinstance(module, types.ModuleType) and module.__name__ == f"torchgraft.{name}"
        assert getattr(tg, name) is module and callable(module)
    model = torchvision.models.resnet18()
    tg.freeze(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert "source" in str(__import__("inspect").signature(tg.transfer))


def test_the_source_model_a_file_names_is_traced_and_verifies(mobilenet_v2_path, minilm_dir):
    report = tg.transfer(mobilenet_v2_path, timm.create_model("mobilenetv2_100"))
    assert report.verified is True and report.counts()["loaded"] == 314
    assert "source model torchvision:mobilenet_v2: torchvision publishes mobilenet_v2-b0353104.pth for " \
           "mobilenet_v2" in report.notes
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(str(minilm_dir), local_files_only=True)
    report = tg.transfer(minilm_dir, transformers.BertModel(config))
    assert any(n.startswith("source model transformers:BertModel:") and "config.json names BertModel" in n
               for n in report.notes)
    assert report.verified is True, report.verification
    report = tg.transfer(mobilenet_v2_path, timm.create_model("mobilenetv2_100"), source_model=None)
    assert report.verified is None and report.to_dict()["verified"] is None


def test_a_source_model_gives_a_sorted_file_its_order_back(tmp_path):
    source = unique(timm.create_model("mobilenetv2_100")).state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.items()}, tmp_path / "timm.safetensors")
    alone = tg.transfer(tmp_path / "timm.safetensors", torchvision.models.mobilenet_v2())
    assert alone.counts()["loaded"] < 100 and alone.verified is None  # names differ, order lost: refused
    target = torchvision.models.mobilenet_v2()
    report = tg.transfer(tmp_path / "timm.safetensors", target, source_model="timm:mobilenetv2_100")
    assert report.counts()["loaded"] == 314 and report.verified is True
    assert torch.equal(target.features[1].conv[0][0].weight, source["blocks.0.0.conv_dw.weight"])


def test_cli_verify_refuses_what_it_cannot_verify(tmp_path, capsys):
    from torchgraft.cli import main

    state = unique(torchvision.models.resnet18()).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    out = tmp_path / "o.safetensors"
    code = main(["transfer", str(tmp_path / "r18.pth"), "--model", "timm:resnet18", "--out", str(out), "--verify"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: --verify: the transfer was not verified (no source model")
    assert not out.exists()
    code = main(["transfer", str(tmp_path / "r18.pth"), "--model", "timm:resnet18", "--out", str(out), "--verify",
                 "--source-model", "torchvision:resnet18", "--input-shape", "1,3,64,64"])
    assert code == 0 and out.exists() and "verify:" in capsys.readouterr().out
    code = main(["transfer", str(tmp_path / "r18.pth"), "--model", "timm:resnet18", "--dry-run", "--input-shape",
                 "1,x"])
    assert code == 1 and "--input-shape '1,x': expected positive integers" in capsys.readouterr().err


def test_a_module_left_unplaced_names_what_it_resembles():
    """A bare Hugging Face ViT file (its blocks store the norms after the attention) into timm: the first
    norm of a block stays new, and its note names the source norms it resembles, not "no source tensor
    matches"."""
    transformers = pytest.importorskip("transformers")
    timm = pytest.importorskip("timm")
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
                                    hidden_size=64, intermediate_size=128)
    source = transformers.ViTForImageClassification(config).state_dict()
    target = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=2,
                               embed_dim=64, mlp_ratio=2.0, global_pool="token")
    result = plan(source, target)
    step = result.step("blocks.0.norm1.weight")
    assert step.action == "new"
    assert step.note.startswith("resembles source modules"), step.note
    assert any("layernorm" in c for c in step.candidates)


class _Separate(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        return self.o(self.q(x) + self.k(x) + self.v(x))


class _Fused(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.fused_name = name
        self.add_module(name, nn.Linear(8, 24))
        self.dense = nn.Linear(8, 8)

    def forward(self, x):
        return self.dense(getattr(self, self.fused_name)(x)[..., :8])


class _Net(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.layers = nn.ModuleList(attention() for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layers[1](self.layers[0](self.stem(x))))


@pytest.mark.parametrize("name, loads", [("qkv", True), ("query_key_value", False), ("fused_rows", False)])
def test_a_fused_projection_is_split_or_joined_only_when_its_layout_is_known(name, loads):
    """Blocked families (`qkv`) are joined from q, k, v; a head-interleaved one (`query_key_value`) stays new
    (joining it blocked would put every row in the wrong place); an unknown one stays new with the rule that
    loads it if it is blocked — and that rule does."""
    source = _Net(_Separate).state_dict()
    result = plan(source, _Net(lambda: _Fused(name)))
    step = result.step(f"layers.0.{name}.weight")
    assert (step.action == "load") is loads, step
    if name == "query_key_value":
        assert "interleaves its heads" in step.note
    if name == "fused_rows":
        assert "does not know" in step.note and "merge: [{target: layers.0.fused_rows.weight" in step.note
        rules = {"merge": [{"target": f"layers.{i}.fused_rows.{t}", "dim": 0,
                            "sources": [f"layers.{i}.{p}.{t}" for p in "qkv"]} for i in range(2) for t in
                           ("weight", "bias")]}
        model = _Net(lambda: _Fused(name))
        report = tg.transfer(source, model, rules=rules)
        assert report.entry("layers.0.fused_rows.weight").status == "loaded"
        expected = torch.cat([source[f"layers.0.{p}.weight"] for p in "qkv"])
        assert torch.equal(model.state_dict()["layers.0.fused_rows.weight"], expected)
