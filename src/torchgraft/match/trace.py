"""Execution order: the order in which a model's forward pass first uses each of its tensors.

Registration order (`state_dict` order) is not the order a model computes in: Hugging Face's ResNet registers
each block's `shortcut` before its main path, its ViT registers `layernorm_before` after the attention, and
parameters owned by a container (`cls_token`, `pos_embed`) sit at the top of the state dict but are used after
the patch embedding. Matching aligns modules in execution order, so it traces both models when it can.

`execution_order(model)` runs the model once on the meta device — no memory, no arithmetic — through
`torch.func.functional_call` with meta copies of its tensors, so the model itself is never changed (a model
already on the meta device runs as it is), and a `TorchFunctionMode` records every tensor of the state dict the
first time an operation reads it (a parameter used in a container's own forward included), and which module
feeds which (`Trace.flow`). Operations whose result shape is obvious (linear layers, norms, activations,
element-wise arithmetic) are not run at all: the mode makes an empty tensor of that shape. The input comes from
the model's metadata (`example_inputs`) or is given. When the forward pass cannot run on the meta device (it
reads a value, or needs another input), the result says why and matching falls back to registration order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["Trace", "execution_order", "example_inputs", "reorder"]


@dataclass
class Trace:
    """What tracing found: the state dict keys in execution order, or why there is none."""

    order: list[str] | None
    """Every state dict key: those the forward pass used, in the order it first used them, each unused one
    right after the key registered before it."""
    note: str
    """How the order was found, or why it could not be ("traced on the meta device with input (1, 3, 224, 224)")."""
    flow: dict[str, set[str]] | None = None
    """Data flow between modules: module -> the modules whose tensors were used on a value computed from its
    output (through operations without tensors of their own: activations, additions, reshapes)."""
    joined: set[tuple[str, str]] = field(default_factory=set)
    """The (producer, consumer) edges of `flow` that pass only through a meeting of values (a residual
    addition): a block's input reaches the next block that way, its main path's last module directly too."""

    @property
    def ok(self) -> bool:
        return self.order is not None


def _empty(shape: Any, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device)


def _like_input(input: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
    return _empty(input.shape, input)


def _activation(input: torch.Tensor, *args: Any, inplace: bool = False, **__: Any) -> torch.Tensor:
    inplace = inplace or bool(args and args[-1] is True)
    return input if inplace else _empty(input.shape, input)


def _dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    return input if inplace else _empty(input.shape, input)


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _empty((*input.shape[:-1], weight.shape[0]), input)


def _embedding(input: torch.Tensor, weight: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
    return _empty((*input.shape, weight.shape[-1]), weight)


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Broadcast shape of two shapes (torch.broadcast_shapes, without its cost of ~0.2 ms a call)."""
    if len(a) < len(b):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + b
    out = tuple(x if y == 1 else y for x, y in zip(a, b))
    if any(x not in (1, y) for x, y in zip(a, out)):
        return tuple(torch.broadcast_shapes(a, b))  # raises the error torch would
    return out


def _elementwise(a: Any, b: Any, *_: Any, **__: Any) -> torch.Tensor:
    tensors = [t for t in (a, b) if isinstance(t, torch.Tensor)]
    shape = tuple(tensors[0].shape) if len(tensors) == 1 else _broadcast(tuple(a.shape), tuple(b.shape))
    return _empty(shape, tensors[0], torch.result_type(a, b))


#: Operations whose result has an obvious shape, so the trace makes an empty tensor of that shape instead of
#: running them: on the meta device torch computes most shapes through Python decompositions, from 0.1 to 1
#: millisecond an operation, which was most of a trace's time. (In-place forms keep their input.)
_SHAPE_ONLY: dict[Any, Any] = {
    F.linear: _linear,
    F.layer_norm: _like_input,
    F.batch_norm: _like_input,
    F.group_norm: _like_input,
    F.embedding: _embedding,
    F.relu: _activation, F.silu: _activation, F.hardswish: _activation, F.hardsigmoid: _activation,
    F.relu6: _activation, F.gelu: _like_input, torch.sigmoid: _like_input, torch.Tensor.sigmoid: _like_input,
    torch.tanh: _like_input, F.dropout: _dropout,
    **dict.fromkeys((torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.mul,
                     torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.sub, torch.Tensor.sub,
                     torch.Tensor.__sub__), _elementwise),
}


