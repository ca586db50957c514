"""Keras weights: Keras 3 `.keras` archives and `.weights.h5` files, and legacy Keras 2 `.h5` files, as PyTorch
names and layout. HDF5 is read with h5py, data only: no layer, lambda or config from the file is ever built
(only `--verify` builds the model, with Keras itself, in `KerasRunner`).

Where the names and the order come from:

- `.keras` (zip: `config.json` + `model.weights.h5`): the config lists the layers in execution order, with
  their class and settings; the weights file stores each layer's variables by index under
  `layers/<snake_case class>[_N]/vars/<i>` (Keras' `saving_lib`), so the config names them.
- `.weights.h5` alone has no config: layers are named by the layer name Keras 3.x records on `vars` (else by
  their h5 paths), their class read from the path (`conv2d_3` is a `Conv2D`); each class's order is Keras'
  (its counters), the classes' interleaving approximate (`_file_order`). No epsilon, momentum or data flow.
- legacy `.h5` (`model.save("x.h5")`, Keras 2's `save_weights`): `layer_names` gives the order,
  `weight_names` each variable's name; a whole-model file's `model_config` gives classes and settings.

Each layer becomes PyTorch modules and local names (`KERAS_VARS`), with the layout adapter
(`torchgraft.layout`) that turns Keras' layout into PyTorch's:

    Conv1D/2D/3D kernel (*K, in, out)           weight, `channels_last_kernel` conv (in every data_format)
    DepthwiseConv1D/2D kernel (*K, C, mult)     weight, `channels_last_kernel` depthwise
    Conv*Transpose kernel (*K, out, in)         weight, `channels_last_kernel` transposed
    SeparableConv*                              `<layer>.depthwise.weight` + `<layer>.pointwise.weight/bias`
    Dense kernel (in, out)                      weight, `dense_kernel`; `flatten_channels_last` after a Flatten
                                                of a channels-last (H, W, C) tensor
    BatchNormalization gamma/beta/moving_*      weight/bias/running_mean/running_var; eps, momentum = 1 - m
    LayerNormalization gamma/beta               weight/bias; eps
    Embedding embeddings                        weight
    LSTM kernel/recurrent_kernel/bias           weight_ih_l0/weight_hh_l0 (gates i,f,c,o = torch's i,f,g,o),
                                                bias_ih_l0; bias_hh_l0 zeros (Keras has one bias; torch adds both)
    GRU (reset_after=True)                      gates z,r,h -> torch's r,z,n; bias rows -> bias_ih_l0/bias_hh_l0
    SimpleRNN                                   weight_ih_l0/weight_hh_l0/bias_ih_l0; bias_hh_l0 zeros
    Bidirectional(LSTM/GRU/SimpleRNN)           one bidirectional layer: the backward one as `..._reverse`

A GRU with `reset_after=False`, or a recurrent layer with activations `nn.LSTM`/`nn.GRU` do not have, has no
PyTorch equivalent and is refused. A conv with a bias whose only consumer is a BatchNormalization (Keras'
ResNet50) is offered as `foldable_bias`: the plan moves the bias into the norm's running mean when the target
conv has none. A layer of a class not listed keeps its variables under their own names, laid out as stored.

With a config, the Source also carries the graph's data flow (`Source.flow`), so the structure stage tells
look-alike modules apart by their neighbours (a ResNet block's 1x1 shortcut from its last 1x1 conv).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchgraft.errors import CheckpointError
from torchgraft.io.frameworks import ForeignTensor, foreign_source, need, torch_dtype_name
from torchgraft.io.read import Source
from torchgraft.verify import ForeignRunner

__all__ = ["read_keras", "read_h5", "KerasRunner", "KERAS_VARS"]

_CONV = {"Conv1D", "Conv2D", "Conv3D", "Convolution1D", "Convolution2D", "Convolution3D"}
_DEPTHWISE = {"DepthwiseConv1D", "DepthwiseConv2D"}
_TRANSPOSED = {"Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "Convolution2DTranspose",
               "Convolution3DTranspose"}
_SEPARABLE = {"SeparableConv1D", "SeparableConv2D", "SeparableConvolution1D", "SeparableConvolution2D"}
_RECURRENT = {"LSTM", "GRU", "SimpleRNN"}
_MODELS = {"Functional", "Sequential", "Model"}
#: Layers that pass a tensor on with its layout unchanged, between a Flatten and the Dense that reads it.
_PASS_THROUGH = {"Dropout", "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "GaussianNoise",
                 "GaussianDropout", "AlphaDropout", "SpatialDropout1D", "SpatialDropout2D", "ActivityRegularization"}

#: Keras class -> its variables in the order Keras saves them (trainable first, then the rest), each with the
#: config flag that must be true for it to exist (None: always there).
KERAS_VARS: dict[str, tuple[tuple[str, str | None], ...]] = {
    **{c: (("kernel", None), ("bias", "use_bias")) for c in _CONV | _DEPTHWISE | _TRANSPOSED},
    **{c: (("depthwise_kernel", None), ("pointwise_kernel", None), ("bias", "use_bias")) for c in _SEPARABLE},
    "Dense": (("kernel", None), ("bias", "use_bias")),
    "BatchNormalization": (("gamma", "scale"), ("beta", "center"), ("moving_mean", None),
                           ("moving_variance", None)),
    "LayerNormalization": (("gamma", "scale"), ("beta", "center")),
    "Embedding": (("embeddings", None),),
    **{c: (("kernel", None), ("recurrent_kernel", None), ("bias", "use_bias")) for c in _RECURRENT},
    "PReLU": (("alpha", None),),
}
_GATES = {"LSTM": [0, 1, 2, 3], "GRU": [1, 0, 2], "SimpleRNN": [0]}
_TORCH_ACTIVATIONS = {"LSTM": ("tanh", "sigmoid"), "GRU": ("tanh", "sigmoid")}


def _snake(name: str) -> str:
    """Keras' `naming.to_snake_case`: the name of a layer's group in a Keras 3 weights file."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


_CLASS_OF_SNAKE = {_snake(c): c for c in [*KERAS_VARS, *_MODELS, "InputLayer", "Flatten"]}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


# ---- what the file holds, layer by layer --------------------------------------------------------------------


@dataclass
class _Var:
    name: str | None  # Keras' variable name (kernel, gamma ...), None when neither the config nor the file says
    origin: str
    dataset: Any  # an h5py Dataset: shape and dtype now, data when read


