"""What every reader of another framework's file shares: lazy imports of its extra, tensors presented in
PyTorch's names and layout (converted when read, each recording its layout adapter), and the `Source` made
from them.

A reader (`keras_reader`, `onnx_reader`, `jax_reader`, `dcp_reader`) lists `ForeignTensor`s in the source's
execution order (Keras' layer order, ONNX's op order) and calls `foreign_source`. The matcher then sees names
and shapes as for a PyTorch file; `Source.layouts` says, per tensor, which adapter of `torchgraft.layout` laid
the stored value out, and the plan and report carry it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch

from torchgraft.errors import CheckpointError
from torchgraft.io.read import Source, TensorInfo

__all__ = ["ForeignTensor", "foreign_source", "need", "as_torch"]


def need(module: str, extra: str, what: str) -> ModuleType:
    """`module`, imported now; when it is not installed, one line naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CheckpointError(f"{what} needs {module.split('.')[0]}, which is not installed; expected the "
                              f"'{extra}' extra. Run: pip install 'torchgraft[{extra}]'") from None


@dataclass(frozen=True)
class ForeignTensor:
    """One tensor of another framework's file, as the matcher sees it."""

    name: str
    """PyTorch-style key: the module path and PyTorch's local name (`conv1.weight`, `bn.running_var`)."""
    origin: str
    """Its name in the file (`conv1/kernel`, `onnx::Conv_538`)."""
    read: Callable[[], Any]
    """Reads the stored value (a torch tensor or a NumPy array, in the file's layout) when called."""
    shape: tuple[int, ...]
    """The shape once laid out as PyTorch holds it."""
    dtype: str
    layout: str | None = None
    """The adapter of `torchgraft.layout` that lays the stored value out (None: stored as PyTorch holds it)."""
    args: dict[str, Any] = field(default_factory=dict)


_NUMPY_TO_TORCH = {"float64": "float64", "float32": "float32", "float16": "float16", "int64": "int64",
                   "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool"}


def torch_dtype_name(dtype: Any) -> str:
    """The torch dtype name of a NumPy dtype (or a name), or a CheckpointError for one torch has not."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name in ("bfloat16",):
        return name
    if name not in _NUMPY_TO_TORCH:
        raise CheckpointError(f"a tensor of dtype {name}; expected a numeric dtype torch has. Convert it first.")
    return _NUMPY_TO_TORCH[name]


def as_torch(value: Any) -> torch.Tensor:
    """A stored value (NumPy array, scalar or torch tensor) as a torch tensor."""
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.name == "bfloat16" or array.dtype.kind == "V":  # ml_dtypes' bfloat16
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array).copy()
    return torch.from_numpy(array)


class _Converted(Mapping[str, torch.Tensor]):
    """Tensors read and laid out when touched, each once."""

    def __init__(self, entries: Sequence[ForeignTensor]) -> None:
        self._entries = {e.name: e for e in entries}

    def __getitem__(self, key: str) -> torch.Tensor:
        from torchgraft.adapt import ADAPTERS

        e = self._entries[key]
        value = as_torch(e.read())
        if e.layout is not None:
            value = ADAPTERS[e.layout].run([value], value, e.args)
        if tuple(value.shape) != e.shape:
            raise CheckpointError(f"{e.origin}: read as {list(value.shape)}, but the file's description gives "
                                  f"{list(e.shape)}; expected them equal. The file is corrupt.")
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def foreign_source(path: str, fmt: str, entries: Sequence[ForeignTensor], *,
                   metadata: dict[str, Any] | None = None, modules: Mapping[str, str] | None = None,
                   module_attrs: Mapping[str, Mapping[str, Any]] | None = None,
                   runner: Callable[[], torch.nn.Module] | None = None, folded_bn: bool = False,
                   foldable_bias: Mapping[str, str] | None = None,
                   flow: Mapping[str, set[str]] | None = None,
                   joined: set[tuple[str, str]] | None = None, order_known: bool = True,
                   notes: Sequence[str] = ()) -> Source:
    """A `Source` of another framework's tensors, in the order given (the source's execution order).

    Args:
        modules: module path -> the source framework's class name (`Conv2D`, `BatchNormalization`).
        module_attrs: module path -> attributes its target module should take (a Keras BatchNormalization's
            `{"eps": 0.001, "momentum": 0.01}`); the plan carries them and says where they differ.
        runner: builds a `torchgraft.verify.ForeignRunner` that runs the source in its own runtime, so
            verification compares outputs.
        folded_bn: an exporter may have folded BatchNorms into the convs before them (ONNX): a target conv
            without a bias followed by a BatchNorm nothing places gets the folded kernel, the norm the identity.
        foldable_bias: conv bias key -> the BatchNorm module it feeds alone: folded into that norm's running
            mean when the target conv has no bias.
        flow, joined: the data flow between modules when the file describes its graph (producer -> consumers;
            the edges through an addition), used as a traced source model's would be.
        order_known: False when the entries' order is not the source's execution order: no alignment by
            position is trusted then (only names and shapes found once on each side).
        notes: what the reader could not know (no epsilon in the file), carried into the plan's notes.
        flow, joined: the data flow between the presented modules, when the file describes the graph (a Keras
            config): producer -> consumers, and the edges that pass only through an addition (`match.trace`'s
            `Trace.flow`/`joined`); the structure stage then settles look-alike modules by their neighbours.
    """
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise CheckpointError(f"{path}: two tensors would both be {e.name!r} (one is {e.origin!r}); expected "
                                  "unique names. The file's layer names collide; report it with the file.")
        seen.add(e.name)
    info = {e.name: TensorInfo(tuple(int(d) for d in e.shape), e.dtype) for e in entries}
    meta = dict(metadata or {})
    return Source(path=path, format=fmt, tensors=_Converted(entries), info=info, metadata=meta,
                  modules=dict(modules) if modules else None,
                  origins={e.name: e.origin for e in entries},
                  layouts={e.name: (e.layout, dict(e.args)) for e in entries if e.layout is not None},
                  module_attrs={k: dict(v) for k, v in (module_attrs or {}).items()},
                  runner=runner, folded_bn=folded_bn, foldable_bias=dict(foldable_bias or {}),
                  flow={k: set(v) for k, v in flow.items()} if flow is not None else None,
                  joined=set(joined or ()), order_known=order_known, notes=list(notes))
