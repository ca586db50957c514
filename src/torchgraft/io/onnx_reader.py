"""ONNX models (`.onnx`): their weights, placed by the graph, as PyTorch tensors. The file is parsed, never run
(only `--verify` runs it, in onnxruntime).

What becomes a tensor: every floating initializer (and `Constant` node, which exporters such as spox use to hold
weights) that a node consumes, in the order the nodes consume them, subgraphs (`If`/`Loop` bodies) included,
so the structure stage can align them by execution order. Each is named, first that applies:

1. the name it has, when that is a PyTorch key the exporter kept (`fc.weight`, `layer1.0.conv1.weight`; the
   default dynamo exporter keeps them, even for a conv whose BatchNorm it folded in): its value is then that
   parameter, stored as PyTorch holds it;
2. the consuming node's module, from a name kept in the same node (`conv1.weight` names `conv1.weight_bias`),
   from the node's scope name (`/layer1/layer1.0/conv1/Conv` -> `layer1.0.conv1`, the legacy exporter's), or
   failing both by op order (`Conv_0`, `Gemm_3`), plus the PyTorch name of its input slot (`SLOT_NAMES`).

A weight whose name is rebuilt is laid out as PyTorch holds it by a layout adapter, recorded per tensor: a
`MatMul` by a weight or a `Gemm` with `transB=0` holds `(in, out)` (`dense_kernel`); an `LSTM`/`GRU` holds
ONNX's gate order, reordered into PyTorch's (`gate_order`), its `B` split into `bias_ih`/`bias_hh`.

A conv with no BatchNormalization after it may hold one an exporter folded in, so the Source says
`folded_bn=True` and the plan's `unfold_bn` stage decides by the target model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchgraft.errors import CheckpointError
from torchgraft.io.frameworks import ForeignTensor, foreign_source, need
from torchgraft.io.read import Source
from torchgraft.verify import ForeignRunner

__all__ = ["read_onnx", "OnnxRunner", "SLOT_NAMES", "module_path_from_scope"]

#: op type -> {input slot: PyTorch local name} for the weights a node of that type consumes.
SLOT_NAMES: dict[str, dict[int, str]] = {
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "Gemm": {1: "weight", 2: "bias"},
    "MatMul": {1: "weight"},
    "BatchNormalization": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    "InstanceNormalization": {1: "weight", 2: "bias"},
    "LayerNormalization": {1: "weight", 2: "bias"},
    "GroupNormalization": {1: "weight", 2: "bias"},
    "PRelu": {1: "weight"},
    "Gather": {0: "weight"},  # an embedding table
}

#: ONNX's gate blocks -> PyTorch's (`order[i]` is the ONNX block that becomes PyTorch's block i).
GATE_ORDERS = {"LSTM": [0, 2, 3, 1],  # ONNX i, o, f, c -> torch i, f, g, o
               "GRU": [1, 0, 2],      # ONNX z, r, h -> torch r, z, n
               "RNN": [0]}
_RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}

#: A key with a last part an exporter derived from a parameter's name (`conv1.weight_bias`, the bias the dynamo
#: exporter made when it folded a BatchNorm into `conv1`) is not the parameter; PyTorch's own `weight_ih_l0`,
#: `bias_k`, `weight_g` are.
_DERIVED = re.compile(r"(weight|bias|running_mean|running_var)_(?!((ih|hh)(_l\d+)?(_reverse)?|[kvg])$)\w+")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+")
_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
_INLINED = re.compile(r"^.*__Inline_\d+__")  # spox/onnx inliner prefix on names from a subgraph


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GENERATED = re.compile(r"val_\d+|_?v?\d+|.*_output(_\d+)?|.*Constant.*|.*_[0-9]+")  # exporters' own value names


def is_kept_key(name: str, top_level: bool = False) -> bool:
    """Whether `name` is a PyTorch state-dict key an exporter kept (`layer1.0.conv1.weight`); with `top_level`,
    a model's own parameter without a module (`pos_embed`) too, unless it reads as an exporter's value name
    (`val_12`, `Constant_3_output`, an aten op's name such as `expand` for `cls_token.expand(...)` folded)."""
    if _KEY.fullmatch(name):
        return not _DERIVED.fullmatch(name.rpartition(".")[2])
    return top_level and bool(_NAME.fullmatch(name)) and not _GENERATED.fullmatch(name) \
        and not hasattr(torch.ops.aten, name)  # the dynamo exporter names a folded value by its op: `expand`


def module_path_from_scope(node_name: str) -> str | None:
    """The module path in a legacy exporter's node name: `/layer1/layer1.0/conv1/Conv` -> `layer1.0.conv1`.

    Each scope part is a module's name as its parent calls it, prefixed with the parent's part when it is a
    container's index (`layer1.0` under `layer1`, `downsample.0` under `downsample`); the last part is the op."""
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/")[1:-1] if p]
    path: list[str] = []
    previous = None
    for part in parts:
        local = part[len(previous) + 1:] if previous and part.startswith(previous + ".") else part
        path.extend(local.split("."))
        previous = part
    return ".".join(path) or None


# ---- the file --------------------------------------------------------------------------------------------


def _parse(path: Path, onnx: Any) -> Any:
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable ONNX model ({first}); expected an ONNX protobuf. The file "
                              "is truncated or corrupt, or not ONNX: re-export or re-download it.") from None
    if model.ir_version <= 0 or not model.graph.node:
        raise CheckpointError(f"{path}: parses as no ONNX model (ir_version {model.ir_version}, "
                              f"{len(model.graph.node)} nodes); expected a graph of nodes. The file is truncated "
                              "or corrupt, or not ONNX: re-export or re-download it.")
    return model


