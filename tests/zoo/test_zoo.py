"""The same architecture as two libraries implement it, every direction, as .pth and as .safetensors, no rules.

With the source model given (`source_model=`), both models are traced, so a safetensors file's lost key
order no longer matters, and the transfer is verified by running both. Each case ends `right` (every tensor the oracle places is loaded, and the outputs are equal), or `refused`
(some stay new, each with a note) — and never with a misplaced tensor: each target tensor reported loaded must
hold the source tensor the oracle names (weights are random and distinct, so a wrong one cannot pass). For two
different architectures that share some shapes, every loaded tensor is misplaced by definition.

Run alone: `make zoo` (or `pytest -m zoo`); `ZOO_RESULTS=FILE` writes the table the README shows.
"""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

import torchgraft as tg

from zoo_oracle import load_by, oracle, output

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
IMG = {"x": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))}
#: name -> (source factory, source input, target factory, target input, same architecture)
PAIRS = {
    "resnet18 torchvision -> timm": (lambda: torchvision.models.resnet18(), IMG, lambda: timm.create_model("resnet18"),
                                     IMG, True),
    "resnet18 timm -> torchvision": (lambda: timm.create_model("resnet18"), IMG, lambda: torchvision.models.resnet18(),
                                     IMG, True),
    "mobilenetv2 torchvision -> timm": (lambda: torchvision.models.mobilenet_v2(), IMG,
                                        lambda: timm.create_model("mobilenetv2_100"), IMG, True),
    "mobilenetv2 timm -> torchvision": (lambda: timm.create_model("mobilenetv2_100"), IMG,
                                        lambda: torchvision.models.mobilenet_v2(), IMG, True),
    "mobilenetv3 torchvision -> timm": (lambda: torchvision.models.mobilenet_v3_large(), IMG,
                                        lambda: timm.create_model("mobilenetv3_large_100"), IMG, True),
    "efficientnet-b0 torchvision -> timm": (lambda: torchvision.models.efficientnet_b0(), IMG,
                                            lambda: timm.create_model("efficientnet_b0"), IMG, True),
    "densenet121 torchvision -> timm": (lambda: torchvision.models.densenet121(), IMG,
                                        lambda: timm.create_model("densenet121"), IMG, True),
    "convnext-tiny torchvision -> timm": (lambda: torchvision.models.convnext_tiny(), IMG,
                                          lambda: timm.create_model("convnext_tiny"), IMG, True),
    "convnext-tiny timm -> torchvision": (lambda: timm.create_model("convnext_tiny"), IMG,
                                          lambda: torchvision.models.convnext_tiny(), IMG, True),
    "efficientnet-b0 timm -> torchvision": (lambda: timm.create_model("efficientnet_b0"), IMG,
                                            lambda: torchvision.models.efficientnet_b0(), IMG, True),
    "mobilenetv2 -> mobilenetv3-small (other architecture)": (
        lambda: torchvision.models.mobilenet_v2(), IMG, lambda: torchvision.models.mobilenet_v3_small(), IMG, False),
}
#: Pairs not in the zoo yet, and why: even given the source model, the transfer is not verified, so there is
#: no proven placement to judge a misplacement against. Swin-T: the position-bias tables of a stage's blocks
#: are alike and stay new (timm also moves each patch merging to the start of the next stage), so the blocks
#: diverge; what loads is not misplaced as far as the module order tells, but nothing proves it.
NOT_YET = ("swin-t torchvision -> timm",)
RESULTS: dict[str, dict[str, str]] = {}