@dataclass
class _Layer:
    module: str  # PyTorch module path
    cls: str | None
    config: dict[str, Any]
    vars: list[_Var] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # module paths of the layers it reads, same model
    input_shape: list[int | None] | None = None
    order_only: bool = False  # no config: `inputs` is the layer before it in the file, not a known edge


def _h5py() -> Any:
    return need("h5py", "h5", "reading a Keras HDF5 file")


def _open_h5(path: Path, source: Any, what: str) -> Any:
    h5py = _h5py()
    try:
        return h5py.File(source, "r")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {what} is not a readable HDF5 file ({_one_line(exc)}); expected Keras "
                              "weights. It is truncated or corrupt; save it again.") from None


def _subgroups(group: Any) -> list[str]:
    h5py = _h5py()
    return [k for k in group if group.get(k, getclass=True) is h5py.Group]


def _index_vars(vars_group: Any) -> list[Any]:
    """The datasets `0, 1, ...` of a Keras 3 `vars` group, in index order."""
    names = [k for k in vars_group if k.isdigit()]
    return [vars_group[k] for k in sorted(names, key=int)]


def _layer_inputs(entry: dict[str, Any]) -> list[str]:
    """Names of the layers whose outputs a config entry reads (Keras 3's `__keras_tensor__` history or Keras 2's
    `[name, node, tensor, kwargs]` lists)."""
    found: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if x.get("class_name") == "__keras_tensor__":
                history = (x.get("config") or {}).get("keras_history") or []
                if history and isinstance(history[0], str):
                    found.append(history[0])
                return
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            if len(x) >= 3 and isinstance(x[0], str) and isinstance(x[1], int):
                found.append(x[0])
                return
            for v in x:
                walk(v)

    walk(entry.get("inbound_nodes") or [])
    return found


def _tensor_shape(entry: dict[str, Any]) -> list[int | None] | None:
    """The shape of what a layer received: its build config, or the Keras 3 tensor it was called on."""
    shape = (entry.get("build_config") or {}).get("input_shape")
    if isinstance(shape, list) and all(isinstance(d, (int, type(None))) for d in shape):
        return shape
    for node in entry.get("inbound_nodes") or []:
        if isinstance(node, dict):
            for arg in node.get("args") or []:
                if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
                    return list((arg.get("config") or {}).get("shape") or []) or None
    return None


def _module_name(name: str) -> str:
    return name.replace(".", "_").replace("/", "_")


def _config_layers(model: dict[str, Any], group: Any, prefix: str, path: Path) -> Iterator[_Layer]:
    """The layers of a Keras 3 model config, in the config's order, with their variables from `group` (the
    model's group in the weights file): `layers/<snake class>[_N]/vars/<i>`, nested models recursed into."""
    cls = model.get("class_name")
    layers = (model.get("config") or {}).get("layers") or []
    if cls == "Sequential" and layers and layers[0].get("class_name") == "InputLayer":
        layers = layers[1:]  # Sequential.layers leaves out its InputLayer, and so does the weights file
    used: dict[str, int] = {}
    names = [(entry.get("name") or (entry.get("config") or {}).get("name") or f"layer_{i}") for i, entry in
             enumerate(layers)]
    by_name = {n: prefix + _module_name(n) for n in names}
    previous: str | None = None
    for entry, name in zip(layers, names):
        layer_cls = entry.get("class_name")
        snake = _snake(str(layer_cls))
        used[snake] = used.get(snake, -1) + 1
        key = snake if used[snake] == 0 else f"{snake}_{used[snake]}"
        sub = group.get(f"layers/{key}") if group is not None and "layers" in group else None
        config = entry.get("config") or {}
        if layer_cls in _MODELS and config.get("layers") is not None:
            yield from _config_layers(entry, sub, f"{by_name[name]}.", path)
            previous = by_name[name]
            continue
        layer = _Layer(by_name[name], layer_cls, config)
        if cls == "Sequential":
            layer.inputs = [previous] if previous else []
        else:
            layer.inputs = [by_name[n] for n in _layer_inputs(entry) if n in by_name]
        layer.input_shape = _tensor_shape(entry)
        previous = layer.module
        if sub is not None and layer_cls == "Bidirectional":
            for direction in ("forward", "backward"):
                cell = sub.get(f"{direction}_layer/cell/vars")
                names = ("kernel", "recurrent_kernel", "bias")
                for i, dataset in enumerate(_index_vars(cell) if cell is not None else []):
                    layer.vars.append(_Var(f"{direction}/{names[i]}" if i < 3 else None, dataset.name.lstrip("/"),
                                           dataset))
        elif sub is not None:
            where = sub.get("cell") if layer_cls in _RECURRENT and "cell" in sub else sub
            stored = _index_vars(where["vars"]) if "vars" in where else []
            expected = _expected_vars(layer_cls, config)
            if expected is not None and len(expected) != len(stored):
                expected = None  # the config does not say what these are: keep the file's indices
            for i, dataset in enumerate(stored):
                layer.vars.append(_Var(expected[i] if expected else None, dataset.name.lstrip("/"), dataset))
        yield layer


def _expected_vars(cls: str | None, config: dict[str, Any]) -> list[str] | None:
    spec = KERAS_VARS.get(cls or "")
    if spec is None:
        return None
    return [n for n, flag in spec if flag is None or config.get(flag, True)]