class _FirstUse(TorchFunctionMode):
    """Records the first use of each state tensor, and which modules' outputs flow into which modules.

    Every value computed is tagged with the modules it comes from: those whose tensors the operation used; for
    an operation without tensors of its own, its input's tag when it has one input (an activation, a reshape),
    or, where several values meet (an addition, a product, a concatenation), the union of the tags of the
    inputs that are not themselves such a meeting — so a residual stream is tagged with the branches just added
    to it, not with every block before it, and the tags stay small.
    """

    def __init__(self, keys: Mapping[int, str]) -> None:
        super().__init__()
        self.keys = keys
        self.order: list[str] = []
        self._seen: set[str] = set()
        self.direct: set[tuple[str, str]] = set()  # (producer, consumer) edges
        self.through_meeting: set[tuple[str, str]] = set()
        self._tags: dict[int, tuple[frozenset[str], bool]] = {}  # id of a value -> (its modules, a meeting?)
        self._alive: list[torch.Tensor] = []  # tagged values kept, so that no id is reused while tracing

    def _visit(self, value: Any, used: set[str], inputs: dict[int, tuple[frozenset[str], bool]]) -> None:
        if isinstance(value, torch.Tensor):
            key = self.keys.get(id(value))
            if key is None:
                tag = self._tags.get(id(value))
                if tag is not None:
                    inputs[id(tag)] = tag
                return
            used.add(key.rpartition(".")[0])
            if key not in self._seen:
                self._seen.add(key)
                self.order.append(key)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._visit(item, used, inputs)
        elif isinstance(value, dict):
            for item in value.values():
                self._visit(item, used, inputs)

    def _tag(self, value: Any, tag: tuple[frozenset[str], bool]) -> None:
        if isinstance(value, torch.Tensor):
            if id(value) not in self.keys:
                self._tags[id(value)] = tag
                self._alive.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._tag(item, tag)

    def flow(self) -> dict[str, set[str]]:
        """Producer -> its consumers, over both kinds of edge."""
        out: dict[str, set[str]] = {}
        for producer, consumer in self.direct | self.through_meeting:
            out.setdefault(producer, set()).add(consumer)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        kwargs = kwargs or {}
        used: set[str] = set()
        inputs: dict[int, tuple[frozenset[str], bool]] = {}
        self._visit(args, used, inputs)
        self._visit(kwargs, used, inputs)
        shortcut = _SHAPE_ONLY.get(func)
        out = shortcut(*args, **kwargs) if shortcut is not None else func(*args, **kwargs)
        if used:
            for modules, met in inputs.values():
                (self.through_meeting if met else self.direct).update((p, m) for p in modules - used for m in used)
            self._tag(out, (frozenset(used), False))
        elif len(inputs) == 1:
            self._tag(out, next(iter(inputs.values())))
        elif inputs:
            fresh = [modules for modules, met in inputs.values() if not met]
            self._tag(out, (frozenset().union(*(fresh or [m for m, _ in inputs.values()])), True))
        return out


#: Attributes under which models and their patch embeddings keep the image size they were built for
#: (timm's `PatchEmbed.img_size`, torchvision's ViT `image_size`): they win over a default input size.
IMAGE_SIZE_ATTRIBUTES = ("img_size", "image_size")