def unique(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if key.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


def _validated_oracle(make_a, in_a, make_b, in_b, source):
    a = unique(make_a())
    a.load_state_dict(source)
    b = make_b().eval()
    truth = oracle(a, b, in_b) if in_a is in_b or in_a.keys() == in_b.keys() else None
    if truth is None:
        return None
    load_by(truth, source, b)
    ya, yb = output(a, in_a), output(b, in_b)
    return truth if ya.shape == yb.shape and torch.allclose(ya, yb, atol=1e-4, rtol=1e-4) else None


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "safetensors+source_model"])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_zoo_pair(name, fmt, tmp_path):
    make_a, in_a, make_b, in_b, same = PAIRS[name]
    torch.manual_seed(0)
    source = {k: v.contiguous() for k, v in unique(make_a()).state_dict().items()}
    path = tmp_path / f"source.{fmt.split('+')[0]}"
    if fmt == "pth":
        torch.save(source, path)
    else:
        safetensors.torch.save_file(source, path)
    truth = _validated_oracle(make_a, in_a, make_b, in_b, source) if same else {}
    target = make_b().eval()
    given = make_a() if fmt.endswith("source_model") else None  # traced, and run to verify
    report = tg.transfer(path, target, source_model=given)
    placed = [e for e in report.entries if e.status != "new"]
    assert truth is not None, f"{name}: the oracle does not reproduce the source's output"
    misplaced = [(e.target, e.source) for e in placed if truth.get(e.target) != e.source]
    assert misplaced == [], f"{len(misplaced)} misplaced, e.g. {misplaced[:3]}"
    missing = [k for k in truth if report.entry(k).status == "new"]
    for k in missing:
        assert report.entry(k).note, k
    if not missing and same:
        a = unique(make_a())
        a.load_state_dict(source)
        ya, yb = output(a, in_a), output(target, in_b)
        equal = ya.shape == yb.shape and torch.allclose(ya, yb, atol=1e-4, rtol=1e-4)
        outcome = "right" if equal else "refused"
    else:
        outcome = "refused"
    if given is not None and same:
        assert report.verified is True and outcome == "right", report.verification
        outcome += ", verified"
    RESULTS.setdefault(name, {})[fmt] = f"{outcome} ({len(placed)}/{len(truth) or len(report.entries)})"
    out = os.environ.get("ZOO_RESULTS")
    if out:
        with open(out, "w") as f:
            json.dump(RESULTS, f, indent=1)


def _tv_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=64, mlp_dim=128)


def _timm_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=2,
                             embed_dim=64, mlp_ratio=2.0, global_pool="token")


def _hf_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
                                    hidden_size=64, intermediate_size=128, num_labels=1000, layer_norm_eps=1e-6,
                                    hidden_act="gelu")
    return transformers.ViTForImageClassification(config)


def _hf_resnet50():
    transformers = pytest.importorskip("transformers")
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000))


class TorchBert(torch.nn.Module):
    """A BERT encoder written with torch's own layers, as a hand port is: one fused `in_proj` per attention
    (MultiheadAttention) where Hugging Face has separate query, key and value; other names throughout."""

    def __init__(self, vocab=100, hidden=64, layers=2, heads=2, ffn=128, max_positions=32, types=2):
        super().__init__()
        nn = torch.nn
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_positions, hidden)
        self.token_type = nn.Embedding(types, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        layer = nn.TransformerEncoderLayer(hidden, heads, ffn, dropout=0.0, activation="gelu", batch_first=True,
                                           layer_norm_eps=1e-12)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(torch.zeros_like(input_ids))
        x = self.encoder(self.norm(x))
        return x, torch.tanh(self.pooler(x[:, 0]))


def _hf_bert():
    transformers = pytest.importorskip("transformers")
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=32, type_vocab_size=2, hidden_act="gelu"))


def _hf_beit():
    transformers = pytest.importorskip("transformers")
    return transformers.BeitForImageClassification(transformers.BeitConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2, hidden_size=64,
        intermediate_size=128, use_relative_position_bias=False, use_absolute_position_embeddings=True,
        layer_scale_init_value=0.1, use_mean_pooling=True, num_labels=1000))


def _timm_beit():
    return timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=2, embed_dim=64,
                             mlp_ratio=2.0, use_abs_pos_emb=True, use_rel_pos_bias=False, init_values=0.1)


