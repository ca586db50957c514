"""Tests for the pure tensor adapters in torchgraft.adapt."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchgraft import layout

from torchgraft.adapt import (
    ADAPTERS,
    adapt_classifier_rows,
    adapt_input_channels,
    copy_rows,
    describe,
    docs_table,
    merge,
    reshape,
    resize_embedding,
    resize_pos_embed,
    split_part,
)
from torchgraft.errors import GraftError

torchvision = pytest.importorskip("torchvision")
timm_layers = pytest.importorskip("timm.layers")


# ---------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def rgb_resnet() -> nn.Module:
    """torchvision's resnet18, randomly initialised (no weight files), in eval mode."""
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def resnet_conv1_weight(rgb_resnet) -> torch.Tensor:
    """The real conv1 weight of torchvision's resnet18."""
    return rgb_resnet.conv1.weight.detach().clone()


def _conv1(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # resnet18's conv1: 7x7, stride 2, padding 3, no bias
    return F.conv2d(x, weight, stride=2, padding=3)


def _forward_with_conv1(model: nn.Module, conv1_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run `model` with its conv1 swapped for a conv taking `conv1_weight.shape[1]` channels (then restored)."""
    original = model.conv1
    conv = nn.Conv2d(conv1_weight.shape[1], 64, kernel_size=7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(conv1_weight)
    model.conv1 = conv
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.conv1 = original


# ---------------------------------------------------------------------------------------------------------------
# registry / describe


def test_registry_names_and_describe():
    assert {name: a.fn for name, a in ADAPTERS.items()} == {
        "reshape": reshape,
        "input_channels": adapt_input_channels,
        "classifier_rows": copy_rows,
        "pos_embed_resize": resize_pos_embed,
        "embedding_resize": resize_embedding,
        "split": split_part,
        "merge": merge,
        **{name: getattr(layout, name) for name in (*layout.LAYOUT_ADAPTERS, "unfold_bn", "bias_into_bn")},
    }
    for name, adapter in ADAPTERS.items():
        assert adapter.name == name
        text = describe(name)
        assert isinstance(text, str) and text and "\n" not in text
        assert inspect.getdoc(adapter.fn), f"{name} must document its rule"
        assert name in docs_table() and all(f"`{arg}`" in docs_table() for arg in adapter.args)


def test_describe_unknown_name():
    with pytest.raises(GraftError, match=r"found adapter name 'nope'; expected one of .*input_channels"):
        describe("nope")


# ---------------------------------------------------------------------------------------------------------------
# input channels


def test_input_channels_grayscale_resnet18_matches_replicated_rgb(rgb_resnet, resnet_conv1_weight):
    w3 = resnet_conv1_weight
    w1 = adapt_input_channels(w3, 1)
    assert w1.shape == (64, 1, 7, 7)
    assert torch.allclose(w1, w3.sum(dim=1, keepdim=True))

    torch.manual_seed(1)
    gray = torch.rand(2, 1, 32, 32)
    rgb = gray.repeat(1, 3, 1, 1)
    torch.testing.assert_close(_conv1(w1, gray), _conv1(w3, rgb), rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        rgb_logits = rgb_resnet(rgb)
    torch.testing.assert_close(_forward_with_conv1(rgb_resnet, w1, gray), rgb_logits, rtol=1e-4, atol=1e-4)


def test_input_channels_six_repeated_rgb_equals_rgb_output(rgb_resnet, resnet_conv1_weight):
    """N a multiple of 3 and the input repeating RGB N/3 times: output equals the 3-channel output exactly."""
    w3 = resnet_conv1_weight
    w6 = adapt_input_channels(w3, 6)
    assert w6.shape == (64, 6, 7, 7)
    torch.testing.assert_close(w6, torch.cat([w3, w3], dim=1) * 0.5)

    torch.manual_seed(2)
    rgb = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(_conv1(w6, rgb.repeat(1, 2, 1, 1)), _conv1(w3, rgb), rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        rgb_logits = rgb_resnet(rgb)
    six_logits = _forward_with_conv1(rgb_resnet, w6, rgb.repeat(1, 2, 1, 1))
    torch.testing.assert_close(six_logits, rgb_logits, rtol=1e-4, atol=1e-4)


def test_input_channels_four_exact_rule(resnet_conv1_weight):
    """N=4, input [R, G, B, R]: output is 3/4 * (conv_RGB(RGB) + conv_R(R)), i.e. only the scale is kept."""
    w3 = resnet_conv1_weight
    w4 = adapt_input_channels(w3, 4)
    assert w4.shape == (64, 4, 7, 7)
    torch.testing.assert_close(w4[:, :3], w3 * 0.75)
    torch.testing.assert_close(w4[:, 3], w3[:, 0] * 0.75)

    torch.manual_seed(4)
    rgb = torch.rand(1, 3, 40, 40)
    rgbr = torch.cat([rgb, rgb[:, :1]], dim=1)
    expected = 0.75 * (_conv1(w3, rgb) + _conv1(w3[:, :1], rgb[:, :1]))
    torch.testing.assert_close(_conv1(w4, rgbr), expected, rtol=1e-5, atol=1e-5)


def test_input_channels_two_takes_first_channels_scaled(resnet_conv1_weight):
    w2 = adapt_input_channels(resnet_conv1_weight, 2)
    torch.testing.assert_close(w2, resnet_conv1_weight[:, :2] * 1.5)


def test_input_channels_same_count_unchanged_copy(resnet_conv1_weight):
    w = adapt_input_channels(resnet_conv1_weight, 3)
    assert torch.equal(w, resnet_conv1_weight)
    assert w.data_ptr() != resnet_conv1_weight.data_ptr()


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 7])
def test_input_channels_matches_timm(resnet_conv1_weight, n):
    from timm.models import adapt_input_conv

    ours = adapt_input_channels(resnet_conv1_weight, n)
    theirs = adapt_input_conv(n, resnet_conv1_weight.clone())
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_input_channels_dtype_preserved(resnet_conv1_weight, dtype, n):
    w = resnet_conv1_weight.to(dtype)
    out = adapt_input_channels(w, n)
    assert out.dtype == dtype
    expected = adapt_input_channels(w.float(), n).to(dtype)
    assert torch.equal(out, expected)


def test_input_channels_errors(resnet_conv1_weight):
    with pytest.raises(GraftError, match=r"found a weight with shape \(10, 3\); expected a convolution weight"):
        adapt_input_channels(torch.zeros(10, 3), 1)
    with pytest.raises(GraftError, match=r"found in_chans=0; expected a positive integer"):
        adapt_input_channels(resnet_conv1_weight, 0)
    with pytest.raises(GraftError, match=r"found in_chans=2.0"):
        adapt_input_channels(resnet_conv1_weight, 2.0)  # type: ignore[arg-type]


def test_input_channels_conv1d_and_conv3d():
    w1d = torch.randn(8, 3, 5)
    torch.testing.assert_close(adapt_input_channels(w1d, 1), w1d.sum(1, keepdim=True))
    w3d = torch.randn(8, 3, 2, 3, 3)
    out = adapt_input_channels(w3d, 6)
    torch.testing.assert_close(out, torch.cat([w3d, w3d], 1) * 0.5)


# ---------------------------------------------------------------------------------------------------------------
# classifier rows

SOURCE = ["cat", "golden_retriever", "Tabby", "zebra", "car", "Car"]
TARGET = ["Golden Retriever", "horse", " tabby ", "CAR", "ZEBRA"]


def _source_weight(rows: int = len(SOURCE), features: int = 5) -> torch.Tensor:
    return torch.arange(rows * features, dtype=torch.float32).reshape(rows, features) + 100.0


def test_classifier_rows_weight():
    src = _source_weight()
    init = torch.full((len(TARGET), 5), -1.0)
    out, copied = adapt_classifier_rows(src, SOURCE, TARGET, init)
    assert copied == 3
    assert torch.equal(out[0], src[1])  # Golden Retriever <- golden_retriever
    assert torch.equal(out[1], init[1])  # horse: not in source
    assert torch.equal(out[2], src[2])  # " tabby " <- Tabby
    assert torch.equal(out[3], init[3])  # CAR: "car" and "Car" are ambiguous in the source
    assert torch.equal(out[4], src[3])  # ZEBRA <- zebra
    assert torch.equal(init, torch.full((len(TARGET), 5), -1.0)), "init must not be modified"


def test_classifier_rows_bias_and_fc_layer():
    torch.manual_seed(5)
    src_fc = nn.Linear(5, len(SOURCE))
    tgt_fc = nn.Linear(5, len(TARGET))
    bias, copied = adapt_classifier_rows(src_fc.bias, SOURCE, TARGET, tgt_fc.bias)
    assert copied == 3
    assert bias.shape == (len(TARGET),)
    assert not bias.requires_grad
    for j, i in {0: 1, 2: 2, 4: 3}.items():
        assert bias[j] == src_fc.bias[i]
    for j in (1, 3):
        assert bias[j] == tgt_fc.bias[j]


def test_classifier_rows_ambiguous_in_target_not_copied():
    src = _source_weight(2)
    init = torch.zeros(3, 5)
    out, copied = adapt_classifier_rows(src, ["dog", "cat"], ["dog", "Dog", "cat"], init)
    assert copied == 1
    assert torch.equal(out[:2], init[:2])
    assert torch.equal(out[2], src[1])


def test_classifier_rows_no_overlap_and_whitespace_normalisation():
    src = _source_weight(2)
    init = torch.zeros(2, 5)
    out, copied = adapt_classifier_rows(src, ["a", "b"], ["c", "d"], init)
    assert copied == 0 and torch.equal(out, init)
    out, copied = adapt_classifier_rows(src, ["sea  lion", "b"], ["Sea_Lion", "tabby cat"], init)
    assert copied == 1 and torch.equal(out[0], src[0]) and torch.equal(out[1], init[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_classifier_rows_dtype_of_init(dtype):
    src = _source_weight()
    init = torch.zeros(len(TARGET), 5, dtype=dtype)
    out, _ = adapt_classifier_rows(src, SOURCE, TARGET, init)
    assert out.dtype == dtype
    assert torch.equal(out[0], src[1].to(dtype))
    out, _ = adapt_classifier_rows(src.to(dtype), SOURCE, TARGET, init)
    assert out.dtype == dtype and torch.equal(out[0], src[1].to(dtype))


def test_classifier_rows_errors():
    src = _source_weight()
    init = torch.zeros(len(TARGET), 5)
    with pytest.raises(GraftError, match=r"source tensor of shape \(6, 5\) but 5 source class names"):
        adapt_classifier_rows(src, SOURCE[:5], TARGET, init)
    with pytest.raises(GraftError, match=r"target init tensor of shape \(5, 5\) but 4 target class names"):
        adapt_classifier_rows(src, SOURCE, TARGET[:4], init)
    with pytest.raises(GraftError, match=r"source rows of shape \(5,\) and target rows of shape \(7,\)"):
        adapt_classifier_rows(src, SOURCE, TARGET, torch.zeros(len(TARGET), 7))
    with pytest.raises(GraftError, match=r"found source_classes of type str; expected a sequence"):
        adapt_classifier_rows(src, "abcdef", TARGET, init)
    with pytest.raises(GraftError, match=r"non-string entries in target_classes"):
        adapt_classifier_rows(src, SOURCE, [0, 1, 2, 3, 4], init)  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------------------------
# position embeddings


def _timm_resample(posemb, new_size, prefix, old_size=None):
    return timm_layers.resample_abs_pos_embed(
        posemb, new_size=list(new_size), old_size=old_size, num_prefix_tokens=prefix, antialias=False
    )


@pytest.mark.parametrize("prefix", [0, 1, 4])
@pytest.mark.parametrize("new_grid", [(16, 16), (10, 10), (12, 20)])
def test_pos_embed_matches_timm(prefix, new_grid):
    torch.manual_seed(6)
    posemb = torch.randn(1, prefix + 14 * 14, 192)
    ours = resize_pos_embed(posemb, new_grid, num_prefix_tokens=prefix)
    theirs = _timm_resample(posemb, new_grid, prefix)
    assert ours.shape == (1, prefix + new_grid[0] * new_grid[1], 192)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.equal(ours[:, :prefix], posemb[:, :prefix])


def test_pos_embed_int_length_and_new_grid_keyword():
    torch.manual_seed(7)
    posemb = torch.randn(1, 1 + 14 * 14, 192)
    expected = _timm_resample(posemb, (16, 16), 1)
    torch.testing.assert_close(resize_pos_embed(posemb, 1 + 16 * 16), expected, rtol=0, atol=0)
    torch.testing.assert_close(resize_pos_embed(posemb, None, new_grid=(16, 16)), expected, rtol=0, atol=0)
    torch.testing.assert_close(resize_pos_embed(posemb, 257, new_grid=(16, 16)), expected, rtol=0, atol=0)


def test_pos_embed_non_square_old_grid_matches_timm():
    torch.manual_seed(8)
    posemb = torch.randn(1, 1 + 12 * 20, 64)
    ours = resize_pos_embed(posemb, (14, 14), old_grid=(12, 20))
    theirs = _timm_resample(posemb, (14, 14), 1, old_size=[12, 20])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_pos_embed_same_grid_is_identity(prefix):
    posemb = torch.randn(1, prefix + 14 * 14, 32)
    out = resize_pos_embed(posemb, (14, 14), num_prefix_tokens=prefix)
    assert torch.equal(out, posemb)
    assert out.data_ptr() != posemb.data_ptr()
    assert torch.equal(resize_pos_embed(posemb, prefix + 196, num_prefix_tokens=prefix), posemb)


def test_pos_embed_real_vit_parameter():
    """A real timm ViT's pos_embed, resized for a larger image, loads into the larger ViT and runs."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    torch.manual_seed(14)
    vit = VisionTransformer(img_size=56, **cfg)  # 7x7 grid
    target = VisionTransformer(img_size=64, **cfg).eval()  # 8x8 grid
    out = resize_pos_embed(vit.pos_embed, target.pos_embed.shape[1])
    assert out.shape == target.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert not out.requires_grad
    with torch.no_grad():
        target.pos_embed.copy_(out)
        assert target(torch.rand(1, 3, 64, 64)).shape == (1, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pos_embed_dtype_preserved(dtype):
    torch.manual_seed(9)
    posemb = torch.randn(1, 1 + 14 * 14, 48).to(dtype)
    out = resize_pos_embed(posemb, (16, 16))
    assert out.dtype == dtype
    assert torch.equal(out, _timm_resample(posemb, (16, 16), 1))
    assert torch.equal(out[:, :1], posemb[:, :1])


def test_pos_embed_other_mode():
    torch.manual_seed(10)
    posemb = torch.randn(1, 1 + 8 * 8, 16)
    out = resize_pos_embed(posemb, (16, 16), mode="bilinear")
    theirs = timm_layers.resample_abs_pos_embed(posemb, [16, 16], interpolation="bilinear", antialias=False)
    torch.testing.assert_close(out, theirs, rtol=0, atol=0)
    out = resize_pos_embed(posemb, (16, 16), mode="nearest")
    assert out.shape == (1, 257, 16)


def test_pos_embed_errors():
    posemb = torch.randn(1, 1 + 14 * 14, 8)
    with pytest.raises(GraftError, match=r"found 195 grid tokens .* which is not a square"):
        resize_pos_embed(posemb, (16, 16), num_prefix_tokens=2)
    with pytest.raises(GraftError, match=r"found a position embedding with shape \(196, 8\)"):
        resize_pos_embed(torch.randn(196, 8), (16, 16))
    with pytest.raises(GraftError, match=r"found old_grid=\(10, 10\) \(100 tokens\)"):
        resize_pos_embed(posemb, (16, 16), old_grid=(10, 10))
    with pytest.raises(GraftError, match=r"new length of 200 tokens, i.e. 199 grid tokens"):
        resize_pos_embed(posemb, 200)
    with pytest.raises(GraftError, match=r"disagree"):
        resize_pos_embed(posemb, (16, 16), new_grid=(15, 15))
    with pytest.raises(GraftError, match=r"found neither new_len_or_grid nor new_grid"):
        resize_pos_embed(posemb, None)
    with pytest.raises(GraftError, match=r"found mode='cubic'"):
        resize_pos_embed(posemb, (16, 16), mode="cubic")
    with pytest.raises(GraftError, match=r"found new_len_or_grid=\(16, 0\)"):
        resize_pos_embed(posemb, (16, 0))
    with pytest.raises(GraftError, match=r"found num_prefix_tokens=-1"):
        resize_pos_embed(posemb, (16, 16), num_prefix_tokens=-1)


# ---------------------------------------------------------------------------------------------------------------
# embeddings


def test_embedding_grow_mean_init():
    torch.manual_seed(11)
    emb = nn.Embedding(10, 6)
    out = resize_embedding(emb.weight, 13)
    assert out.shape == (13, 6)
    assert not out.requires_grad
    assert torch.equal(out[:10], emb.weight.detach())
    mean = emb.weight.detach().mean(0)
    for row in out[10:]:
        torch.testing.assert_close(row, mean)


def test_embedding_grow_from_init():
    torch.manual_seed(12)
    old = torch.randn(10, 6)
    init = torch.randn(13, 6)
    out = resize_embedding(old, 13, init=init)
    assert torch.equal(out[:10], old)
    assert torch.equal(out[10:], init[10:])


def test_embedding_shrink_and_same():
    old = torch.randn(10, 6)
    out = resize_embedding(old, 7)
    assert torch.equal(out, old[:7])
    out = resize_embedding(old, 7, init=torch.zeros(7, 6))
    assert torch.equal(out, old[:7])
    same = resize_embedding(old, 10)
    assert torch.equal(same, old) and same.data_ptr() != old.data_ptr()


def test_embedding_real_hf_like_table():
    """A 1-D table (e.g. a resized LM-head bias) works too."""
    bias = torch.arange(4, dtype=torch.float32)
    out = resize_embedding(bias, 6)
    assert torch.equal(out, torch.tensor([0.0, 1.0, 2.0, 3.0, 1.5, 1.5]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_embedding_dtype_preserved(dtype):
    torch.manual_seed(13)
    old = torch.randn(10, 6).to(dtype)
    out = resize_embedding(old, 12)
    assert out.dtype == dtype
    assert torch.equal(out[:10], old)
    assert torch.equal(out[10], old.float().mean(0).to(dtype))
    out = resize_embedding(old, 12, init=torch.ones(12, 6))
    assert out.dtype == dtype and torch.equal(out[10:], torch.ones(2, 6, dtype=dtype))


def test_embedding_errors():
    old = torch.randn(10, 6)
    with pytest.raises(GraftError, match=r"found init of shape \(3, 6\); expected .* shape \(12, 6\)"):
        resize_embedding(old, 12, init=torch.zeros(3, 6))
    with pytest.raises(GraftError, match=r"found num_rows=-1; expected a non-negative integer"):
        resize_embedding(old, -1)
    with pytest.raises(GraftError, match=r"found an empty embedding table"):
        resize_embedding(torch.zeros(0, 6), 4)
