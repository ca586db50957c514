"""JAX weights into PyTorch: a timm ViT exported in the documented vit_jax and big_vision `.npz` namings and as a
Flax `.msgpack` tree, read back into timm through the matcher, with equal outputs.

The export follows the naming timm's own JAX loader reads (`vision_transformer._load_weights`): kernels
channels-last / (in, out), attention kernels per head (D, H, hd), LayerNorm `scale`; big_vision's variant
stacks the blocks on a leading axis (`Transformer/encoderblock/...`)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import torchgraft as tg


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10).eval()
    with torch.no_grad():  # nothing left at its initial value, so a swapped norm or bias shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _n(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()


def _blocks(model, big_vision: bool) -> list[dict[str, np.ndarray]]:
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision else \
        ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    out = []
    for block in model.blocks:
        heads = block.attn.num_heads
        d = block.attn.qkv.weight.shape[1]
        q, k, v = block.attn.qkv.weight.chunk(3)
        qb, kb, vb = block.attn.qkv.bias.chunk(3)
        b = {"LayerNorm_0/scale": _n(block.norm1.weight), "LayerNorm_0/bias": _n(block.norm1.bias)}
        for name, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            b[f"{mha}/{name}/kernel"] = _n(w.t().reshape(d, heads, -1))
            b[f"{mha}/{name}/bias"] = _n(bias.reshape(heads, -1))
        b[f"{mha}/out/kernel"] = _n(block.attn.proj.weight.t().reshape(heads, -1, d))
        b[f"{mha}/out/bias"] = _n(block.attn.proj.bias)
        b[f"{ln2}/scale"], b[f"{ln2}/bias"] = _n(block.norm2.weight), _n(block.norm2.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            b[f"{mlp}/Dense_{r}/kernel"], b[f"{mlp}/Dense_{r}/bias"] = _n(fc.weight.t()), _n(fc.bias)
        out.append(b)
    return out


def export(model, big_vision: bool = False) -> dict[str, np.ndarray]:
    """The model as a flat `{path: array}` in the export's naming, in its module order."""
    w = {"embedding/kernel": _n(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),
         "embedding/bias": _n(model.patch_embed.proj.bias), "cls": _n(model.cls_token)}
    pos = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
    w[pos] = _n(model.pos_embed)
    blocks = _blocks(model, big_vision)
    if big_vision:
        for name in blocks[0]:
            w[f"Transformer/encoderblock/{name}"] = np.stack([b[name] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            w.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"] = _n(model.norm.weight), _n(model.norm.bias)
    w["head/kernel"], w["head/bias"] = _n(model.head.weight.t()), _n(model.head.bias)
    return {("params/" if big_vision else "") + k: v for k, v in w.items()}


def _same_outputs(a, b) -> float:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


@pytest.mark.parametrize("big_vision", [False, True], ids=["vit_jax", "big_vision-scanned"])
@pytest.mark.parametrize("sorted_keys", [False, True], ids=["module-order", "sorted"])
def test_npz_export_into_timm(tmp_path, big_vision, sorted_keys):
    original = _vit()
    arrays = export(original, big_vision)
    if sorted_keys:
        arrays = dict(sorted(arrays.items()))
    np.savez(tmp_path / "vit.npz", **arrays)
    target = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10)
    report = tg.transfer(tmp_path / "vit.npz", target, strict=True)
    assert not report.unused_source
    assert report.entry("blocks.0.attn.qkv.weight").status == "loaded"
    assert report.entry("patch_embed.proj.weight").layout == "channels_last_kernel"
    assert report.entry("blocks.3.mlp.fc1.weight").layout == "dense_kernel"
    assert _same_outputs(target, original) < 1e-4


def test_msgpack_tree_into_timm(tmp_path):
    msgpack = pytest.importorskip("msgpack")
    original = _vit()
    tree: dict = {}
    for path, array in export(original).items():  # the nested tree Flax serialises, arrays as its extension
        node = tree
        *scopes, leaf = ["params", *path.split("/")]
        for s in scopes:
            node = node.setdefault(s, {})
        node[leaf] = msgpack.ExtType(1, msgpack.packb((list(array.shape), array.dtype.name, array.tobytes())))
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack.packb(tree))
    target = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10)
    report = tg.transfer(tmp_path / "flax_model.msgpack", target, strict=True)
    assert tg.load(tmp_path / "flax_model.msgpack").format == "flax-msgpack"
    assert report.entry("blocks.11.attn.proj.weight").layout == "flax_heads"
    assert _same_outputs(target, original) < 1e-4


