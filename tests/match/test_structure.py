"""The structure matcher on real models: which source group each target group gets, and that loading by the
match reproduces the source model's outputs."""

from __future__ import annotations

import random
from collections import Counter

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from torchgraft.match import structure
from torchgraft.match.structure import (
    Group,
    GroupMatch,
    align,
    compatible,
    groups_from_keys,
    groups_from_model,
    natural_order,
    order_known,
    signature,
    tensor_pairs,
)

# --------------------------------------------------------------------------------------------------------------
# helpers


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def join(path: str, local: str) -> str:
    return f"{path}.{local}" if path else local


def randomize_norms(model: nn.Module) -> None:
    """Give every BatchNorm distinct affine values and running statistics, so a swapped tensor shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def load_in_order(source_state, source, target_model, target, matches: list[GroupMatch]) -> None:
    """Copy each matched group's tensors into the target, in state_dict order within the group."""
    state = target_model.state_dict()
    for m in matches:
        assert m.source is not None, target[m.target].name
        src, tgt = source[m.source], target[m.target]
        assert [n for n, _ in src.tensors] == [n for n, _ in tgt.tensors]
        for (src_local, _), (tgt_local, _) in zip(src.tensors, tgt.tensors):
            state[join(tgt.name, tgt_local)].copy_(source_state[join(src.name, src_local)])
    target_model.load_state_dict(state)


def mapping(source, target, matches) -> dict[str, str | None]:
    """target module path -> source module path (None when not matched)."""
    return {target[m.target].name: (source[m.source].name if m.source is not None else None) for m in matches}


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# groups and signatures


def test_groups_from_keys_groups_by_module_path_in_first_occurrence_order():
    shapes = {"cls_token": (1, 1, 8), "a.weight": (4, 2), "a.bias": (4,), "b.0.weight": (4,), "pos": (1, 5, 8)}
    groups = groups_from_keys(shapes, {"a": "Linear"})
    assert groups == [
        Group("", (("cls_token", (1, 1, 8)), ("pos", (1, 5, 8)))),
        Group("a", (("weight", (4, 2)), ("bias", (4,))), "Linear"),
        Group("b.0", (("weight", (4,)),)),
    ]


def test_groups_from_model_uses_state_dict_keys_and_class_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(4))
    model.register_buffer("scratch", torch.zeros(2), persistent=False)
    assert groups_from_model(model) == [
        Group("0", (("weight", (4, 3, 3, 3)),), "Conv2d"),
        Group("2", (("weight", (4,)), ("bias", (4,)), ("running_mean", (4,)), ("running_var", (4,)),
                    ("num_batches_tracked", ())), "BatchNorm2d"),
    ]


def test_num_batches_tracked_is_optional_and_kinds_count_only_when_known_on_both_sides():
    new = groups_from_model(nn.BatchNorm2d(8))[0]
    old = Group("bn", tuple(t for t in new.tensors if t[0] != "num_batches_tracked"))
    assert signature(new) == signature(old)
    assert compatible(old, new)
    assert tensor_pairs(old, new) == [(n, n) for n in ("weight", "bias", "running_mean", "running_var")]
    ln = Group("ln", (("weight", (8,)), ("bias", (8,))), "LayerNorm")
    gn = Group("gn", (("weight", (8,)), ("bias", (8,))), "GroupNorm")
    assert not compatible(ln, gn)
    assert compatible(ln, Group("x", gn.tensors))
    # same names, same shapes, different order (a string-sorted file stores bias first): still compatible
    linear = Group("fc", (("weight", (4, 2)), ("bias", (4,))))
    assert compatible(linear, Group("fc", (("bias", (4,)), ("weight", (4, 2)))))
    assert not compatible(linear, Group("fc", (("weight", (4, 2)), ("bias", (2,)))))
    assert not compatible(linear, Group("fc", (("kernel", (4, 2)), ("bias", (4,)))))