def _pair(size: Any) -> tuple[int, ...]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _config_of(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def example_inputs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> tuple[tuple, dict]:
    """`(args, kwargs)` for one forward pass on the meta device, from what the model says about its input.

    A given `input_shape` wins. Otherwise: a Hugging Face config (`image_size` and `num_channels` give
    `pixel_values`; a `vocab_size` gives `input_ids` of 8 tokens); timm's `pretrained_cfg["input_size"]`;
    torchvision's `image_size` attribute (ViT); else the first convolution's input channels at 224 x 224, a
    linear layer's input features, or 8 token ids when an embedding comes first.
    """
    if input_shape is not None:
        return (torch.empty(*input_shape, device="meta"),), {}
    config = _config_of(model)
    if config is not None:
        size = getattr(config, "image_size", None)
        channels = getattr(config, "num_channels", None)
        if size is not None and channels is not None:
            h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
            return (), {"pixel_values": torch.empty(1, channels, h, w, device="meta")}
        if getattr(config, "vocab_size", None):
            return (), {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}
    first = next((m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding))),
                 None)
    size = next((getattr(m, name) for m in model.modules() for name in IMAGE_SIZE_ATTRIBUTES
                 if isinstance(getattr(m, name, None), (int, tuple, list))), None)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        channels, *spatial = cfg["input_size"]
        return (torch.empty(1, channels, *(_pair(size) if size is not None else spatial), device="meta"),), {}
    if isinstance(first, nn.modules.conv._ConvNd):
        size = 224 if size is None else size
        spatial = (size,) * (first.weight.dim() - 2) if isinstance(size, int) else tuple(size)
        return (torch.empty(1, first.in_channels, *spatial, device="meta"),), {}
    if isinstance(first, nn.Linear):
        return (torch.empty(1, first.in_features, device="meta"),), {}
    if isinstance(first, nn.Embedding):  # a text model written by hand: token ids
        return (torch.zeros(1, 8, dtype=torch.long, device="meta"),), {}
    raise ValueError("no input shape is known for this model (no convolution, linear layer or embedding to read "
                     "it from)")


def execution_order(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> Trace:
    """The model's state dict keys in the order its forward pass first uses them (see the module docstring)."""
    state = model.state_dict(keep_vars=True)
    try:
        args, kwargs = example_inputs(model, input_shape)
    except ValueError as exc:
        return Trace(None, f"not traced: {exc}; aligned in registration order (pass an input shape)")
    copies: dict[int, torch.Tensor] = {}  # id of a tensor -> its meta copy (tied tensors share one)
    tensors: dict[str, torch.Tensor] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    on_meta = all(t.is_meta for _, t in named)  # built on the meta device (`transfer(build=...)`): run as it is
    for name, t in named:
        if id(t) not in copies:
            copies[id(t)] = t if on_meta else torch.empty(t.shape, dtype=t.dtype, device="meta")
        tensors[name] = copies[id(t)]
    keys: dict[int, str] = {}  # id of a meta copy -> the first state dict key that holds it
    for key, t in state.items():
        if id(t) in copies:
            keys.setdefault(id(copies[id(t)]), key)
    modes = [(m, m.training) for m in model.modules()]
    shape = tuple(next(iter([*args, *kwargs.values()])).shape)
    recorder = _FirstUse(keys)
    try:
        model.eval()
        with torch.no_grad(), recorder:
            if on_meta:
                model(*args, **kwargs)
            else:
                torch.func.functional_call(model, tensors, args, kwargs, tie_weights=True, strict=False)
    except Exception as exc:  # any failure of a forward pass on the meta device: fall back, and say why
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        return Trace(None, f"not traced: the forward pass does not run on the meta device with input {shape} "
                           f"({type(exc).__name__}: {first_line}); aligned in registration order")
    finally:
        for m, training in modes:
            m.training = training
    used = recorder.order
    return Trace(reorder(list(state), used), f"traced on the meta device with input {shape}: {len(used)} of "
                                             f"{len(state)} tensors used", recorder.flow(),
                 recorder.through_meeting - recorder.direct)


def reorder(registered: list[str], used: list[str]) -> list[str]:
    """`used` (keys in first-use order) with every key it lacks placed right after the key registered before
    it (`num_batches_tracked` after its BatchNorm's `running_var`); leading unused keys come first."""
    position = {k: i for i, k in enumerate(used)}
    after: dict[str | None, list[str]] = {}
    anchor: str | None = None
    for key in registered:
        if key in position:
            anchor = key
        else:
            after.setdefault(anchor, []).append(key)
    out = list(after.get(None, []))
    for key in used:
        out.append(key)
        out.extend(after.get(key, []))
    return out
