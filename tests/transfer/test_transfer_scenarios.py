"""The transfer engine on real models: which source tensor each target tensor holds, and honest reports."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision
import timm
import pytest

import torchgraft as tg
from torchgraft.match.plan import plan
from torchgraft.transfer import transfer


def save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def assert_honest(report, source, model) -> None:
    """Every tensor reported loaded holds exactly its source tensor (cast to the target dtype)."""
    state = model.state_dict()
    for e in report.entries:
        if e.status == "loaded" and isinstance(e.source, str) and e.method != "rule:split":
            expected = source[e.source].to(state[e.target].dtype)
            assert torch.equal(state[e.target], expected), e


@pytest.fixture(scope="module")
def mobilenet_source(mobilenet_v2_path):
    return tg.load(mobilenet_v2_path)


def test_mobilenet_file_into_timm_every_name_differs(mobilenet_source):
    torch.manual_seed(0)
    target = timm.create_model("mobilenetv2_100").eval()
    report = transfer(mobilenet_source, target)
    counts = report.counts()
    assert counts["loaded"] == len(target.state_dict()) == 314
    assert counts["new"] == 0 and counts["unused_source"] == 0
    assert {e.method for e in report.entries} == {"structure"}
    assert report.entry("conv_stem.weight").source == "features.0.0.weight"
    assert report.entry("blocks.6.0.conv_pwl.weight").source == "features.17.conv.2.weight"
    assert report.entry("classifier.weight").source == "classifier.1.weight"
    assert_honest(report, mobilenet_source, target)
    reference = torchvision.models.mobilenet_v2().eval()
    reference.load_state_dict(mobilenet_source.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(target(x), reference(x), atol=1e-4, rtol=1e-4)


def test_new_head_and_num_batches_tracked_from_legacy_file(tmp_path):
    """Seed 003: a 102-key resnet18 file into a current resnet18 with a 21-class head."""
    full = torchvision.models.resnet18().state_dict()
    old = {k: v for k, v in full.items() if "num_batches_tracked" not in k}
    path = tmp_path / "resnet18-old.pth"
    torch.save(old, path, _use_new_zipfile_serialization=False)
    model = torchvision.models.resnet18(num_classes=21)
    report = transfer(path, model)
    new = report.by_status("new")
    assert {e.target for e in new if not e.benign} == {"fc.weight", "fc.bias"}
    assert sum(e.benign for e in new) == 20
    assert all("older files lack" in e.note for e in new if e.benign)
    assert "no class names" in report.entry("fc.weight").note
    assert {u["source"] for u in report.unused_source} == {"fc.weight", "fc.bias"}
    assert all("does not fit" in u["why"] for u in report.unused_source)
    assert_honest(report, tg.load(path), model)
    with pytest.raises(tg.GraftError, match=r"--strict: 2 target tensors would stay new \(fc\.weight"):
        report.check_strict()
    report.check_strict(allow_new=["fc.*"])


def test_four_channel_stem_and_21_classes(tmp_path):
    """Seed 001: resnet with a 4-channel conv1 and a 21-class fc from 3-channel, 1000-class weights."""
    source_model = torchvision.models.resnet18()
    path = save(source_model.state_dict(), tmp_path / "r18.pth")
    model = torchvision.models.resnet18(num_classes=21)
    model.conv1 = nn.Conv2d(4, 64, kernel_size=7, stride=2, padding=3, bias=False)
    report = transfer(path, model)
    stem = report.entry("conv1.weight")
    assert stem.status == "adapted" and stem.adapter == "input_channels"
    src_w = source_model.conv1.weight.detach()
    expected = torch.cat([src_w, src_w[:, :1]], dim=1) * 3 / 4
    torch.testing.assert_close(model.conv1.weight.detach(), expected)
    assert report.entry("fc.weight").status == "new"


def test_ddp_and_compile_prefixes_load_exactly(tmp_path):
    model = torchvision.models.resnet18()
    state = model.state_dict()
    path = save({"epoch": 9, "model": {f"module._orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    target = torchvision.models.resnet18()
    report = transfer(path, target)
    assert report.counts()["loaded"] == len(state)
    assert {e.method for e in report.entries} == {"exact"}
    for k, v in state.items():
        assert torch.equal(target.state_dict()[k], v)


def test_prefixes_found_by_analysis(tmp_path):
    """A Lightning-style `model.` prefix on one side, a `backbone.` prefix on the other."""
    model = torchvision.models.resnet18()
    path = save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                 "pytorch-lightning_version": "2.4.0"}, tmp_path / "lit.ckpt")

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torchvision.models.resnet18()
            self.box_head = nn.Linear(1000, 4)

    target = Detector()
    report = transfer(path, target)
    assert report.entry("backbone.layer4.1.bn2.running_var").source == "model.layer4.1.bn2.running_var"
    assert report.entry("backbone.layer4.1.bn2.running_var").method == "prefix"
    assert {e.target for e in report.by_status("new")} == {"box_head.weight", "box_head.bias"}
    assert_honest(report, tg.load(path), target)


def test_minilm_into_bert_for_sequence_classification(minilm_dir):
    from transformers import BertForSequenceClassification, BertConfig

    config = BertConfig.from_pretrained(minilm_dir, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    source = tg.load(minilm_dir)
    report = transfer(source, model)
    assert report.entry("bert.encoder.layer.5.output.dense.weight").source == "encoder.layer.5.output.dense.weight"
    assert report.entry("bert.encoder.layer.5.output.dense.weight").method == "prefix"
    assert {e.target for e in report.by_status("new") if not e.benign} == {"classifier.weight", "classifier.bias"}
    assert_honest(report, source, model)
    from transformers import BertModel

    reference = BertModel.from_pretrained(minilm_dir, local_files_only=True).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        torch.testing.assert_close(model.bert(ids).last_hidden_state, reference(ids).last_hidden_state)


def test_fused_qkv_from_separate_projections_by_rules(minilm_dir):
    source = tg.load(minilm_dir)

    class FusedBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(384, 3 * 384)

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(FusedBlock() for _ in range(6))

    model = Fused()
    rules = {"merge": [
        {"target": "blocks.{}.qkv.weight", "dim": 0, "sources": [
            "encoder.layer.{}.attention.self.query.weight", "encoder.layer.{}.attention.self.key.weight",
            "encoder.layer.{}.attention.self.value.weight"]},
        {"target": "blocks.{}.qkv.bias", "dim": 0, "sources": [
            "encoder.layer.{}.attention.self.query.bias", "encoder.layer.{}.attention.self.key.bias",
            "encoder.layer.{}.attention.self.value.bias"]},
    ]}
    report = transfer(source, model, rules=rules, strict=True)
    assert report.counts()["loaded"] == 12
    e = report.entry("blocks.3.qkv.weight")
    assert e.method == "rule:merge" and e.source[1] == "encoder.layer.3.attention.self.key.weight"
    expected = torch.cat([source[f"encoder.layer.3.attention.self.{p}.weight"] for p in ("query", "key", "value")])
    assert torch.equal(model.blocks[3].qkv.weight.detach(), expected)


def test_split_and_rename_rules(minilm_dir):
    """The other direction: a fused tensor split into q, k, v; and a rename rule with `{}` slots."""
    fused = {"blk.0.qkv.weight": torch.randn(12, 4), "blk.0.out.weight": torch.randn(4, 4)}

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.proj = (nn.Linear(4, 4, bias=False) for _ in range(4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Attn()])

    src = tg.Source("mem", "memory", fused, {k: tg.io.TensorInfo(tuple(v.shape), "float32") for k, v in fused.items()})
    model = Net()
    rules = {"split": [{"source": "blk.{}.qkv.weight", "dim": 0,
                        "targets": ["layers.{}.q.weight", "layers.{}.k.weight", "layers.{}.v.weight"]}],
             "rename": {"blk.{}.out.weight": "layers.{}.proj.weight"}}
    report = transfer(src, model, rules=rules, strict=True)
    assert report.entry("layers.0.k.weight").method == "rule:split"
    assert torch.equal(model.layers[0].k.weight.detach(), fused["blk.0.qkv.weight"][4:8])
    assert report.entry("layers.0.proj.weight").method == "rule"
    assert torch.equal(model.layers[0].proj.weight.detach(), fused["blk.0.out.weight"])


def test_unrelated_source_loads_nothing(minilm_dir):
    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = transfer(minilm_dir, model)
    assert report.counts()["loaded"] == 0 and report.counts()["adapted"] == 0
    assert report.warnings and "is this the right checkpoint" in report.warnings[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_meta_device_target_is_filled(mobilenet_source):
    with torch.device("meta"):
        model = torchvision.models.mobilenet_v2(num_classes=10)
    report = transfer(mobilenet_source, model)
    state = model.state_dict()
    assert not any(t.is_meta for t in state.values())
    assert torch.equal(state["features.3.conv.1.0.weight"], mobilenet_source["features.3.conv.1.0.weight"])
    assert report.entry("classifier.1.weight").status == "new"
    assert state["classifier.1.weight"].abs().sum() > 0  # initialised by reset_parameters, not left empty
    assert torch.isfinite(model.eval()(torch.randn(1, 3, 64, 64))).all()


def test_plan_does_not_touch_values(mobilenet_source):
    model = timm.create_model("mobilenetv2_100")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = plan(mobilenet_source, model)
    assert report.counts()["load"] == 314
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    data = report.to_dict()
    assert set(data) >= {"format", "version", "fingerprint", "source", "target", "steps", "unused_source", "summary"}
    assert data["summary"] == {"load": 314, "adapt": 0, "new": 0, "unused_source": 0}
    assert {"target", "source", "action", "method"} <= set(data["steps"][0]) and "status" not in data["steps"][0]


def test_verify_matches_and_finds_a_moved_stride(mobilenet_source):
    from torchgraft.verify import verify

    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(mobilenet_source.state_dict())
    target = timm.create_model("mobilenetv2_100")
    report = transfer(mobilenet_source, target)
    x = torch.randn(1, 3, 64, 64)
    result = verify(reference, target, report, x)
    assert result.ok and result.compared == result.agreed >= 52
    assert result.output_max_abs_diff < 1e-4

    source_model = torchvision.models.resnet18()
    hand_written = torchvision.models.resnet18()
    hand_written.layer2[0].conv1.stride = (1, 1)  # a block that puts the stride on the other conv
    hand_written.layer2[0].conv2.stride = (2, 2)
    src = tg.Source("r18", "memory", source_model.state_dict(), tg.io.read._info_of(source_model.state_dict()))
    report = transfer(src, hand_written)
    result = verify(source_model, hand_written, report, torch.randn(1, 3, 64, 64))
    assert not result.ok
    assert result.first_divergence.target_module == "layer2.0.conv1"
    assert result.agreed >= 5  # stem and layer1 agree before the divergence


def test_classifier_rows_of_shared_imagenet_classes(mobilenet_v2_path, mobilenet_source):
    """torchvision's metadata names the file's 1000 classes; rows of classes the target shares are copied."""
    from torchgraft.classes import known_classes

    imagenet = known_classes(mobilenet_v2_path)
    assert imagenet is not None and len(imagenet) == 1000 and imagenet[1] == "goldfish"
    model = torchvision.models.mobilenet_v2(num_classes=3)
    report = transfer(mobilenet_v2_path, model, target_classes=["tabby", "goldfish", "my own class"])
    entry = report.entry("classifier.1.weight")
    assert entry.status == "adapted" and entry.adapter == "classifier_rows"
    assert "the rows of 2 shared class names copied" in entry.note
    w = model.classifier[1].weight.detach()
    assert torch.equal(w[0], mobilenet_source["classifier.1.weight"][imagenet.index("tabby")])
    assert torch.equal(w[1], mobilenet_source["classifier.1.weight"][1])
    assert not torch.equal(w[2], mobilenet_source["classifier.1.weight"][2])


def test_sorted_safetensors_of_numbered_modules_align_fully(tmp_path, mobilenet_v2_path):
    """A safetensors file keeps keys sorted as strings. torchvision's MobileNetV2 numbers its modules
    (`features.10.conv.0.1`), so natural order gives the file its module order back, apart from `classifier`
    (sorted before `features`), whose shapes are unique: every tensor goes where the .pth file puts it, under
    timm's entirely different names, and the outputs are equal."""
    from safetensors.torch import save_file

    state = torch.load(mobilenet_v2_path, weights_only=True)
    path = tmp_path / "mnv2.safetensors"
    save_file(state, path)
    truth = {s.target: s.source for s in plan(mobilenet_v2_path, timm.create_model("mobilenetv2_100")).steps}
    model = timm.create_model("mobilenetv2_100").eval()
    report = transfer(path, model)
    assert len(report.by_status("loaded")) == len(truth) == 314
    assert all(e.source == truth[e.target] for e in report.entries)
    reference = torchvision.models.mobilenet_v2().eval()
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_sorted_safetensors_of_named_modules_never_guesses(tmp_path):
    """timm's MobileNetV2 names its modules (`conv_pw`, `bn1`, `conv_dw`, `bn2`); sorted, their order is lost
    (`bn1`, `bn2`, `conv_dw`, `conv_pw`). Into torchvision's model, only order-free evidence (a shape found
    once on each side) may load a tensor, and every tensor loaded is where the .pth file would put it."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("mobilenetv2_100").state_dict().items()}
    torch.save(state, tmp_path / "timm.pth")
    save_file(state, tmp_path / "timm.safetensors")
    truth = {s.target: s.source for s in plan(tmp_path / "timm.pth", torchvision.models.mobilenet_v2()).steps}
    assert all(truth.values())  # in stored order, all 314 tensors find their place
    report = plan(tmp_path / "timm.safetensors", torchvision.models.mobilenet_v2())
    loaded = [s for s in report.steps if s.action == "load"]
    assert loaded, "unique shapes (stem, head) still load"
    assert all(e.source == truth[e.target] for e in loaded)
    assert report.step("classifier.1.weight").source == "classifier.weight"
    new = [s for s in report.steps if s.action == "new" and not s.target.endswith("num_batches_tracked")]
    assert any("sorted by name" in s.note for s in new)


def test_sorted_safetensors_with_same_local_names_aligns(tmp_path):
    """Renamed containers, same local module names (timm ViT blocks -> layers): order is restored and checked."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source_model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5).eval()
    state = {k.replace("blocks.", "layers."): v.contiguous() for k, v in source_model.state_dict().items()}
    path = tmp_path / "vit.safetensors"
    save_file(state, path)
    target = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5).eval()
    report = transfer(path, target)
    assert report.entry("blocks.2.attn.qkv.weight").source == "layers.2.attn.qkv.weight"
    assert report.entry("blocks.10.mlp.fc2.bias").source == "layers.10.mlp.fc2.bias"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source_model(x))