TOKENS = {"input_ids": torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(1))}
VIT = {"x": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
HF_VIT = {"pixel_values": VIT["x"]}
HF_IMG = {"pixel_values": IMG["x"]}

#: Pairs whose module structures differ (fused against separate attention projections, a position embedding
#: on another container, a block's shortcut registered before its main path or run before it), so the
#: module-by-module oracle
#: cannot follow them. Their oracle is a transfer proven by function: given the source model, it must load
#: every tensor, verify, and make the outputs equal (with distinct random weights, only the right placement
#: does); then the file alone, without the source model, must not misplace anything against it.
BY_FUNCTION = {
    "vit torchvision -> timm": (_tv_vit, VIT, _timm_vit, VIT),
    "vit timm -> torchvision": (_timm_vit, VIT, _tv_vit, VIT),
    "vit timm -> transformers": (_timm_vit, VIT, _hf_vit, HF_VIT),
    "vit transformers -> timm": (_hf_vit, HF_VIT, _timm_vit, VIT),
    "resnet50 torchvision -> transformers": (lambda: torchvision.models.resnet50(), IMG, _hf_resnet50, HF_IMG),
    "resnet50 transformers -> torchvision": (_hf_resnet50, HF_IMG, lambda: torchvision.models.resnet50(), IMG),
    "regnety-400mf torchvision -> timm": (lambda: torchvision.models.regnet_y_400mf(), IMG,
                                          lambda: timm.create_model("regnety_004"), IMG),
    "regnety-400mf timm -> torchvision": (lambda: timm.create_model("regnety_004"), IMG,
                                          lambda: torchvision.models.regnet_y_400mf(), IMG),
    "beit transformers -> timm (no k bias)": (_hf_beit, HF_VIT, _timm_beit, VIT),
    "beit timm -> transformers (no k bias)": (_timm_beit, VIT, _hf_beit, HF_VIT),
    "bert transformers -> torch layers (hand-written)": (_hf_bert, TOKENS, TorchBert, TOKENS),
    "bert torch layers (hand-written) -> transformers": (TorchBert, TOKENS, _hf_bert, TOKENS),
}


#: Known misplacements, kept visible: strict xfails fail the suite the day they are fixed, so they are noticed.
#: None today. (A bare file of Hugging Face's ViT, whose blocks store `layernorm_before`/`layernorm_after` after
#: the attention, misplaced 4 LayerNorms until matches were checked against the block structure.)
KNOWN_MISPLACED: dict[str, str] = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISPLACED[n]))
                                  if n in KNOWN_MISPLACED else n for n in sorted(BY_FUNCTION)])
def test_zoo_pair_by_function(name, tmp_path):
    make_a, in_a, make_b, in_b = BY_FUNCTION[name]
    torch.manual_seed(0)
    a = unique(make_a())
    source = {k: v.contiguous() for k, v in a.state_dict().items()}
    target = make_b().eval()
    proven = tg.transfer(source, target, source_model=make_a())
    ya, yb = output(a, in_a), output(target, in_b)
    assert proven.verified is True and ya.shape == yb.shape and torch.allclose(ya, yb, atol=1e-4, rtol=1e-4)
    assert all(e.status != "new" for e in proven.entries if not e.benign)
    truth = {e.target: e.source for e in proven.entries if e.status != "new"}
    RESULTS.setdefault(name, {})["safetensors+source_model"] = f"right, verified ({len(truth)}/{len(truth)})"
    for fmt in ("pth", "safetensors"):
        path = tmp_path / f"source.{fmt}"
        torch.save(source, path) if fmt == "pth" else safetensors.torch.save_file(source, path)
        report = tg.transfer(path, make_b().eval(), source_model=None)
        placed = [e for e in report.entries if e.status != "new"]
        misplaced = [(e.target, e.source) for e in placed if truth.get(e.target) != e.source]
        assert misplaced == [], f"{fmt}: {len(misplaced)} misplaced, e.g. {misplaced[:3]}"
        assert all(e.note for e in report.entries if e.status == "new")
        done = len(placed) == len(truth)
        RESULTS[name][fmt] = f"{'right' if done else 'refused'} ({len(placed)}/{len(truth)})"
    out = os.environ.get("ZOO_RESULTS")
    if out:
        with open(out, "w") as f:
            json.dump(RESULTS, f, indent=1)


def test_real_minilm_into_a_hand_written_port(minilm_dir):
    """The real BERT MiniLM folder (safetensors, keys sorted; config.json beside it) into `TorchBert`, a port
    with other names and fused attention projections: the source model is found from config.json, both are
    traced, every tensor loads, the transfer is verified, and the port computes what Hugging Face's BertModel
    computes from the same file. Without the folder's config (the file alone), nothing is misplaced."""
    transformers = pytest.importorskip("transformers")
    port = TorchBert(vocab=30522, hidden=384, layers=6, heads=12, ffn=1536, max_positions=512).eval()
    report = tg.transfer(minilm_dir / "model.safetensors", port)
    assert any("config.json" in n for n in report.notes), report.notes
    assert report.verified is True, report.verification
    assert all(e.status != "new" for e in report.entries), [e.target for e in report.entries if e.status == "new"]
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    ids = torch.randint(0, 30522, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = port(ids)[0]
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), float((got - expected).abs().max())
    truth = {e.target: e.source for e in report.entries}
    bare = tg.transfer(minilm_dir / "model.safetensors", TorchBert(30522, 384, 6, 12, 1536, 512).eval(),
                       source_model=None)
    misplaced = [(e.target, e.source) for e in bare.entries if e.status != "new" and truth[e.target] != e.source]
    assert misplaced == []
    assert all(e.note for e in bare.entries if e.status == "new")