def test_known_kinds_single_out_a_pair_that_shapes_alone_cannot():
    tensors = (("weight", (8,)), ("bias", (8,)))
    source = [Group("norm_a", tensors, "LayerNorm"), Group("norm_b", tensors, "GroupNorm")]
    target = [Group("x", tensors, "GroupNorm"), Group("y", tensors, "LayerNorm")]
    assert [(m.source, m.how) for m in align(source, target)] == [(1, "unique-signature"), (0, "unique-signature")]
    # without kinds on the target both fit both: identical signature sequences pair by position
    bare = [Group("x", tensors), Group("y", tensors)]
    assert [(m.source, m.how) for m in align(source, bare)] == [(0, "aligned"), (1, "aligned")]


def test_empty_sides():
    groups = groups_from_model(nn.Linear(2, 3))
    assert align([], groups) == [GroupMatch(0, None, [], "unmatched")]
    assert align(groups, []) == []


def all_alignments(source: list[Group], target: list[Group]) -> list[list[tuple[int, int]]]:
    """Every order-keeping set of compatible (source, target) pairs, by enumeration."""
    out: list[list[tuple[int, int]]] = []

    def extend(i: int, j: int, pairs: list[tuple[int, int]]) -> None:
        out.append(list(pairs))
        for a in range(i, len(source)):
            for b in range(j, len(target)):
                if compatible(source[a], target[b]):
                    extend(a + 1, b + 1, pairs + [(a, b)])

    extend(0, 0, [])
    return out


def expected_by_enumeration(source: list[Group], target: list[Group]) -> list[tuple[int | None, list[int], str]]:
    """The rules applied literally: best pair count, then best summed name similarity."""
    every = all_alignments(source, target)
    most = max(len(a) for a in every)
    optimal = [a for a in every if len(a) == most]

    def names(a):
        return sum(structure._lcs(structure._tokens(source[i].name), structure._tokens(target[j].name)) for i, j in a)

    top = max(names(a) for a in optimal)
    by_names = [a for a in optimal if names(a) == top]
    out = []
    for j in range(len(target)):
        fits = {dict((b, a) for a, b in al).get(j) for al in optimal}
        named = {dict((b, a) for a, b in al).get(j) for al in by_names}
        if fits == {None}:
            out.append((None, [], "unmatched"))
        elif len(fits) == 1:
            out.append((fits.pop(), [], "aligned"))
        elif named == {None}:
            out.append((None, [], "unmatched"))
        elif len(named) == 1:
            out.append((named.pop(), [], "aligned+names"))
        else:
            out.append((None, sorted(x for x in named if x is not None), "ambiguous"))
    return out


def test_region_alignment_equals_enumerating_every_alignment():
    rng = random.Random(0)
    shapes = {"A": (("weight", (2,)),), "B": (("weight", (3,)),), "C": (("weight", (4,)),)}
    checked = 0
    for _ in range(500):
        letters = "AB" if rng.random() < 0.7 else "ABC"
        source = [Group(f"x.{rng.randint(0, 2)}", shapes[rng.choice(letters)]) for _ in range(rng.randint(0, 7))]
        target = [Group(f"x.{rng.randint(0, 2)}", shapes[rng.choice(letters)]) for _ in range(rng.randint(1, 7))]
        got = align(source, target)
        if any(m.how == "unique-signature" for m in got):
            continue  # rule 1 comes before any alignment
        assert [(m.source, m.candidates, m.how) for m in got] == expected_by_enumeration(source, target)
        checked += 1
    assert checked > 350


# --------------------------------------------------------------------------------------------------------------
# real models, every name different