def _file_layers(f: Any, path: Path) -> tuple[list[_Layer], str]:
    """The layers of a Keras 3 weights file without a config: each group holding `vars`, named by the layer name
    Keras recorded on it (when unique; else by its path), its class read from the path (`conv2d_3` is a
    Conv2D), in the order `_file_order` finds. A Bidirectional's two layers are one layer."""
    found: dict[str, list[tuple[str | None, Any]]] = {}  # h5 path of the layer -> (variable name, dataset)
    kinds: dict[str, str] = {}

    def visit(group: Any, at: str) -> None:
        for k in _subgroups(group):
            child = group[k]
            if k != "vars":
                visit(child, f"{at}/{k}" if at else k)
                continue
            stored = _index_vars(child)
            wrapped = re.match(r"^(.*)/(forward|backward)_layer/cell$", at)
            if stored and wrapped:
                names = ("kernel", "recurrent_kernel", "bias")
                found.setdefault(wrapped.group(1), []).extend(
                    (f"{wrapped.group(2)}/{names[i]}" if i < 3 else None, d) for i, d in enumerate(stored))
                kinds[wrapped.group(1)] = "Bidirectional"
            elif stored:
                found[at] = [(None, d) for d in stored]

    visit(f, "")
    paths = list(found)
    order, how = _file_order(f, paths)
    layers = []
    named = [_recorded_name(f, paths[i]) for i in order]
    unique = all(named) and len(set(named)) == len(named)
    for i, name in zip(order, named):
        at = paths[i]
        parts = [p for p in at.split("/") if p not in ("layers", "")]
        if parts and parts[-1] == "cell":  # a recurrent layer's variables sit in its cell
            parts = parts[:-1]
        cls = kinds.get(at) or (_CLASS_OF_SNAKE.get(re.sub(r"_\d+$", "", parts[-1])) if parts else None)
        module = _module_name(name) if unique else ".".join(_module_name(q) for q in parts) or "model"
        datasets = [d for _, d in found[at]]
        config = _config_from_shapes(cls, datasets)
        expected = _expected_vars(cls, config)
        if expected is not None and len(expected) != len(datasets):
            expected = None
        inputs = [layers[-1].module] if layers else []
        stored_vars = [_Var(given or (expected[j] if expected else None), d.name.lstrip("/"), d)
                       for j, (given, d) in enumerate(found[at])]
        layers.append(_Layer(module, cls, config, stored_vars, inputs, order_only=True))
    return layers, how


def _file_order(f: Any, paths: list[str]) -> tuple[list[int], str]:
    """The layers' order in a weights file without a config, and how it was found. Keras names each layer's
    group by its class and a counter in the model's layer order (`conv2d`, `conv2d_1`, ...), so each class's
    order is exact; how the classes interleave the file does not record. They are interleaved by where HDF5
    put each layer's group (groups are made in layer order, but HDF5 reuses freed space), which is right for
    plain stacks and approximate for deep models: the structure stage then finds less, never more."""
    h5py = _h5py()

    def counter(path: str) -> tuple[str, int]:
        m = re.match(r"^(.*?)(?:_(\d+))?$", path)
        return (m.group(1), int(m.group(2) or 0)) if m else (path, 0)

    try:
        where = [h5py.h5o.get_info(f[p or "/"].id).addr if p else 0 for p in paths]
    except (AttributeError, KeyError, ValueError):
        where = list(range(len(paths)))
    queues: dict[str, list[int]] = {}
    for i in sorted(range(len(paths)), key=lambda i: counter(paths[i])):
        queues.setdefault(counter(paths[i])[0], []).append(i)
    order: list[int] = []
    while any(queues.values()):
        head = min((q for q in queues.values() if q), key=lambda q: where[q[0]])
        order.append(head.pop(0))
    return order, ("no config: each class in Keras' layer order, the classes interleaved by where the file "
                   "holds them (approximate for branched models; a .keras or whole-model .h5 gives the order)")


def _recorded_name(f: Any, at: str) -> str:
    """The layer name Keras 3.x records on a layer's `vars` group (its cell's parent, for a recurrent layer)."""
    layer = at.rsplit("/", 1)[0] if at.endswith("/cell") else at
    group = f.get(f"{layer}/vars") if layer else f.get("vars")
    return _text(group.attrs.get("name", "")) if group is not None else ""


def _config_from_shapes(cls: str | None, stored: list[Any]) -> dict[str, Any]:
    """What a layer's settings must have been, from its variables alone (a weights file without a config)."""
    n = len(stored)
    if cls in _CONV | _DEPTHWISE | _TRANSPOSED | {"Dense"}:
        return {"use_bias": n == 2}
    if cls in _SEPARABLE:
        return {"use_bias": n == 3}
    if cls in _RECURRENT:
        config: dict[str, Any] = {"use_bias": n == 3}
        if cls == "GRU" and n == 3:
            config["reset_after"] = len(stored[2].shape) == 2
        return config
    if cls == "BatchNormalization" and n == 4:
        return {"scale": True, "center": True}
    if cls == "LayerNormalization" and n == 2:
        return {"scale": True, "center": True}
    return {}


def _legacy_layers(f: Any, path: Path) -> tuple[list[_Layer], dict[str, Any] | None]:
    """The layers of a legacy `.h5`: `layer_names` in order, `weight_names` per layer; classes and settings from
    `model_config` when the file has one."""
    root = f["model_weights"] if "model_weights" in f else f
    model_config = _json_attr(f, "model_config", path)
    names = [_text(n) for n in root.attrs["layer_names"]]
    configs: dict[str, dict[str, Any]] = {}
    inputs: dict[str, list[str]] = {}
    shapes: dict[str, Any] = {}
    sequential = False

    def collect(model: dict[str, Any], prefix: str) -> None:
        nonlocal sequential
        entries = (model.get("config") or {}).get("layers") or []
        if prefix == "":
            sequential = model.get("class_name") == "Sequential"
        previous = None
        for entry in entries:
            name = entry.get("name") or (entry.get("config") or {}).get("name")
            if not name:
                continue
            configs[prefix + name] = entry
            shapes[prefix + name] = _tensor_shape(entry)
            if model.get("class_name") == "Sequential":
                inputs[prefix + name] = [prefix + previous] if previous else []
            else:
                inputs[prefix + name] = [prefix + n for n in _layer_inputs(entry)]
            previous = name
            if entry.get("class_name") in _MODELS:
                collect(entry, prefix + name + "/")

    if model_config is not None:
        collect(model_config, "")
    layers: list[_Layer] = []
    for name in names:
        if name not in root:
            raise CheckpointError(f"{path}: layer {name!r} is listed in layer_names but has no group; expected one "
                                  "per layer. The file is truncated or corrupt; save it again.")
        group = root[name]
        weight_names = [_text(w) for w in group.attrs.get("weight_names", [])]
        entry = configs.get(name, {})
        by_module: dict[str, _Layer] = {}
        for w in weight_names:
            if w not in group:
                raise CheckpointError(f"{path}: weight {name}/{w} is listed in weight_names but not stored; "
                                      "expected every listed weight. The file is truncated or corrupt.")
            parts = w.split("/")
            var = parts[-1].split(":")[0]
            direction = next((d for d in ("forward", "backward") for q in parts[:-1] if q.startswith(d + "_")), None)
            if entry.get("class_name", "Bidirectional" if direction else None) == "Bidirectional" and direction:
                var = f"{direction}/{var}"
            inner = _inner_layer(name, parts[:-1], entry.get("class_name"))
            key = name if inner is None else f"{name}/{inner}"
            sub_entry = configs.get(key, entry if inner is None else {})
            module = _module_name(name) if inner is None else f"{_module_name(name)}.{_module_name(inner)}"
            if module not in by_module:
                cls = sub_entry.get("class_name")
                by_module[module] = _Layer(module, cls, sub_entry.get("config") or {})
                scope = "" if inner is None else f"{name}/"
                by_module[module].inputs = [".".join(_module_name(q) for q in i.split("/"))
                                            for i in inputs.get(key, []) if i.startswith(scope)]
                by_module[module].input_shape = shapes.get(key)
            by_module[module].vars.append(_Var(var, f"{name}/{w}", group[w]))
        if not by_module:
            layers.append(_Layer(_module_name(name), entry.get("class_name"), entry.get("config") or {},
                                 inputs=[_module_name(i) for i in inputs.get(name, [])],
                                 input_shape=shapes.get(name)))
        for layer in by_module.values():
            if layer.cls is None and any(v.name.startswith(("forward/", "backward/")) for v in layer.vars):
                layer.cls = "Bidirectional"
            elif layer.cls is None:
                layer.cls = _class_from_vars(layer.vars)
                layer.config = {**_config_from_shapes(layer.cls, [v.dataset for v in layer.vars]), **layer.config}
            layers.append(layer)
    if sequential:  # a Sequential's layers read the one before; the file lists them in that order
        for before, layer in zip(layers, layers[1:]):
            if not layer.inputs:
                layer.inputs = [before.module]
    return layers, model_config