def _external(tensor: Any) -> dict[str, str] | None:
    if tensor.data_location != 1:  # TensorProto.EXTERNAL
        return None
    return {e.key: e.value for e in tensor.external_data}


def _reader(tensor: Any, base: Path, origin: str, onnx: Any) -> Callable[[], Any]:
    """Reads the tensor's value when called; external data only from a file beside the model."""
    info = _external(tensor)

    def read() -> Any:
        from onnx import numpy_helper

        if info is None:
            return numpy_helper.to_array(tensor)
        location = Path(info.get("location", ""))
        resolved = (base / location).resolve()
        if location.is_absolute() or base.resolve() not in resolved.parents:
            raise CheckpointError(f"{origin}: external data at {str(location)!r}, outside the model's folder; "
                                  "expected a file beside the .onnx. Nothing was read; move the data next to it.")
        if not resolved.is_file():
            raise CheckpointError(f"{origin}: its external data file {str(location)!r} is missing; expected it "
                                  f"in {base}. Copy it beside the .onnx file.")
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        onnx.external_data_helper.load_external_data_for_tensor(copy, str(base))
        copy.data_location = 0
        return numpy_helper.to_array(copy)

    return read


# ---- walking the graph -----------------------------------------------------------------------------------


@dataclass
class _Stored:
    """A weight the file holds: an initializer or a Constant node's tensor."""

    origin: str
    tensor: Any  # onnx.TensorProto
    branch: str = ""  # the subgraph that holds it ('' for the main graph)
    constant: bool = False  # a Constant node's: a weight only in a weight slot or under a kept key

    @property
    def key(self) -> str | None:
        """The PyTorch key it is stored under, when the exporter kept it (an initializer may be top-level)."""
        name = _clean(self.origin)
        return name if is_kept_key(name, top_level=not self.constant) else None


@dataclass
class _Use:
    node: Any
    index: int  # the node's place among the nodes that consume weights
    slot: int
    stored: _Stored


def _float_tensor(t: Any) -> bool:
    return t.data_type in _FLOAT_TYPES