def test_cli_reads_an_npz(tmp_path):
    np.savez(tmp_path / "vit.npz", **export(_vit()))
    graft = [sys.executable, "-m", "torchgraft.cli"]
    shown = subprocess.run([*graft, "inspect", str(tmp_path / "vit.npz"), "--all"], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "250"})
    assert shown.returncode == 0 and "format npz" in shown.stdout
    row = next(line for line in shown.stdout.splitlines()
               if "Transformer.encoderblock_0.MultiHeadDotProductAttention_1.query.weight" in line)
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel (flax_heads)" in row
    assert "[192, 192]" in row
    out = tmp_path / "vit.safetensors"
    done = subprocess.run([*graft, "transfer", str(tmp_path / "vit.npz"), "--model", "timm:vit_tiny_patch16_224",
                           "--model-kwargs", '{"img_size": 64, "num_classes": 10}', "--out", str(out), "--strict"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.exists()


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_bad_npz_is_one_error_line(tmp_path, damage):
    path = tmp_path / "vit.npz"
    if damage == "truncated":
        np.savez(path, **export(_vit()))
        path.write_bytes(path.read_bytes()[:5000])
    else:
        np.savez(path, weights=np.array([{"a": 1}], dtype=object))
    graft = [sys.executable, "-m", "torchgraft.cli"]
    done = subprocess.run([*graft, "transfer", str(path), "--model", "timm:vit_tiny_patch16_224", "--out",
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in done.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_diff_names_the_export_against_the_model(tmp_path):
    np.savez(tmp_path / "vit.npz", **export(_vit()))
    done = subprocess.run([sys.executable, "-m", "torchgraft.cli", "diff", str(tmp_path / "vit.npz"),
                           "timm:vit_tiny_patch16_224"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "only in A" in done.stdout and "Transformer.encoderblock" in done.stdout


def test_a_missing_extra_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "flax_model.msgpack").write_bytes(b"\x80")
    monkeypatch.setitem(sys.modules, "msgpack", None)  # as if it were not installed
    with pytest.raises(tg.errors.CheckpointError, match=r"pip install 'torchgraft\[flax\]'"):
        tg.load(tmp_path / "flax_model.msgpack")


def test_a_damaged_msgpack_is_one_error(tmp_path):
    pytest.importorskip("msgpack")
    (tmp_path / "flax_model.msgpack").write_bytes(b"\x85\xa6params\x81")
    with pytest.raises(tg.errors.CheckpointError, match="not a readable msgpack"):
        tg.load(tmp_path / "flax_model.msgpack")


def test_big_vision_export_into_a_hugging_face_vit(tmp_path):
    """Another library's ViT: transformers keeps query, key and value apart, as the export does."""
    from transformers import ViTConfig, ViTForImageClassification

    original = _vit()
    np.savez(tmp_path / "vit.npz", **export(original, big_vision=True))
    config = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                       image_size=64, patch_size=16, num_labels=10, layer_norm_eps=1e-6)
    target = ViTForImageClassification(config).eval()
    report = tg.transfer(tmp_path / "vit.npz", target, strict=True)
    assert not report.unused_source
    q = report.entry("vit.layers.5.attention.q_proj.weight")
    assert q.source == "Transformer.encoderblock_5.MultiHeadDotProductAttention_0.query.weight"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((target(pixel_values=x).logits - original.eval()(x)).abs().max()) < 1e-4