def _inner_layer(layer: str, scope: list[str], cls: str | None) -> str | None:
    """The sublayer of a nested model a legacy weight belongs to (None: the layer itself, or its cell)."""
    if not scope:
        return None
    if layer in scope:
        rest = scope[scope.index(layer) + 1:]
        if not rest or rest[0].endswith("cell") or rest[0].startswith(("forward_", "backward_")) \
                or cls not in _MODELS | {None}:
            return None
        return rest[0]
    if scope[-1] == layer or scope[-1].endswith("cell") or scope[-2:-1] and scope[-2].startswith(
            ("forward_", "backward_")) or cls not in _MODELS | {None}:
        return None
    return scope[-1]


def _class_from_vars(vars: list[_Var]) -> str | None:
    """A layer's class from its variables' names and shapes (a legacy weights file without a config)."""
    names = {v.name for v in vars}
    shapes = {v.name: tuple(v.dataset.shape) for v in vars}
    if "recurrent_kernel" in names:
        units, width = shapes["recurrent_kernel"]
        return {4: "LSTM", 3: "GRU", 1: "SimpleRNN"}.get(width // max(units, 1))
    if {"moving_mean", "moving_variance"} <= names:
        return "BatchNormalization"
    if "depthwise_kernel" in names and "pointwise_kernel" not in names:
        return {3: "DepthwiseConv1D", 4: "DepthwiseConv2D"}.get(len(shapes["depthwise_kernel"]))
    if "pointwise_kernel" in names:
        return {3: "SeparableConv1D", 4: "SeparableConv2D"}.get(len(shapes["pointwise_kernel"]))
    if "embeddings" in names:
        return "Embedding"
    if "kernel" in names:
        rank = len(shapes["kernel"])
        return {2: "Dense", 3: "Conv1D", 4: "Conv2D", 5: "Conv3D"}.get(rank)
    if {"gamma", "beta"} >= names and names:
        return "LayerNormalization"
    return None


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _json_attr(f: Any, name: str, path: Path) -> dict[str, Any] | None:
    if name not in f.attrs:
        return None
    try:
        value = json.loads(_text(f.attrs[name]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: its {name} is not JSON ({_one_line(exc)}); expected a Keras model "
                              "config. The file is corrupt; save it again.") from None
    return value if isinstance(value, dict) else None


# ---- layers as PyTorch tensors ------------------------------------------------------------------------------


def _reader(dataset: Any, row: int | None = None) -> Callable[[], Any]:
    def read() -> Any:
        import numpy as np

        try:
            value = np.asarray(dataset[()])
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{dataset.file.filename}: {dataset.name} does not read ({_one_line(exc)}); "
                                  "expected its stored array. The file is truncated or corrupt.") from None
        return value[row] if row is not None else value
    return read


def _tensor(name: str, var: _Var, layout: str | None = None, args: dict[str, Any] | None = None,
            row: int | None = None) -> ForeignTensor:
    shape = tuple(int(d) for d in var.dataset.shape)
    origin = var.origin
    if row is not None:
        shape, origin = shape[1:], f"{origin}[{row}]"
    after = _after_layout(shape, layout, args or {})
    return ForeignTensor(name, origin, _reader(var.dataset, row), after, torch_dtype_name(var.dataset.dtype),
                         layout, dict(args or {}))


def _after_layout(shape: tuple[int, ...], layout: str | None, args: dict[str, Any]) -> tuple[int, ...]:
    if layout is None:
        return shape
    if layout == "channels_last_kernel":
        if args["kind"] == "depthwise":
            return (shape[-2] * shape[-1], 1, *shape[:-2])
        return (shape[-1], shape[-2], *shape[:-2])
    if layout == "flatten_channels_last":
        return (shape[1], shape[0])
    if layout in ("dense_kernel", "gate_order") and len(shape) == 2 and (layout == "dense_kernel" or
                                                                         args.get("transpose")):
        return (shape[1], shape[0])
    return shape


def _zeros(like: ForeignTensor, name: str, why: str) -> ForeignTensor:
    def read() -> Any:
        return torch.zeros(like.shape, dtype=getattr(torch, like.dtype))
    return ForeignTensor(name, why, read, like.shape, like.dtype)


class _Refused(CheckpointError):
    pass


def _present(layer: _Layer, layers: dict[str, _Layer], path: Path) -> tuple[list[ForeignTensor], dict[str, str],
                                                                           dict[str, Any]]:
    """(tensors, module kinds, module attrs) of one layer."""
    cls, config, m = layer.cls, layer.config, layer.module
    named = {v.name: v for v in layer.vars if v.name}
    if cls in _DEPTHWISE and "depthwise_kernel" in named and "kernel" not in named:  # Keras 2's name
        named["kernel"] = named.pop("depthwise_kernel")
    if not layer.vars:
        return [], {}, {}
    out: list[ForeignTensor] = []
    kinds = {m: cls or "unknown"}
    attrs: dict[str, Any] = {}
    if cls == "Bidirectional":
        tensors, wrapped = _bidirectional(layer, path)
        return tensors, {m: f"Bidirectional({wrapped})"}, attrs
    if len(named) != len(layer.vars) or cls is None or cls not in KERAS_VARS:
        for i, v in enumerate(layer.vars):  # what the file does not explain stays as stored, under its own name
            out.append(_tensor(f"{m}.{v.name or f'var_{i}'}", v))
        return out, kinds, attrs
    bias = named.get("bias")
    if cls in _CONV | _DEPTHWISE | _TRANSPOSED:
        kind = "conv" if cls in _CONV else "depthwise" if cls in _DEPTHWISE else "transposed"
        out.append(_tensor(f"{m}.weight", named["kernel"], "channels_last_kernel", {"kind": kind}))
        if bias is not None:
            out.append(_tensor(f"{m}.bias", bias))
    elif cls in _SEPARABLE:
        out.append(_tensor(f"{m}.depthwise.weight", named["depthwise_kernel"], "channels_last_kernel",
                           {"kind": "depthwise"}))
        out.append(_tensor(f"{m}.pointwise.weight", named["pointwise_kernel"], "channels_last_kernel",
                           {"kind": "conv"}))
        if bias is not None:
            out.append(_tensor(f"{m}.pointwise.bias", bias))
        kinds = {f"{m}.depthwise": f"{cls} (depthwise)", f"{m}.pointwise": f"{cls} (pointwise)"}
    elif cls == "Dense":
        kernel = named["kernel"]
        flat = _flatten_before(layer, layers)
        if flat is not None and len(kernel.dataset.shape) == 2 and math.prod(flat) == kernel.dataset.shape[0]:
            out.append(_tensor(f"{m}.weight", kernel, "flatten_channels_last", {"shape": flat}))
        elif len(kernel.dataset.shape) == 2:
            out.append(_tensor(f"{m}.weight", kernel, "dense_kernel"))
        else:
            out.append(_tensor(f"{m}.weight", kernel))
        if bias is not None:
            out.append(_tensor(f"{m}.bias", bias))
    elif cls in ("BatchNormalization", "LayerNormalization"):
        for keras_name, local in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                                  ("moving_variance", "running_var")):
            if keras_name in named:
                out.append(_tensor(f"{m}.{local}", named[keras_name]))
        if "epsilon" in config:
            attrs["eps"] = float(config["epsilon"])
        if cls == "BatchNormalization" and "momentum" in config:
            attrs["momentum"] = round(1.0 - float(config["momentum"]), 12)
    elif cls == "Embedding":
        out.append(_tensor(f"{m}.weight", named["embeddings"]))
    elif cls == "PReLU":
        out.append(_tensor(f"{m}.weight", named["alpha"]))
    elif cls in _RECURRENT:
        out += _recurrent(cls, config, m, named, path)
    return out, kinds, attrs