def _is_weight(op: str, slot: int, stored: _Stored) -> bool:
    """Whether a node's input is a weight: a floating tensor under a kept key, in a weight slot of its op, or
    (an initializer) with more than one value; scalars (a scale, an epsilon) and other constants (zeros for a
    recurrent state) are not, and do not count in the op order."""
    if not _float_tensor(stored.tensor):
        return False
    if stored.key is not None:
        return True
    if op in GATE_ORDERS:  # X, W, R, B, sequence_lens, initial_h, initial_c, P: the states are inputs
        return slot in (1, 2, 3, 7)
    if op in SLOT_NAMES:
        return slot in SLOT_NAMES[op]
    return not stored.constant and math.prod(_dims(stored.tensor)) > 1


def _constant_tensor(node: Any) -> Any | None:
    for a in node.attribute:
        if a.name == "value" and a.type == 4:  # AttributeProto.TENSOR
            return a.t
    return None


def _walk(graph: Any, scope: dict[str, _Stored], branch: str, uses: list[_Use], counter: list[int],
          consumers: dict[str, list[Any]]) -> None:
    scope = dict(scope)
    for t in graph.initializer:
        scope[t.name] = _Stored(t.name, t, branch)
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        if node.op_type == "Constant":
            t = _constant_tensor(node)
            if t is not None and _float_tensor(t) and node.output:
                scope[node.output[0]] = _Stored(node.output[0], t, branch, constant=True)
            continue
        if node.op_type == "Identity" and node.input and node.input[0] in scope:  # an alias (deduplicated weights)
            scope[node.output[0]] = scope[node.input[0]]
            continue
        found = [(slot, scope[name]) for slot, name in enumerate(node.input)
                 if name in scope and _is_weight(node.op_type, slot, scope[name])]
        if found:
            for slot, stored in found:
                uses.append(_Use(node, counter[0], slot, stored))
            counter[0] += 1
        for a in node.attribute:
            graphs = [a.g] if a.type == 5 else list(a.graphs) if a.type == 10 else []  # GRAPH, GRAPHS
            for g in graphs:
                _walk(g, scope, f"{branch}/{node.name or node.op_type}:{a.name}", uses, counter, consumers)


def _f32(value: float) -> float:
    """A float attribute (stored as float32) as the decimal it was written as: 1e-05, not 9.99999974e-06."""
    return float(f"{float(value):.7g}")


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# ---- naming ----------------------------------------------------------------------------------------------


def _clean(origin: str) -> str:
    return _INLINED.sub("", origin)


def _node_module(node: Any, uses: list[_Use], index: int) -> str:
    """The module a node belongs to: from a kept key in its weight slot, its scope name (legacy exporter), the
    dynamo exporter's name scopes (unless a rewrite such as a BatchNorm fold moved the node), else its op order."""
    weight_slot = min(SLOT_NAMES.get(node.op_type, {1: ""}))
    for u in uses:
        key = u.stored.key
        if u.slot == weight_slot and key is not None and "." in key:
            return key.rpartition(".")[0]
    scoped = module_path_from_scope(node.name)
    if scoped:
        return scoped
    meta = {p.key: p.value for p in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" in meta and "pkg.onnxscript.rewriter.rule_name" not in meta:
        scopes = [s for s in _string_list(meta["pkg.torch.onnx.name_scopes"]) if s]
        if len(scopes) >= 2:  # [..., module path, op]
            return scopes[-2]
    return f"{node.op_type}_{index}"


def _string_list(text: str) -> list[str]:
    """A list of strings written as a Python literal (parsed, never evaluated); [] for anything else."""
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, RecursionError, MemoryError, TypeError):
        return []
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else []


@dataclass
class _Presented:
    name: str
    use: _Use
    shape: tuple[int, ...]
    layout: str | None = None
    args: dict[str, Any] | None = None
    part: Callable[[Any], Any] | None = None  # a slice of the stored value (a direction, half of B)


def _dims(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.dims)