def test_torchvision_mobilenet_v2_into_timm_mobilenetv2_every_group_matched_and_outputs_equal():
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2()
    randomize_norms(tv)
    tm = timm.create_model("mobilenetv2_100", pretrained=False)
    state = tv.state_dict()
    source = groups_from_keys(shapes_of(state))
    target = groups_from_model(tm)
    assert len(source) == len(target) == 105

    matches = align(source, target)

    assert [m.target for m in matches] == list(range(105))
    assert [m.source for m in matches] == list(range(105))  # both models list their layers in the same order
    assert Counter(m.how for m in matches) == {"unique-signature": 17, "aligned": 88}
    names = mapping(source, target, matches)
    assert names["conv_stem"] == "features.0.0"
    assert names["bn1"] == "features.0.1"
    assert names["blocks.0.0.conv_dw"] == "features.1.conv.0.0"
    assert names["blocks.1.0.conv_pw"] == "features.2.conv.0.0"
    assert names["blocks.1.1.bn3"] == "features.3.conv.3"
    assert names["blocks.6.0.conv_pwl"] == "features.17.conv.2"
    assert names["conv_head"] == "features.18.0"
    assert names["classifier"] == "classifier.1"
    assert all(s != t for t, s in names.items())  # every name differs

    load_in_order(state, source, tm, target, matches)
    assert_same_outputs(tv, tm, torch.randn(2, 3, 64, 64))


class ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 conv) under other names."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.convs = nn.ModuleList([ConvNorm(cin, width, 1), ConvNorm(width, width, 3, stride),
                                    ConvNorm(width, cout, 1)])
        self.shortcut = ConvNorm(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = F.relu(self.convs[0](x))
        y = F.relu(self.convs[1](y))
        y = self.convs[2](y)
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Stage(nn.Module):
    def __init__(self, cin: int, width: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Bottleneck(cin if j == 0 else width * 4, width, stride if j == 0 else 1) for j in range(depth)]
        )

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class RenamedResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = ConvNorm(3, 64, 7, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        plan = [(64, 64, 3, 1), (256, 128, 4, 2), (512, 256, 6, 2), (1024, 512, 3, 2)]
        self.stages = nn.ModuleList([Stage(*p) for p in plan])
        self.classifier = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.stem(x)))
        for stage in self.stages:
            x = stage(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_renamed_resnet50_gets_torchvision_resnet50_weights_and_outputs_equal():
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    randomize_norms(tv)
    ours = RenamedResNet50()
    source, target = groups_from_model(tv), groups_from_model(ours)  # kinds known on both sides
    assert len(source) == len(target) == 107

    matches = align(source, target)

    assert [m.source for m in matches] == list(range(107))
    names = mapping(source, target, matches)
    assert names["stem.conv"] == "conv1"
    assert names["stem.norm"] == "bn1"
    assert names["stages.0.blocks.0.convs.1.conv"] == "layer1.0.conv2"
    assert names["stages.1.blocks.0.convs.1.conv"] == "layer2.0.conv2"  # the strided 3x3
    assert names["stages.1.blocks.0.shortcut.conv"] == "layer2.0.downsample.0"
    assert names["stages.1.blocks.0.shortcut.norm"] == "layer2.0.downsample.1"
    assert names["stages.2.blocks.5.convs.2.norm"] == "layer3.5.bn3"
    assert names["stages.3.blocks.2.convs.0.conv"] == "layer4.2.conv1"
    assert names["classifier"] == "fc"

    load_in_order(tv.state_dict(), source, ours, target, matches)
    assert_same_outputs(tv, ours, torch.randn(1, 3, 64, 64))


# --------------------------------------------------------------------------------------------------------------
# inserted, removed, reordered, unrelated


def resnet18_with_extra_layer2_block() -> nn.Module:
    model = torchvision.models.resnet18()
    model.layer2 = nn.Sequential(*model.layer2, torchvision.models.resnet.BasicBlock(128, 128))
    return model


def test_inserted_block_gets_no_weights_and_everything_else_is_matched_by_name_tie_break():
    torch.manual_seed(0)
    source = groups_from_keys(shapes_of(torchvision.models.resnet18().state_dict()))
    target = groups_from_model(resnet18_with_extra_layer2_block())

    matches = align(source, target)
    names = mapping(source, target, matches)

    new = [n for n in names if n.startswith("layer2.2.")]
    assert new == ["layer2.2.conv1", "layer2.2.bn1", "layer2.2.conv2", "layer2.2.bn2"]
    assert all(names[n] is None for n in new)
    assert {n: s for n, s in names.items() if n not in new} == {n: n for n in names if n not in new}
    how = {target[m.target].name: m.how for m in matches}
    assert [how[n] for n in new] == ["unmatched"] * 4
    # the repeated layer2 groups fit several sources equally by shape; their names settle it
    assert [n for n, h in how.items() if h == "aligned+names"] == [
        "layer2.0.downsample.1", "layer2.1.conv1", "layer2.1.bn1", "layer2.1.conv2", "layer2.1.bn2"]
    assert sum(m.source is not None for m in matches) == len(source)


def test_inserted_block_without_telling_names_is_ambiguous_never_layer3():
    torch.manual_seed(0)
    real = groups_from_keys(shapes_of(torchvision.models.resnet18().state_dict()))
    source = [Group("m", g.tensors) for g in real]  # names say nothing
    target = groups_from_model(resnet18_with_extra_layer2_block())

    matches = align(source, target)

    for m in matches:
        name = target[m.target].name
        if m.source is not None:
            assert real[m.source].name == name
        else:
            assert m.how == "ambiguous" and name.startswith(("layer2.0.downsample.1", "layer2.1.", "layer2.2."))
            assert all(real[c].name.startswith(("layer2.0.", "layer2.1.")) for c in m.candidates)
    ambiguous = {target[m.target].name: [real[c].name for c in m.candidates] for m in matches if m.candidates}
    # after the unique layer2.0.downsample.0, 5 source groups (norm, then conv/norm alternating) fall into 9
    # target positions: target position p fits every source q of the same kind with q <= p <= q + 4
    assert ambiguous == {
        "layer2.0.downsample.1": ["layer2.0.downsample.1"],
        "layer2.1.conv1": ["layer2.1.conv1"],
        "layer2.1.bn1": ["layer2.0.downsample.1", "layer2.1.bn1"],
        "layer2.1.conv2": ["layer2.1.conv1", "layer2.1.conv2"],
        "layer2.1.bn2": ["layer2.0.downsample.1", "layer2.1.bn1", "layer2.1.bn2"],
        "layer2.2.conv1": ["layer2.1.conv1", "layer2.1.conv2"],
        "layer2.2.bn1": ["layer2.1.bn1", "layer2.1.bn2"],
        "layer2.2.conv2": ["layer2.1.conv2"],
        "layer2.2.bn2": ["layer2.1.bn2"],
    }


# the target groups after the unique layer3.0.downsample.0 whose shapes repeat in the source's 5 later blocks
LAYER3_TIED = ["layer3.0.downsample.1"] + [
    f"layer3.{b}.{p}" for b in range(1, 5) for p in ("conv1", "bn1", "conv2", "bn2")]


def resnet34_without_layer3_block(k: int) -> nn.Module:
    model = torchvision.models.resnet34()
    blocks = list(model.layer3)
    del blocks[k]
    model.layer3 = nn.Sequential(*blocks)  # renumbered layer3.0 .. layer3.4
    return model


def test_removed_block_is_resolved_by_names_when_they_single_out_one_alignment():
    torch.manual_seed(0)
    source = groups_from_keys(shapes_of(torchvision.models.resnet34().state_dict()))
    target = groups_from_model(resnet34_without_layer3_block(3))

    matches = align(source, target)

    names = mapping(source, target, matches)
    assert names == {n: n for n in names}  # layer3.k <- layer3.k; source layer3.5 left unused
    how = {target[m.target].name: m.how for m in matches}
    assert [n for n, h in how.items() if h == "aligned+names"] == LAYER3_TIED
    used = {m.source for m in matches}
    assert [g.name for i, g in enumerate(source) if i not in used] == [
        "layer3.5.conv1", "layer3.5.bn1", "layer3.5.conv2", "layer3.5.bn2"]


def test_removed_block_without_telling_names_is_ambiguous_with_exact_candidates():
    torch.manual_seed(0)
    real = groups_from_keys(shapes_of(torchvision.models.resnet34().state_dict()))
    source = [Group("m", g.tensors) for g in real]
    target = groups_from_model(resnet34_without_layer3_block(3))

    matches = align(source, target)

    # the groups from layer3.0.downsample.1 to the end of layer3 alternate conv, norm: dropping any two
    # consecutive source groups (up to twice) is equally good, so target position p fits source p, p+2, p+4
    index = {g.name: i for i, g in enumerate(real)}
    region_s = list(range(index["layer3.0.downsample.1"], index["layer3.5.bn2"] + 1))
    region_t = [m for m in matches if m.how == "ambiguous"]
    assert [target[m.target].name for m in region_t] == LAYER3_TIED
    for p, m in enumerate(region_t):
        assert m.source is None
        assert m.candidates == [region_s[p], region_s[p + 2], region_s[p + 4]]
    for m in matches:
        if m.how != "ambiguous":
            assert real[m.source].name == target[m.target].name
            assert m.how in ("unique-signature", "aligned")


class HeadFirst(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.head = nn.Linear(512, classes)  # registered before the backbone
        backbone = torchvision.models.resnet18()
        del backbone.fc
        self.backbone = backbone


def test_head_registered_before_backbone_new_head_unmatched_backbone_matched():
    torch.manual_seed(0)
    source = groups_from_keys(shapes_of(torchvision.models.resnet18().state_dict()))
    target = groups_from_model(HeadFirst(10))
    assert target[0].name == "head"

    matches = align(source, target)

    names = mapping(source, target, matches)
    assert names.pop("head") is None
    assert names == {n: n.removeprefix("backbone.") for n in names}
    assert [g.name for i, g in enumerate(source) if i not in {m.source for m in matches}] == ["fc"]


def test_unique_signature_matches_regardless_of_order():
    torch.manual_seed(0)
    source = groups_from_keys(shapes_of(torchvision.models.resnet18().state_dict()))
    target = groups_from_model(HeadFirst(1000))

    matches = align(source, target)

    assert (matches[0].how, source[matches[0].source].name) == ("unique-signature", "fc")
    names = mapping(source, target, matches)
    assert all(s == t.removeprefix("backbone.") for t, s in names.items() if t != "head")


def test_unrelated_source_matches_nothing():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    bert = groups_from_model(BertModel(config))
    resnet = groups_from_model(torchvision.models.resnet18())

    assert all(m.how == "unmatched" and m.source is None and not m.candidates for m in align(bert, resnet))
    assert all(m.how == "unmatched" for m in align(resnet, bert))


# --------------------------------------------------------------------------------------------------------------
# string-sorted keys (safetensors)


def test_natural_order_keeps_module_order_and_repairs_string_sorted_numbers():
    resnet = list(torchvision.models.resnet18().state_dict())
    assert natural_order(resnet) == resnet
    keys = ["b.10.w", "b.2.w", "b.0.w", "a", "b.1.w", "stage10.x", "stage2.x", "conv1.w", "bn1.w", "conv2.w"]
    assert natural_order(keys) == [
        "b.0.w", "b.1.w", "b.2.w", "b.10.w", "a", "stage10.x", "stage2.x", "conv1.w", "bn1.w", "conv2.w"]
    # siblings that differ only by their numbers are sorted naturally; mixed siblings keep their order
    assert natural_order(["s.stage1.x", "s.stage10.x", "s.stage2.x"]) == ["s.stage1.x", "s.stage2.x", "s.stage10.x"]
    assert natural_order(["s.conv2.w", "s.conv1.w"]) == ["s.conv2.w", "s.conv1.w"]  # not string order: kept
    assert natural_order(["m.x", "m.10", "m.y", "m.9"]) == ["m.x", "m.9", "m.10", "m.y"]


def test_vit_string_sorted_keys_align_block_to_block_after_natural_order():
    torch.manual_seed(0)
    src_model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    tgt_model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    state = {k: v for k, v in sorted(src_model.state_dict().items())}  # as a safetensors file lists them
    assert list(state).index("blocks.10.attn.qkv.weight") < list(state).index("blocks.2.attn.qkv.weight")
    assert natural_order(list(tgt_model.state_dict())) == list(tgt_model.state_dict())  # module order kept
    kinds = {n: type(m).__name__ for n, m in tgt_model.named_modules()}
    target_shapes = shapes_of(tgt_model.state_dict())
    # the file lost module order, so the target is given in the same canonical order
    target = groups_from_keys({k: target_shapes[k] for k in natural_order(sorted(target_shapes))}, kinds)

    source = groups_from_keys({k: tuple(state[k].shape) for k in natural_order(state)})
    matches = align(source, target)

    names = mapping(source, target, matches)
    assert names["blocks.2.attn.qkv"] == "blocks.2.attn.qkv"
    assert names == {n: n for n in names}
    assert len(names) == 2 + 12 * 6 + 2
    # and the copy by local name (a sorted file stores bias before weight) reproduces the source outputs
    tgt_state = tgt_model.state_dict()
    for m in matches:
        src, tgt = source[m.source], target[m.target]
        assert [n for n, _ in src.tensors][:2] == ["bias", "weight"] or src.name == ""
        for src_local, tgt_local in tensor_pairs(src, tgt):
            tgt_state[join(tgt.name, tgt_local)].copy_(state[join(src.name, src_local)])
    tgt_model.load_state_dict(tgt_state)
    assert_same_outputs(src_model, tgt_model, torch.randn(1, 3, 224, 224))

    # without natural_order the same alignment takes the file's order at its word: blocks.10 before blocks.2
    unordered = align(groups_from_keys(shapes_of(state)), target)
    assert mapping(groups_from_keys(shapes_of(state)), target, unordered)["blocks.2.attn.qkv"] == "blocks.10.attn.qkv"


# --------------------------------------------------------------------------------------------------------------
# large inputs


def synthetic(blocks: int, prefix: str, insert_at: int | None = None) -> list[Group]:
    """A transformer-like list: a stem, then `blocks` blocks of 6 groups over 4 widths, then a head."""
    def block(name: str, w: int) -> list[Group]:
        return [
            Group(f"{name}.norm1", (("weight", (w,)), ("bias", (w,)))),
            Group(f"{name}.attn_qkv", (("weight", (3 * w, w)), ("bias", (3 * w,)))),
            Group(f"{name}.attn_proj", (("weight", (w, w)), ("bias", (w,)))),
            Group(f"{name}.norm2", (("weight", (w,)), ("bias", (w,)))),
            Group(f"{name}.mlp_fc1", (("weight", (4 * w, w)), ("bias", (4 * w,)))),
            Group(f"{name}.mlp_fc2", (("weight", (w, 4 * w)), ("bias", (w,)))),
        ]

    groups = [Group(f"{prefix}stem", (("weight", (64, 3, 16, 16)),))]
    for b in range(blocks):
        width = 64 * (1 + 4 * b // blocks)
        groups += block(f"{prefix}blocks.{b}", width)
        if b == insert_at:
            groups += block(f"{prefix}extra", width)
    return groups + [Group(f"{prefix}head", (("weight", (10, 256)), ("bias", (10,))))]


def test_five_thousand_groups_align():
    blocks = 833  # 1 + 833 * 6 + 1 = 5000 groups
    source = synthetic(blocks, "")
    assert len(source) == 5000
    renamed = synthetic(blocks, "model.")
    matches = align(source, renamed)
    assert [m.source for m in matches] == list(range(5000))

    inserted = synthetic(blocks, "model.", insert_at=300)  # inside the second of four widths
    matches = align(source, inserted)
    extra = range(1 + 301 * 6, 1 + 302 * 6)
    assert [inserted[t].name for t in extra][0] == "model.extra.norm1"
    expected = [t if t < extra.start else None if t in extra else t - 6 for t in range(5006)]
    assert [m.source for m in matches] == expected


def test_region_over_the_cell_budget_is_ambiguous(monkeypatch):
    monkeypatch.setattr(structure, "MAX_DP_CELLS", 100)
    source = synthetic(8, "")  # two blocks of each width: only the stem and the head are unique
    target = synthetic(8, "", insert_at=2)
    matches = align(source, target)
    assert [m.how for m in (matches[0], matches[-1])] == ["unique-signature", "unique-signature"]
    inner = matches[1:-1]
    assert all(m.how == "ambiguous" and m.source is None for m in inner)
    # every compatible source of the region is a candidate: the four width-64 norms for the first norm1
    assert inner[0].candidates == [1, 4, 7, 10]
    monkeypatch.setattr(structure, "MAX_DP_CELLS", 160_000)
    assert [m.how for m in align(source, target)[1:13]] == ["aligned"] * 12


def _groups(*names_and_shapes):
    return groups_from_keys({f"{name}.weight": shape for name, shape in names_and_shapes})


def test_order_known_when_only_unique_groups_could_have_moved():
    unique = {(8, 1000)}  # a head found once on each side: matched wherever it stands

    def fixed(group):
        return group.tensors[0][1] in unique

    numbered = _groups(("classifier.1", (8, 1000)), *[(f"features.{i}.0", (8, 8)) for i in (0, 1, 10, 2)])
    assert order_known(natural_order_groups(numbered), fixed)
    staged = _groups(*[(f"stage{i}.conv", (8, 8)) for i in (1, 10, 2)])
    assert order_known(staged, fixed)
    block = _groups(("layer1.0.bn1", (8,)), ("layer1.0.bn2", (8,)), ("layer1.0.conv1", (8, 8)))
    assert not order_known(block, fixed)  # bn1, bn2, conv1: the sort moved modules that are not unique
    own_and_child = groups_from_keys({"norm.weight": (8,), "pos_embed": (1, 8), "blocks.0.norm.weight": (8,)})
    assert not order_known(own_and_child, fixed)  # the root's own tensors, `blocks` and `norm` all matter
    assert order_known(own_and_child, lambda g: g.name != "blocks.0.norm")


def natural_order_groups(groups):
    order = natural_order(g.name for g in groups)
    by_name = {g.name: g for g in groups}
    return [by_name[n] for n in order]


# --------------------------------------------------------------------------------------------------------------
# blocks


def _block_groups(names: list[str], width: int = 8) -> list[Group]:
    """Groups named `names`; "norm"-like names get a norm's signature, the rest a linear layer's (w x w)."""
    out = []
    for name in names:
        local = name.rpartition(".")[2]
        shape = (width,) if "norm" in local or local.startswith("ln") else (width, width)
        out.append(Group(name, (("weight", shape), ("bias", (width,)))))
    return out


def test_block_of_finds_the_deepest_numbered_container():
    containers = {"", "layers", "layers.0", "features", "features.2", "features.2.conv", "features.2.conv.0"}
    assert structure.block_of("layers.0.attn.qkv", containers) == "layers.0"
    assert structure.block_of("features.2.conv.0.1", containers) == "features.2.conv.0"
    assert structure.block_of("features.2.conv.3", containers) == "features.2"
    assert structure.block_of("layers.0", containers) == "layers.0"  # a block's own tensors (layer scale)
    assert structure.block_of("head", containers) == ""


def test_a_norm_registered_after_the_attention_is_not_loaded_into_the_next_block():
    """Hugging Face's ViT order in the file (norms after attention) against timm's in execution order."""
    source = _block_groups([f"layer.{i}.{n}" for i in range(3) for n in ("attn", "proj", "ln_before", "ln_after")])
    target = _block_groups([f"blocks.{i}.{n}" for i in range(3) for n in ("norm1", "qkv", "out", "norm2")])
    matches = align(source, target)
    wrong = [(target[m.target].name, source[m.source].name) for m in matches if m.source is not None
             and source[m.source].name.split(".")[1] != target[m.target].name.split(".")[1]]
    assert wrong, "the positional alignment alone crosses blocks (else this test shows nothing)"
    refused, settled, _ = structure.check_blocks(source, target, matches)
    kept = {target[m.target].name: source[m.source].name for m in matches
            if m.source is not None and m.target not in refused}
    assert all(t.split(".")[1] == s.split(".")[1] for t, s in kept.items()), kept
    # inside a block, which of the two norms is norm1 is unknown from this order: neither loads
    assert not any(t.endswith("norm1") or t.endswith("norm2") for t in kept), kept
    assert {t.rpartition(".")[2] for t in kept} == {"qkv", "out"}
    assert all(refused[j] for j in refused)
    assert not settled


def test_a_block_split_in_two_by_the_other_library_is_not_refused():
    """One source block (conv, norm, conv, norm) is two numbered blocks of the target (torchvision's
    EfficientNet against timm's): consistent, nothing refused."""
    source = _block_groups([f"blocks.{i}.{n}" for i in range(2) for n in ("pw", "norm_a", "dw", "norm_b")])
    target = _block_groups([f"features.{i}.{j}.{n}" for i in range(2) for j in range(2) for n in ("conv", "norm")])
    matches = align(source, target)
    assert all(m.source is not None for m in matches)
    refused, _, _ = structure.check_blocks(source, target, matches)
    assert refused == {}


def test_an_ambiguity_is_settled_in_its_block_only_when_every_other_candidate_belongs_elsewhere():
    """`out` fits `proj` and `stack.0.0`; its block corresponds to `stack.0` only, where the alignment gives
    `stack.0.0` — but `proj` sits in no corresponding block, so nothing says it belongs elsewhere."""
    source = _block_groups(["proj", "stack.0.0", "stack.0.norm1"])
    target = _block_groups(["out", "body.a.norm1"])
    matches = align(source, target)
    _, settled, _ = structure.check_blocks(source, target, matches)
    assert 0 not in settled


def test_the_data_flow_tells_a_shortcut_from_the_main_path():
    """Both blocks have a 1x1 shortcut and a 1x1 first convolution of one shape; the source runs its shortcut
    first, the target last, so position cannot tell them apart. The main path's convolution feeds the 3x3."""
    def group(name, shape):
        return Group(name, (("weight", shape),))

    source = [group("stem", (8, 3, 3, 3)), group("b.proj", (16, 8, 1, 1)), group("b.a", (16, 8, 1, 1)),
              group("b.b", (16, 16, 3, 3)), group("head", (10, 16))]
    target = [group("entry", (8, 3, 3, 3)), group("blk.conv1", (16, 8, 1, 1)), group("blk.conv2", (16, 16, 3, 3)),
              group("blk.down", (16, 8, 1, 1)), group("fc", (10, 16))]
    source_flow = {"stem": {"b.proj", "b.a"}, "b.a": {"b.b"}, "b.b": {"head"}, "b.proj": {"head"}}
    target_flow = {"entry": {"blk.conv1", "blk.down"}, "blk.conv1": {"blk.conv2"}, "blk.conv2": {"fc"},
                   "blk.down": {"fc"}}
    matches = align(source, target)
    open_ = [target[m.target].name for m in matches if m.source is None]
    assert "blk.conv1" in open_ and "blk.down" in open_  # order alone does not settle them
    trusted = [m.target for m in matches if m.source is not None]
    regions = [(list(range(len(source))), list(range(len(target))))]
    settled = structure.settle_by_flow(source, target, matches, source_flow, target_flow, trusted, regions)
    assert {target[t].name: source[s].name for t, s in settled.items()} == {"blk.conv1": "b.a", "blk.down": "b.proj"}
    # with no neighbour to go by, nothing is settled
    assert structure.settle_by_flow(source, target, matches, {}, {}, trusted, regions) == {}
    # nor outside the regions of corresponding blocks
    assert structure.settle_by_flow(source, target, matches, source_flow, target_flow, trusted, []) == {}