def _recurrent(cls: str, config: dict[str, Any], m: str, named: dict[str, _Var], path: Path,
               suffix: str = "") -> list[ForeignTensor]:
    """An LSTM/GRU/SimpleRNN's tensors; `suffix` `_reverse` for a Bidirectional's backward layer."""
    if cls == "GRU" and not config.get("reset_after", True):
        raise _Refused(f"{path}: GRU {m} has reset_after=False, which has no PyTorch equivalent (nn.GRU applies "
                       "the reset gate after the recurrent product); expected reset_after=True (Keras' default). "
                       "Retrain or rebuild the layer with reset_after=True; nothing was read.")
    wanted = _TORCH_ACTIVATIONS.get(cls)
    if wanted is not None:
        have = (config.get("activation", "tanh"), config.get("recurrent_activation", "sigmoid"))
        if have != wanted:
            raise _Refused(f"{path}: {cls} {m} uses activation/recurrent_activation {have[0]}/{have[1]}; expected "
                           f"{wanted[0]}/{wanted[1]}, the only ones nn.{cls} has. Nothing was read.")
    order = _GATES[cls]
    args = {"order": order, "transpose": True}
    out = [_tensor(f"{m}.weight_ih_l0{suffix}", named["kernel"], "gate_order", args),
           _tensor(f"{m}.weight_hh_l0{suffix}", named["recurrent_kernel"], "gate_order", args)]
    bias = named.get("bias")
    if bias is None:
        return out
    if len(bias.dataset.shape) == 2:  # GRU reset_after: input and recurrent biases, one row each
        out += [_tensor(f"{m}.bias_ih_l0{suffix}", bias, "gate_order", {"order": order, "transpose": False}, row=0),
                _tensor(f"{m}.bias_hh_l0{suffix}", bias, "gate_order", {"order": order, "transpose": False}, row=1)]
        return out
    ih = _tensor(f"{m}.bias_ih_l0{suffix}", bias, "gate_order", {"order": order, "transpose": False})
    return out + [ih, _zeros(ih, f"{m}.bias_hh_l0{suffix}", f"zeros: Keras' {cls} has one bias ({bias.origin}), "
                                                          f"placed in bias_ih_l0{suffix}; torch adds both")]


def _wrapped(config: dict[str, Any]) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """A Bidirectional's recurrent class and its forward and backward layers' settings."""
    inner = config.get("layer") or {}
    backward = config.get("backward_layer") or inner
    return inner.get("class_name"), inner.get("config") or {}, backward.get("config") or inner.get("config") or {}


