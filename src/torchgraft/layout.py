"""Layouts of other frameworks, turned into PyTorch's: pure tensor functions, registered as named adapters.

Keras, TensorFlow and Flax store a convolution kernel channels-last (`(*K, in, out)`) and a dense kernel as
`(in, out)`; PyTorch holds `(out, in, *K)` and `(out, in)`. A reader of such a file presents each tensor under
its PyTorch name and shape and records which of these adapters turns the stored value into it, so the plan and
the report say, per tensor, how it was laid out. Each function is exact: it only moves numbers.

Two more adapters are the plan's, for a BatchNorm an exporter removed or a conv bias it kept before one:

    unfold_bn      the conv takes the folded kernel; the BatchNorm becomes the identity carrying the folded bias
    bias_into_bn   a conv bias followed by a BatchNorm moves into the norm's running mean (target conv has none)

Both are exact in eval mode: `BN(conv(x) + b)` with `running_mean' = running_mean - b` is `BN(conv(x))`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["channels_last_kernel", "dense_kernel", "flatten_channels_last", "gate_order", "flax_heads",
           "unfold_bn", "bias_into_bn", "LAYOUT_ADAPTERS"]

KERNEL_KINDS = ("conv", "depthwise", "transposed")


def _as_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    return torch.from_numpy(value.copy() if not value.flags.writeable else value)


def channels_last_kernel(kernel: Any, kind: str = "conv") -> Tensor:
    """A channels-last kernel as PyTorch holds it, for 1-, 2- and 3-D convolutions.

    - `conv`: `(*K, in, out)` -> `(out, in, *K)` (Keras Conv1D/2D/3D, TF, Flax `nn.Conv`);
    - `depthwise`: `(*K, channels, multiplier)` -> `(channels * multiplier, 1, *K)` (Keras DepthwiseConv2D);
    - `transposed`: `(*K, out, in)` -> `(in, out, *K)` (Keras Conv2DTranspose into `nn.ConvTranspose2d`).
    """
    k = _as_tensor(kernel)
    if kind not in KERNEL_KINDS or k.dim() < 3:
        raise ValueError(f"channels_last_kernel: kind {kind!r} on shape {list(k.shape)}; expected one of "
                         f"{KERNEL_KINDS} on a kernel of 3 to 5 dimensions")
    spatial = list(range(k.dim() - 2))
    a, b = k.dim() - 2, k.dim() - 1
    if kind in ("conv", "transposed"):  # both swap the last two axes; the names say what they hold
        return k.permute(b, a, *spatial).contiguous()
    channels, mult = k.shape[a], k.shape[b]
    return k.permute(a, b, *spatial).reshape(channels * mult, 1, *k.shape[:a]).contiguous()


def dense_kernel(kernel: Any) -> Tensor:
    """A dense kernel `(in, out)` as `nn.Linear` holds it, `(out, in)`."""
    k = _as_tensor(kernel)
    if k.dim() != 2:
        raise ValueError(f"dense_kernel: shape {list(k.shape)}; expected (in, out)")
    return k.t().contiguous()


def flatten_channels_last(kernel: Any, shape: Sequence[int]) -> Tensor:
    """A dense kernel after a channels-last Flatten, for a model that flattens channels first.

    `shape` is what the Flatten received, channels last (`[H, W, C]`): the kernel `(H*W*C, out)` becomes
    `(out, C*H*W)`, each input column moved to where a `(C, H, W)` flatten puts that value."""
    k = _as_tensor(kernel)
    shape = [int(d) for d in shape]
    if k.dim() != 2 or k.shape[0] != math.prod(shape) or len(shape) < 2:
        raise ValueError(f"flatten_channels_last: kernel {list(k.shape)} after a Flatten of {shape}; expected "
                         "(prod(shape), out) with the channels last")
    out = k.shape[1]
    grid = k.reshape(*shape, out)  # (H, W, C, out)
    order = [len(shape) - 1, *range(len(shape) - 1), len(shape)]
    return grid.permute(*order).reshape(-1, out).t().contiguous()


def gate_order(weight: Any, order: Sequence[int], transpose: bool = False) -> Tensor:
    """Gate blocks of a recurrent layer's weight reordered along its output dimension.

    `order[i]` is the source block that becomes block `i` (Keras GRU `z, r, h` into torch's `r, z, n` is
    `[1, 0, 2]`); `transpose` first turns a `(in, gates * units)` kernel into `(gates * units, in)`."""
    w = _as_tensor(weight)
    if transpose:
        w = w.t()
    gates = len(order)
    if w.shape[0] % gates or sorted(order) != list(range(gates)):
        raise ValueError(f"gate_order: {list(w.shape)} with order {list(order)}; expected a first dimension "
                         "divisible by the number of gates and a permutation")
    blocks = w.reshape(gates, w.shape[0] // gates, *w.shape[1:])
    return blocks[list(order)].reshape(w.shape).contiguous()


def flax_heads(kernel: Any, kind: str) -> Tensor:
    """A Flax multi-head attention kernel as one `nn.Linear`: `in` `(D, H, hd)` -> `(H*hd, D)`; `out`
    `(H, hd, D)` -> `(D, H*hd)`; a per-head bias `(H, hd)` -> `(H*hd,)`."""
    k = _as_tensor(kernel)
    if k.dim() == 2 and kind == "in":
        return k.reshape(-1).contiguous()
    if k.dim() != 3 or kind not in ("in", "out"):
        raise ValueError(f"flax_heads: kind {kind!r} on shape {list(k.shape)}; expected 'in' (D, H, hd) or "
                         "'out' (H, hd, D)")
    if kind == "in":
        return k.reshape(k.shape[0], -1).t().contiguous()
    return k.reshape(-1, k.shape[2]).t().contiguous()


#: What each tensor of a BatchNorm becomes when the norm was folded into the conv before it: the identity
#: (`(x - 0) / sqrt(1 - eps + eps) * 1 + bias`) carrying the folded bias.
UNFOLD_ROLES = ("weight", "bias", "running_mean", "running_var")


def unfold_bn(current: Tensor, role: str, eps: float, bias: Tensor | None = None) -> Tensor:
    """One tensor of a BatchNorm that becomes the identity carrying `bias` (zeros when the conv had none)."""
    if role not in UNFOLD_ROLES:
        raise ValueError(f"unfold_bn: role {role!r}; expected one of {UNFOLD_ROLES}")
    if role == "bias" and bias is not None:
        return _as_tensor(bias).reshape(current.shape).to(current.dtype)
    value = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0 - eps}[role]
    return torch.full(current.shape, value, dtype=current.dtype)


def bias_into_bn(running_mean: Any, bias: Any) -> Tensor:
    """A BatchNorm's running mean once the conv bias before it is removed: `BN(y + b)` is `BN'(y)` with
    `running_mean' = running_mean - b` (eval mode)."""
    return (_as_tensor(running_mean) - _as_tensor(bias)).contiguous()