def _recurrent(node: Any, module: str, layer: int, uses: list[_Use], path: Path) -> list[_Presented]:
    """An ONNX LSTM/GRU/RNN's W, R, B as PyTorch's `weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`,
    `bias_hh_l{k}` (`_reverse` for the second direction), gate blocks in PyTorch's order."""
    op = node.op_type
    by_slot = {u.slot: u for u in uses}
    if op == "GRU" and int(_attr(node, "linear_before_reset", 0)) != 1:
        raise CheckpointError(f"{path}: GRU {node.name or '?'} has linear_before_reset=0, which no PyTorch GRU "
                              "computes (torch.nn.GRU is linear_before_reset=1); expected an export of a PyTorch "
                              "GRU. Nothing was read; port this layer by hand.")
    if op == "LSTM" and 7 in by_slot:
        raise CheckpointError(f"{path}: LSTM {node.name or '?'} has peephole weights (P), which torch.nn.LSTM has "
                              "not; expected an LSTM without peepholes. Nothing was read; port this layer by hand.")
    order = GATE_ORDERS[op]
    out: list[_Presented] = []
    for slot, kind in ((1, "weight_ih"), (2, "weight_hh"), (3, "bias")):
        u = by_slot.get(slot)
        if u is None:
            continue
        dims = _dims(u.stored.tensor)
        for d in range(dims[0]):
            suffix = f"_l{layer}" + ("_reverse" if d == 1 else "")
            if kind == "bias":
                half = dims[1] // 2
                for h, local in enumerate(("bias_ih", "bias_hh")):
                    out.append(_Presented(f"{module}.{local}{suffix}", u, (half,), "gate_order",
                                          {"order": order, "transpose": False},
                                          lambda v, d=d, h=h, half=half: v[d, h * half:(h + 1) * half]))
            else:
                out.append(_Presented(f"{module}.{kind}{suffix}", u, dims[1:], "gate_order",
                                      {"order": order, "transpose": False}, lambda v, d=d: v[d]))
    return out


def _present(uses: list[_Use], path: Path) -> tuple[list[_Presented], dict[str, str], dict[str, dict[str, Any]]]:
    """Each used weight under its PyTorch name, in the order the graph uses them; the modules' op types and the
    attributes their target modules should take (a BatchNorm's eps and momentum)."""
    by_node: dict[int, list[_Use]] = {}
    for u in uses:
        by_node.setdefault(u.index, []).append(u)
    presented: list[_Presented] = []
    modules: dict[str, str] = {}
    attrs: dict[str, dict[str, Any]] = {}
    layers: dict[str, int] = {}
    for index, node_uses in by_node.items():
        node = node_uses[0].node
        op = node.op_type
        module = _node_module(node, node_uses, index)
        if op in GATE_ORDERS:
            layer = layers.get(module, 0)
            layers[module] = layer + 1
            entries = _recurrent(node, module, layer, node_uses, path)
            rest = [u for u in node_uses if u.slot not in (1, 2, 3)]
        else:
            entries, rest = [], node_uses
        slots = SLOT_NAMES.get(op, {})
        if op == "Gemm" and (float(_attr(node, "alpha", 1.0)) != 1.0 or float(_attr(node, "beta", 1.0)) != 1.0):
            raise CheckpointError(f"{path}: Gemm {node.name or index} scales its product (alpha "
                                  f"{_attr(node, 'alpha', 1.0)}, beta {_attr(node, 'beta', 1.0)}); expected 1 and 1 "
                                  "as nn.Linear computes. Nothing was read; fold the scales into the weights first.")
        for u in rest:
            dims = _dims(u.stored.tensor)
            if u.stored.key is not None:
                entries.append(_Presented(u.stored.key, u, dims))  # the parameter itself, as PyTorch holds it
                continue
            local = slots.get(u.slot, f"{op.lower()}_input{u.slot}")
            entry = _Presented(f"{module}.{local}", u, dims)
            if op == "MatMul" and u.slot == 1 and len(dims) == 2:
                entry.layout, entry.args, entry.shape = "dense_kernel", {}, (dims[1], dims[0])
            elif op == "Gemm" and u.slot == 1 and len(dims) == 2 and not int(_attr(node, "transB", 0)):
                entry.layout, entry.args, entry.shape = "dense_kernel", {}, (dims[1], dims[0])
            entries.append(entry)
        if entries:
            modules.setdefault(module, op)
        if op == "BatchNormalization":  # ONNX's momentum weighs the running value, PyTorch's the new one
            attrs[module] = {"eps": _f32(_attr(node, "epsilon", 1e-5)),
                             "momentum": _f32(1.0 - _f32(_attr(node, "momentum", 0.9)))}
        elif op in ("LayerNormalization", "InstanceNormalization", "GroupNormalization"):
            attrs[module] = {"eps": _f32(_attr(node, "epsilon", 1e-5))}
        presented.extend(entries)
    return presented, modules, attrs