class _ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class _Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3) with its own names, as seed 000 writes it by hand."""

    def __init__(self, cin, width, stride):
        super().__init__()
        self.bottleneck = nn.Sequential(_ConvBN(cin, width, 1), nn.ReLU(), _ConvBN(width, width, 3, stride),
                                        nn.ReLU(), _ConvBN(width, width * 4, 1))
        self.shortcut = _ConvBN(cin, width * 4, 1, stride) if stride != 1 or cin != width * 4 else nn.Identity()

    def forward(self, x):
        return torch.relu(self.bottleneck(x) + self.shortcut(x))


class HandWrittenResNet50Detector(nn.Module):
    def __init__(self, num_classes=20):
        super().__init__()
        self.pre = nn.Sequential(_ConvBN(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for width, depth, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for j in range(depth):
                layers.append(_Bottleneck(cin, width, stride if j == 0 else 1))
                cin = width * 4
        self.body = nn.Sequential(*layers)
        self.cls_head = nn.Conv2d(2048, num_classes, 1)  # a new head of its own

    def forward(self, x):
        return self.cls_head(self.body(self.pre(x)))


def test_hand_written_resnet50_receives_torchvision_weights(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    for m in reference.modules():  # non-trivial statistics, so a misplaced BN would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = save(reference.state_dict(), tmp_path / "resnet50.pth")
    model = HandWrittenResNet50Detector().eval()
    report = transfer(path, model)
    assert {e.target for e in report.by_status("new")} == {"cls_head.weight", "cls_head.bias"}
    assert report.entry("body.4.bottleneck.2.0.weight").source == "layer2.1.conv2.weight"
    assert report.entry("body.3.shortcut.1.running_var").source == "layer2.0.downsample.1.running_var"
    assert {u["source"] for u in report.unused_source} == {"fc.weight", "fc.bias"}
    assert_honest(report, tg.load(path), model)
    features = nn.Sequential(*list(reference.children())[:-2])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.body(model.pre(x)), features(x), atol=1e-4, rtol=1e-4)


def test_position_embeddings_resized_for_another_image_size(tmp_path):
    from torchgraft.adapt import resize_pos_embed

    source_model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)  # 4x4 grid
    path = save(source_model.state_dict(), tmp_path / "vit.pth")
    target = timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8)  # 6x6 grid
    report = transfer(path, target)
    entry = report.entry("pos_embed")
    assert entry.status == "adapted" and entry.adapter == "pos_embed_resize"
    expected = resize_pos_embed(source_model.pos_embed.detach(), 37, num_prefix_tokens=1)
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.pos_embed.detach()[:, :1], source_model.pos_embed.detach()[:, :1])
    assert report.counts()["new"] == 0


def test_vocabulary_resized(minilm_dir):
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(minilm_dir)
    config.vocab_size += 5  # five added tokens
    model = BertModel(config)
    source = tg.load(minilm_dir)
    report = transfer(source, model)
    entry = report.entry("embeddings.word_embeddings.weight")
    assert entry.status == "adapted" and entry.adapter == "embedding_resize"
    old = source["embeddings.word_embeddings.weight"]
    new = model.embeddings.word_embeddings.weight.detach()
    assert torch.equal(new[: old.shape[0]], old)
    assert new.shape[0] == old.shape[0] + 5


def test_other_shape_changes_are_never_cropped(tmp_path):
    path = save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    model = torchvision.models.resnet18()
    model.layer1[0].conv2 = nn.Conv2d(64, 64, 5, padding=2, bias=False)  # a wider kernel
    report = transfer(path, model)
    entry = report.entry("layer1.0.conv2.weight")
    assert entry.status == "new" and "not cropped" in entry.note
    assert any(u["source"] == "layer1.0.conv2.weight" and "does not fit" in u["why"] for u in report.unused_source)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_renamed_four_channel_stem_is_adapted(tmp_path, mobilenet_v2_path, fmt):
    """timm's MobileNetV2 with 4 input channels and 21 classes from torchvision's file: every name differs, and
    the stem's shape too. The first convolutions pair up because the modules right after them did."""
    from safetensors.torch import save_file

    from torchgraft.adapt import adapt_input_channels

    state = torch.load(mobilenet_v2_path, weights_only=True)
    path = mobilenet_v2_path
    if fmt == "safetensors":
        path = tmp_path / "mnv2.safetensors"
        save_file(state, path)
    model = timm.create_model("mobilenetv2_100", in_chans=4, num_classes=21)
    report = transfer(path, model)
    stem = report.entry("conv_stem.weight")
    assert (stem.status, stem.adapter, stem.source) == ("adapted", "input_channels", "features.0.0.weight")
    assert "features.0.1 -> bn1" in stem.note
    assert torch.equal(model.conv_stem.weight.detach(), adapt_input_channels(state["features.0.0.weight"], 4))
    assert {e.target for e in report.by_status("new")} == {"classifier.weight", "classifier.bias"}
    assert len(report.by_status("loaded")) == 311


def test_renamed_stem_without_a_matched_neighbour_stays_new(tmp_path, mobilenet_v2_path):
    """Without the stem's BatchNorm in the file, nothing confirms that the first convolutions are the same
    place in the network: the stem stays new."""
    state = {k: v for k, v in torch.load(mobilenet_v2_path, weights_only=True).items()
             if not k.startswith("features.0.1.")}
    torch.save(state, tmp_path / "no-stem-bn.pth")
    report = plan(tmp_path / "no-stem-bn.pth", timm.create_model("mobilenetv2_100", in_chans=4))
    assert report.step("conv_stem.weight").action == "new"
    assert all(s.source != "features.0.0.weight" for s in report.steps)