def _folded_bias(src: list[Tensor], role: str) -> Tensor | None:
    """The conv's folded bias for the norm's `bias`; a step's source is the conv's bias, or its kernel (more
    than one dimension) when the exporter dropped a zero bias."""
    return src[0] if role == "bias" and src and src[0].dim() == 1 else None


def _kernel_sentence(a: dict[str, Any], s: tuple[int, ...], t: tuple[int, ...]) -> str:
    return {"conv": "channels-last kernel (*K, in, out) -> (out, in, *K)",
            "depthwise": "depthwise kernel (*K, C, mult) -> (C*mult, 1, *K)",
            "transposed": "transposed-conv kernel (*K, out, in) -> (in, out, *K)"}.get(a.get("kind"), "kernel")


def _register() -> tuple[Any, ...]:
    from torchgraft.adapt import Adapter

    return (
        Adapter("channels_last_kernel",
                "a channels-last conv kernel (Keras, TF, Flax) as PyTorch's (out, in, *K); depthwise and "
                "transposed kinds too",
                channels_last_kernel, ("kind",),
                run=lambda src, cur, a: channels_last_kernel(src[0], a["kind"]),
                sentence=_kernel_sentence, exact=True),
        Adapter("dense_kernel", "a dense kernel (in, out) transposed to nn.Linear's (out, in)",
                dense_kernel, (),
                run=lambda src, cur, a: dense_kernel(src[0]),
                sentence=lambda a, s, t: "dense kernel (in, out) -> (out, in)", exact=True),
        Adapter("flatten_channels_last",
                "a dense kernel after a channels-last Flatten: transposed, its inputs reordered for a "
                "channels-first flatten",
                flatten_channels_last, ("shape",),
                run=lambda src, cur, a: flatten_channels_last(src[0], a["shape"]),
                sentence=lambda a, s, t: f"dense kernel after a channels-last Flatten of {a['shape']}: "
                                         "inputs reordered channels-first",
                exact=True),
        Adapter("gate_order", "a recurrent layer's gate blocks reordered (and a kernel transposed) to PyTorch's "
                "gate order", gate_order, ("order", "transpose"),
                run=lambda src, cur, a: gate_order(src[0], a["order"], a["transpose"]),
                sentence=lambda a, s, t: f"gates reordered {a['order']}" + (", transposed" if a["transpose"]
                                                                            else ""),
                exact=True),
        Adapter("flax_heads", "a Flax multi-head kernel (D, H, hd) or (H, hd, D) as one nn.Linear weight",
                flax_heads, ("kind",),
                run=lambda src, cur, a: flax_heads(src[0], a["kind"]),
                sentence=lambda a, s, t: f"Flax per-head kernel ({a['kind']}) -> {list(t)}", exact=True),
        Adapter("unfold_bn",
                "a BatchNorm folded into the conv before it: the norm becomes the identity carrying the folded "
                "bias (exact in eval mode)",
                unfold_bn, ("role", "eps"),
                run=lambda src, cur, a: unfold_bn(cur, a["role"], a["eps"], _folded_bias(src, a["role"])),
                sentence=lambda a, s, t: ("folded BatchNorm: the identity carrying the conv's folded bias"
                                          if a["role"] == "bias" else "folded BatchNorm: the identity"),
                needs_init=True),
        Adapter("bias_into_bn",
                "a conv bias before a BatchNorm moved into the norm's running mean (mean - bias; exact in eval "
                "mode), for a target conv without a bias",
                bias_into_bn, (),
                run=lambda src, cur, a: bias_into_bn(src[0], src[1]),
                sentence=lambda a, s, t: "running mean minus the conv bias before it (the target conv has none)"),
    )


LAYOUT_ADAPTERS = ("channels_last_kernel", "dense_kernel", "flatten_channels_last", "gate_order", "flax_heads")
"""The adapters readers record per tensor; `unfold_bn` and `bias_into_bn` are the plan's."""