def _unique(presented: list[_Presented]) -> list[_Presented]:
    """One entry per name: a weight used again under the same name (a module called twice, both branches of an
    `If` reading one initializer) is one tensor. Names that different stored tensors would share are told apart
    by the subgraph holding each (`then_branch.encoder.0.weight`: an `If` with a whole model per branch), else by
    op order."""
    holders: dict[str, set[int]] = {}
    for p in presented:
        holders.setdefault(p.name, set()).add(id(p.use.stored))
    out: list[_Presented] = []
    seen: dict[str, int] = {}
    for p in presented:
        name = p.name
        if len(holders[name]) > 1 and p.use.stored.branch:
            name = _branch_prefix(p.use.stored.branch) + name
        if name in seen:
            if seen[name] == id(p.use.stored):
                continue
            name = f"{p.use.node.op_type}_{p.use.index}.{name.rpartition('.')[2]}"  # foreign_source refuses a
        seen[name] = id(p.use.stored)                                              # name that still collides
        p.name = name
        out.append(p)
    return out


def _branch_prefix(branch: str) -> str:
    """`/If_0:then_branch` -> `then_branch.`; a branch inside a branch gives `then_branch.else_branch.`."""
    parts = [seg.rpartition(":")[2] for seg in branch.split("/") if seg]
    return ".".join(parts) + "."


# ---- the Source ------------------------------------------------------------------------------------------


def _shape_of(value_info: Any) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _io(graph: Any, initializers: set[str]) -> list[dict[str, Any]]:
    from onnx import helper

    out = []
    for v in graph:
        if v.name in initializers:
            continue
        elem = v.type.tensor_type.elem_type
        out.append({"name": v.name, "shape": _shape_of(v),
                    "dtype": helper.tensor_dtype_to_np_dtype(elem).name if elem else None})
    return out


def _convs_without_norm(uses: list[_Use], consumers: dict[str, list[Any]]) -> tuple[int, int]:
    """(convs, convs whose output goes to a BatchNormalization): the rest may hold one an exporter folded."""
    convs = {id(u.node): u.node for u in uses if u.node.op_type in ("Conv", "ConvTranspose") and u.slot == 1}
    normed = sum(1 for n in convs.values()
                 if any(c.op_type == "BatchNormalization" for o in n.output for c in consumers.get(o, [])))
    return len(convs), normed


def _foldable_biases(presented: list[_Presented], consumers: dict[str, list[Any]]) -> dict[str, str]:
    """Conv bias key -> the BatchNorm module that alone takes that conv's output (an export that kept its
    norms): the plan moves such a bias into the norm's running mean for a target conv without a bias."""
    norms = {id(p.use.node): p.name.rpartition(".")[0] for p in presented
             if p.use.node.op_type == "BatchNormalization"}
    found = {}
    for p in presented:
        node = p.use.node
        if node.op_type == "Conv" and p.use.slot == 2 and node.output:
            takers = consumers.get(node.output[0], [])
            if len(takers) == 1 and id(takers[0]) in norms:
                found[p.name] = norms[id(takers[0])]
    return found