def _bidirectional(layer: _Layer, path: Path) -> tuple[list[ForeignTensor], str]:
    """A Bidirectional LSTM/GRU as one bidirectional nn.LSTM/nn.GRU: the backward layer's tensors take
    PyTorch's `_reverse` names. Keras' variables are named `forward/...` and `backward/...` here."""
    cls, forward, backward = _wrapped(layer.config)
    if cls is None:  # no config: the class from the variables
        cls = _class_from_vars([_Var(v.name.split("/", 1)[1], v.origin, v.dataset) for v in layer.vars
                                if v.name and v.name.startswith("forward/")])
    merge = layer.config.get("merge_mode", "concat")
    if cls not in _RECURRENT or merge != "concat":
        raise _Refused(f"{path}: Bidirectional {layer.module} wraps {cls} with merge_mode {merge!r}; expected an "
                       "LSTM, GRU or SimpleRNN whose directions are concatenated, as PyTorch's bidirectional layers "
                       "are. Nothing was read.")
    out = []
    for direction, config, suffix in (("forward", forward, ""), ("backward", backward, "_reverse")):
        named = {v.name.split("/", 1)[1]: v for v in layer.vars if v.name and v.name.startswith(direction + "/")}
        if not config:
            config = _config_from_shapes(cls, [named[k].dataset for k in ("kernel", "recurrent_kernel", "bias")
                                               if k in named])
        out += _recurrent(cls, config, layer.module, named, path, suffix)
    return out, cls


def _flatten_before(layer: _Layer, layers: dict[str, _Layer]) -> list[int] | None:
    """The shape, channels last, of what a Flatten before this Dense received, when that Flatten put the
    channels last (`(H, W, C)` for a 2-D map); None when no Flatten comes first or it flattened channels first.

    In a weights file without a config, a Dense whose kernel has a multiple of the channels of the spatial
    layer before it (more than them) reads that layer's map flattened, as Keras flattens: channels last."""
    if layer.order_only:
        before = layers.get(layer.inputs[0]) if layer.inputs else None
        channels = _channels_of(before) if before is not None else None
        rows = layer.vars[0].dataset.shape[0] if layer.vars and len(layer.vars[0].dataset.shape) == 2 else 0
        return [rows // channels, channels] if channels and rows % channels == 0 and rows > channels else None
    seen = layer
    for _ in range(8):
        if len(seen.inputs) != 1 or seen.inputs[0] not in layers:
            return None
        seen = layers[seen.inputs[0]]
        if seen.cls == "Flatten":
            break
        if seen.cls not in _PASS_THROUGH:
            return None
    else:
        return None
    flatten = seen
    shape = flatten.input_shape
    channels_first_flatten = flatten.config.get("data_format") == "channels_first"
    feeding = _data_format_before(flatten, layers)
    if shape is not None and len(shape) >= 3 and all(isinstance(d, int) for d in shape[1:]):
        dims = [int(d) for d in shape[1:]]
        if feeding == "channels_first" and channels_first_flatten:
            return [*dims[1:], dims[0]]  # Keras moved the channels last before flattening
        if feeding != "channels_first" and not channels_first_flatten:
            return dims
        return None
    if feeding == "channels_first" and not channels_first_flatten:
        return None
    channels = _channels_before(flatten, layers)  # a Keras 2 file: its config has no shapes
    if channels is None:
        return None
    rows = layer.vars[0].dataset.shape[0] if layer.vars else 0
    return [rows // channels, channels] if rows % channels == 0 and rows > channels else None


def _data_format_before(layer: _Layer, layers: dict[str, _Layer]) -> str:
    seen = layer
    for _ in range(64):
        if len(seen.inputs) < 1 or seen.inputs[0] not in layers:
            break
        seen = layers[seen.inputs[0]]
        if "data_format" in seen.config and seen.cls != "Flatten":
            return str(seen.config["data_format"])
    return "channels_last"


def _channels_before(layer: _Layer, layers: dict[str, _Layer]) -> int | None:
    """The channel count of what reaches `layer`: the nearest layer before it that sets one."""
    seen = layer
    for _ in range(64):
        if len(seen.inputs) != 1 or seen.inputs[0] not in layers:
            return None
        seen = layers[seen.inputs[0]]
        channels = _channels_of(seen)
        if channels is not None:
            return channels
        if seen.cls not in _PASS_THROUGH | {"MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
                                            "AveragePooling2D", "AveragePooling3D", "ZeroPadding2D",
                                            "ZeroPadding1D", "Cropping2D", "UpSampling2D"}:
            return None
    return None


def _channels_of(layer: _Layer) -> int | None:
    """The channels a spatial layer puts out, from its variables (None: not a spatial layer with weights)."""
    shapes = {v.name: tuple(v.dataset.shape) for v in layer.vars}
    kernel = shapes.get("kernel") or shapes.get("depthwise_kernel")
    if layer.cls in _CONV and kernel:
        return int(kernel[-1])
    if layer.cls in _DEPTHWISE and kernel:
        return int(kernel[-2] * kernel[-1])
    if layer.cls in _TRANSPOSED and kernel:
        return int(kernel[-2])
    if layer.cls in _SEPARABLE and "pointwise_kernel" in shapes:
        return int(shapes["pointwise_kernel"][-1])
    if layer.cls == "BatchNormalization" and "moving_mean" in shapes:
        return int(shapes["moving_mean"][0])
    return None


@dataclass
class _Node:
    name: str  # the layer's module path, nested models' layers under theirs
    inputs: list[str]
    modules: list[str]  # the PyTorch modules it presents, in the order data passes them (none: no weights)


def _graph(model: dict[str, Any], prefix: str = "", outer_inputs: list[str] | None = None) -> list[_Node]:
    """The config's layers as nodes of a data-flow graph, in the config's order. A nested model's input layers
    read what the model was called on, and the model passes on its (first) output layer's value."""
    cls = model.get("class_name")
    config = model.get("config") or {}
    entries = config.get("layers") or []
    nodes: list[_Node] = []
    names = [e.get("name") or (e.get("config") or {}).get("name") or f"layer_{i}" for i, e in enumerate(entries)]
    path = {n: prefix + _module_name(n) for n in names}
    previous: list[str] = list(outer_inputs or [])
    for entry, name in zip(entries, names):
        kind = entry.get("class_name")
        if kind == "InputLayer":
            inputs = list(outer_inputs or [])
        elif cls == "Sequential":
            inputs = previous
        else:
            inputs = [path[n] for n in _layer_inputs(entry) if n in path]
        if kind in _MODELS and (entry.get("config") or {}).get("layers") is not None:
            inner = _graph(entry, path[name] + ".", inputs)
            nodes += inner
            outputs = _output_names(entry, path[name] + ".") or ([inner[-1].name] if inner else [])
            nodes.append(_Node(path[name], outputs[:1], []))
        else:
            nodes.append(_Node(path[name], inputs, [path[name]]))
        previous = [path[name]]
    return nodes


def _execution_order(nodes: list[_Node], outputs: list[str]) -> list[str]:
    """An execution order of the graph: the config's, except where branches meet (an Add, a Concatenate), whose
    longer branch runs first. Keras lists a residual block's shortcut conv before its main path when the
    shortcut was made first (ResNet50); PyTorch's blocks (torchvision, timm) run the main path first, and the
    structure stage aligns by order. Depth-first from the outputs, inputs deepest first."""
    by_name = {n.name: n for n in nodes}
    depth: dict[str, int] = {}
    for n in nodes:  # the config lists a layer after those it reads
        depth[n.name] = 1 + max((depth.get(i, 0) for i in n.inputs), default=0)
    order: list[str] = []
    done: set[str] = set()
    for out in [o for o in outputs if o in by_name] + [n.name for n in reversed(nodes)]:
        stack: list[tuple[str, bool]] = [(out, False)]
        while stack:
            name, expanded = stack.pop()
            if name in done:
                continue
            if expanded:
                done.add(name)
                order.append(name)
                continue
            stack.append((name, True))
            inputs = [i for i in by_name[name].inputs if i in by_name and i not in done]
            # pushed shallowest first, so the deepest input is visited (and emitted) first
            for i in sorted(inputs, key=lambda i: depth.get(i, 0)):
                stack.append((i, False))
    return order


def _output_names(model: dict[str, Any], prefix: str) -> list[str]:
    outputs = (model.get("config") or {}).get("output_layers") or []
    if outputs and isinstance(outputs[0], str):  # one output: [name, node, tensor]
        outputs = [outputs]
    return [prefix + _module_name(o[0]) for o in outputs if isinstance(o, list) and o and isinstance(o[0], str)]


def _flow(nodes: list[_Node], present: dict[str, list[str]]) -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """Producer module -> consumer modules, and the edges that pass only through a meeting of values (an Add, a
    Concatenate), as `torchgraft.match.trace` records them for a PyTorch model: each value is tagged with the
    modules it comes from; a layer without weights passes its one input's tag on, and where several values meet
    the tag is the union of those that are not themselves meetings."""
    tags: dict[str, tuple[frozenset[str], bool]] = {}
    direct: set[tuple[str, str]] = set()
    met_edges: set[tuple[str, str]] = set()
    for node in nodes:
        inputs = [tags[i] for i in node.inputs if i in tags and tags[i][0]]
        modules = present.get(node.name, [])
        if modules:
            for producers, met in inputs:
                (met_edges if met else direct).update((p, modules[0]) for p in producers)
            direct.update(zip(modules, modules[1:]))
            tags[node.name] = (frozenset([modules[-1]]), False)
        elif len(inputs) == 1:
            tags[node.name] = inputs[0]
        elif inputs:
            fresh = [m for m, met in inputs if not met]
            tags[node.name] = (frozenset().union(*(fresh or [m for m, _ in inputs])), True)
    flow: dict[str, set[str]] = {}
    for a, b in direct | met_edges:
        flow.setdefault(a, set()).add(b)
    return flow, met_edges - direct


def _layer_of(module: str) -> str:
    """The layer a presented module belongs to (a SeparableConv's two convs belong to one layer)."""
    return module.rsplit(".", 1)[0] if module.endswith((".depthwise", ".pointwise")) else module


def _foldable(layers: dict[str, _Layer]) -> dict[str, str]:
    """Conv biases whose conv feeds one BatchNormalization and nothing else."""
    consumers: dict[str, list[str]] = {}
    for layer in layers.values():
        for i in layer.inputs:
            consumers.setdefault(i, []).append(layer.module)
    out = {}
    for layer in layers.values():
        if layer.cls not in _CONV | _DEPTHWISE or not any(v.name == "bias" for v in layer.vars):
            continue
        after = consumers.get(layer.module, [])
        if len(after) == 1 and layers[after[0]].cls == "BatchNormalization" and \
                layer.config.get("activation", "linear") in ("linear", None) and \
                _channels_of(layers[after[0]]) == _channels_of(layer):
            out[f"{layer.module}.bias"] = after[0]
    return out


def _source(path: Path, fmt: str, layers: list[_Layer], metadata: dict[str, Any],
            runner: Callable[[], ForeignRunner] | None, config: dict[str, Any] | None = None,
            order_known: bool = True, notes: Sequence[str] = ()) -> Source:
    by_module = {layer.module: layer for layer in layers}
    for layer in layers:  # a nested model read as one layer stands for its last layer
        layer.inputs = [i if i in by_module else next((m for m in reversed(by_module) if m.startswith(i + ".")), i)
                        for i in layer.inputs]
    entries: list[ForeignTensor] = []
    modules: dict[str, str] = {}
    attrs: dict[str, dict[str, Any]] = {}
    for layer in layers:
        tensors, kinds, extra = _present(layer, by_module, path)
        entries += tensors
        if tensors:
            modules.update(kinds)
        if extra:
            attrs[layer.module] = extra
    if not entries:
        raise CheckpointError(f"{path}: no weights in the file; expected a Keras model's variables. Was it saved "
                              "before the model was built?")
    foldable = {k: v for k, v in _foldable(by_module).items() if any(e.name == k for e in entries)}
    flow: dict[str, Any] = {}
    if config is not None:
        nodes = _graph(config)
        outputs = _output_names(config, "") or ([nodes[-1].name] if nodes else [])
        rank = {name: i for i, name in enumerate(_execution_order(nodes, outputs))}
        module_rank = {e.name: rank.get(_layer_of(e.name.rpartition(".")[0]), len(rank)) for e in entries}
        entries = sorted(entries, key=lambda e: module_rank[e.name])  # stable: a layer's tensors keep their order
        present: dict[str, list[str]] = {}
        for e in entries:
            module = e.name.rpartition(".")[0]
            if module not in present.setdefault(_layer_of(module), []):
                present[_layer_of(module)].append(module)
        flow["flow"], flow["joined"] = _flow(nodes, present)
    return foreign_source(str(path), fmt, entries, metadata=metadata, modules=modules, module_attrs=attrs,
                          runner=runner, foldable_bias=foldable, order_known=order_known, notes=notes, **flow)


# ---- the three kinds of file --------------------------------------------------------------------------------


def read_keras(path: str | os.PathLike[str]) -> Source:
    """A Keras 3 `.keras` archive: the config names and orders the variables of `model.weights.h5`."""
    p = Path(path)
    try:
        archive = zipfile.ZipFile(p)
        members = set(archive.namelist())
        if "config.json" not in members or "model.weights.h5" not in members:
            raise CheckpointError(f"{p}: a zip without config.json and model.weights.h5 (it holds "
                                  f"{sorted(members)[:5]}); expected a Keras 3 .keras archive. Save it with "
                                  "model.save('x.keras').")
        config = json.loads(archive.read("config.json"))
        metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in members else {}
        weights = io.BytesIO(archive.read("model.weights.h5"))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zipfile.LargeZipFile) as exc:
        raise CheckpointError(f"{p}: not a readable .keras archive ({_one_line(exc)}); expected a zip with "
                              "config.json and model.weights.h5. It is truncated or corrupt; save it again.") from None
    if not isinstance(config, dict) or not isinstance(metadata, dict):
        raise CheckpointError(f"{p}: config.json is not a Keras model config; expected a JSON object.")
    f = _open_h5(p, weights, "its model.weights.h5")
    layers = _layers_or_refuse(lambda: list(_config_layers(config, f, "", p)), p)
    meta = {"keras_version": metadata.get("keras_version"), "model": config.get("class_name"),
            "order": "the config's layer order"}
    return _source(p, "keras", layers, meta, lambda: KerasRunner(p), config)


def read_h5(path: str | os.PathLike[str]) -> Source:
    """A Keras HDF5 file: a Keras 3 `.weights.h5` (variables by index under `layers/.../vars`) or a legacy
    Keras 2 `.h5` (`layer_names`/`weight_names`, with `model_config` when the whole model was saved)."""
    p = Path(path)
    f = _open_h5(p, p, "it")
    try:
        root = f["model_weights"] if "model_weights" in f else f
        legacy = "layer_names" in root.attrs
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{p}: its HDF5 structure does not read ({_one_line(exc)}); expected Keras weights. "
                              "The file is corrupt; save it again.") from None
    if legacy:
        found = _layers_or_refuse(lambda: _legacy_layers(f, p), p)
        layers, config = found
        meta = {"keras_version": _text(root.attrs.get("keras_version", f.attrs.get("keras_version", ""))) or None,
                "backend": _text(root.attrs.get("backend", f.attrs.get("backend", ""))) or None,
                "model": (config or {}).get("class_name"), "order": "the file's layer_names"}
        runner = (lambda: KerasRunner(p)) if config is not None else None
        return _source(p, "keras-h5", layers, meta, runner, config)
    if "layers" not in f and "vars" not in f:
        raise CheckpointError(f"{p}: an HDF5 file with neither layer_names nor layers/.../vars (it holds "
                              f"{list(f)[:5]}); expected a Keras .weights.h5 or .h5 file.")
    layers, how = _layers_or_refuse(lambda: _file_layers(f, p), p)
    return _source(p, "keras-weights", layers, {"order": how}, None, order_known=False,
                   notes=[f"{p.name} has no config: {how}; no layer is placed by its position alone, and no "
                          "BatchNorm epsilon or momentum is known (PyTorch's are kept). The .keras file, or a "
                          "whole-model .h5, gives both."])