def read_onnx(path: str | Path) -> Source:
    """An ONNX model's weights as a Source, in the order its graph uses them (see the module docstring)."""
    onnx = need("onnx", "onnx", "reading an ONNX model")
    p = Path(path)
    model = _parse(p, onnx)
    graph = model.graph
    uses: list[_Use] = []
    consumers: dict[str, list[Any]] = {}
    _walk(graph, {}, "", uses, [0], consumers)
    presented, modules, attrs = _present(uses, p)
    presented = _unique(presented)
    entries = []
    for e in presented:
        t = e.use.stored.tensor
        read = _reader(t, p.parent, e.use.stored.origin, onnx)
        if e.part is not None:
            read = (lambda r, f: (lambda: f(r())))(read, e.part)
        entries.append(ForeignTensor(e.name, e.use.stored.origin, read, tuple(e.shape),
                                     _FLOAT_TYPES[t.data_type], e.layout, dict(e.args or {})))
    convs, normed = _convs_without_norm(uses, consumers)
    initializers = {t.name for t in graph.initializer}
    inputs = _io(graph.input, initializers)
    metadata: dict[str, Any] = {
        "producer": f"{model.producer_name} {model.producer_version}".strip() or None,
        "opset": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "ir_version": int(model.ir_version),
        "inputs": inputs,
        "outputs": _io(graph.output, set()),
        "convs": convs,
        "convs_followed_by_batchnorm": normed,
    }
    if inputs and all(isinstance(d, int) and d > 0 for d in inputs[0]["shape"]):
        metadata["input_shape"] = list(inputs[0]["shape"])
    if model.metadata_props:
        metadata["metadata_props"] = {m.key: m.value for m in model.metadata_props}
    used_modules = {e.name.rpartition(".")[0] for e in presented}
    modules = {m: k for m, k in modules.items() if m in used_modules}
    attrs = {m: a for m, a in attrs.items() if m in used_modules}
    return foreign_source(str(path), "onnx", entries, metadata=metadata, modules=modules, module_attrs=attrs,
                          runner=lambda: OnnxRunner(p), folded_bn=convs > normed,
                          foldable_bias=_foldable_biases(presented, consumers))


# ---- running it (only for --verify) ----------------------------------------------------------------------


class OnnxRunner(ForeignRunner):
    """The ONNX model run in onnxruntime on the CPU, for verification: positional tensors feed its inputs in
    order, keyword tensors the inputs of those names (`pixel_values`), and `feeds` gives the rest by name (a
    recurrent state, a sample rate). Returns its first output as a torch tensor."""

    framework = "onnxruntime (CPU)"

    def __init__(self, path: str | Path, feeds: dict[str, Any] | None = None) -> None:
        super().__init__()
        import numpy as np

        ort = need("onnxruntime", "onnxruntime", "running an ONNX model to verify")
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]}); expected a "
                                  "model it runs. Verify another way.") from None
        self.inputs = {i.name: (i.type, i.shape) for i in self.session.get_inputs()}
        self.feeds = {k: np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
                      for k, v in (feeds or {}).items()}

    def example_input(self) -> tuple[torch.Tensor, ...] | None:
        """A random input of the model's first input's shape when that shape is fixed (an export at 1x3x64x64
        runs at that size only), else None."""
        kind, shape = next(iter(self.inputs.values()))
        if kind != "tensor(float)" or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            return None
        return (torch.randn(*shape, generator=torch.Generator().manual_seed(0)),)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        import numpy as np

        given = dict(zip([n for n in self.inputs if n not in kwargs and n not in self.feeds], args))
        given.update(kwargs)
        feeds = dict(self.feeds)
        for name, value in given.items():
            if name not in self.inputs:
                raise ValueError(f"the ONNX model has no input {name!r}; it takes {list(self.inputs)}")
            array = value.detach().cpu().numpy()
            feeds[name] = array.astype(np.float32) if self.inputs[name][0] == "tensor(float)" else array
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"the ONNX model also takes {missing}; give them as feeds")
        try:
            out = self.session.run(None, feeds)
        except Exception as exc:  # onnxruntime's own types; verify reports it as one line
            raise RuntimeError(str(exc).splitlines()[0]) from None
        return torch.from_numpy(np.ascontiguousarray(out[0]))