def _layers_or_refuse(read: Callable[[], Any], path: Path) -> Any:
    try:
        return read()
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: its weights do not read ({_one_line(exc)}); expected Keras weights laid "
                              "out as Keras saves them. The file is truncated or corrupt; save it again.") from None


# ---- running the source in Keras, for --verify ---------------------------------------------------------------


def _keras() -> Any:
    """Keras 3 on the torch backend (set before its first import)."""
    loaded = sys.modules.get("keras")
    if loaded is None:
        os.environ["KERAS_BACKEND"] = "torch"
    keras = need("keras", "keras", "running a Keras model to verify")
    backend = keras.backend.backend()
    if backend != "torch":
        raise CheckpointError(f"keras was already imported with the {backend} backend; verifying needs the torch "
                              "backend. Set KERAS_BACKEND=torch before anything imports keras.")
    return keras


class KerasRunner(ForeignRunner):
    """The Keras model of a `.keras` or whole-model `.h5` file, built from its config and loaded by Keras itself
    (on the torch backend, `safe_mode=True`: no lambda is deserialised), run on a PyTorch-layout input: an
    `(N, C, H, W)` batch is given to a channels-last model as `(N, H, W, C)`, and a channels-last map it returns
    comes back channels first."""

    framework = "Keras 3 (torch backend)"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        keras = _keras()
        try:
            model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many types; one line says which
            raise CheckpointError(f"{path}: Keras cannot build this model ({_one_line(exc)}); expected a model "
                                  "Keras 3 loads. Verify another way.") from None
        self._model = [model]  # not a submodule: Keras' torch layers would join this module's parameters
        self._keras = keras
        shape = model.inputs[0].shape if getattr(model, "inputs", None) else None
        self.input_shape = tuple(shape) if shape is not None else None
        self.channels_last = _is_channels_last(model)

    def _to_keras(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() >= 4:
            return x.permute(0, *range(2, x.dim()), 1)
        return x

    def example_input(self) -> tuple[torch.Tensor, ...] | None:
        """A random input of the Keras model's input shape, in PyTorch's layout, when that shape is fixed."""
        shape = self.input_shape
        if shape is None or not all(isinstance(d, int) for d in shape[1:]) or len(shape) < 2:
            return None
        dims = [2, *shape[1:]]
        x = torch.rand(*dims, generator=torch.Generator().manual_seed(0))
        if self.channels_last and x.dim() >= 4:
            x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
        return (x.contiguous(),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        try:
            y = model(self._to_keras(x.detach().cpu().float()), training=False)
        except Exception as exc:  # Keras' own types; verify reports one line
            raise RuntimeError(_one_line(exc)) from None
        out = torch.as_tensor(self._keras.ops.convert_to_numpy(y if not isinstance(y, (list, tuple)) else y[0]))
        if self.channels_last and out.dim() >= 4:
            out = out.permute(0, out.dim() - 1, *range(1, out.dim() - 1))
        return out.contiguous()


def _is_channels_last(model: Any) -> bool:
    """Whether the model's first spatial layer reads channels last (Keras' default)."""
    for layer in getattr(model, "_flatten_layers", lambda: [])():
        data_format = getattr(layer, "data_format", None)
        if data_format is not None:
            return data_format == "channels_last"
    return True
