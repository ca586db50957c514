"""What is in a checkpoint or a model, and how two of them differ — as data the CLI renders or prints as JSON."""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from torchgraft.io.read import Source, TensorInfo, _info_of
from torchgraft.match.names import BENIGN_TENSORS

__all__ = ["Diff", "collapse_indices", "describe_model", "describe_source", "diff", "group_by_prefix",
           "source_from_model"]

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")


def source_from_model(model: nn.Module, name: str) -> Source:
    """A model's state_dict seen as a Source, with its module classes, so it can be inspected and diffed."""
    state = model.state_dict(keep_vars=True)
    modules = {n: f"{type(m).__module__}.{type(m).__qualname__}" for n, m in model.named_modules()}
    return Source(path=name, format="model", tensors=state, info=_info_of(state), modules=modules)


def describe_source(source: Source) -> dict[str, Any]:
    """The `graft inspect --json` object of a checkpoint."""
    out: dict[str, Any] = {
        "format": source.format,
        "wrapper": source.wrapper,
        "num_tensors": len(source),
        "num_params": source.num_params,
        "tensors": [{"key": k, "shape": list(v.shape), "dtype": v.dtype, **_foreign(source, k)}
                    for k, v in source.info.items()],
    }
    if source.modules is not None:
        out["modules"] = source.modules
    if source.metadata:
        out["metadata"] = _jsonable(source.metadata)
    return out


def _foreign(source: Source, key: str) -> dict[str, Any]:
    """Another framework's tensor: its name in the file and the layout adapter that lays it out."""
    out: dict[str, Any] = {}
    if key in source.origins:
        out["in_file"] = source.origins[key]
    if key in source.layouts:
        out["layout"], out["layout_args"] = source.layouts[key]
    return out


def describe_model(model: nn.Module, spec: str) -> dict[str, Any]:
    """The `graft inspect --model --json` object: module tree, parameters, buffers, trainable and frozen."""
    params = list(model.named_parameters())
    buffers = list(model.named_buffers())
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    total = sum(p.numel() for _, p in params)
    modules = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        every = list(module.parameters())
        modules.append({
            "name": name,
            "type": type(module).__name__,
            "params": sum(p.numel() for _, p in own),
            "trainable": sum(p.numel() for _, p in own if p.requires_grad),
            "total_params": sum(p.numel() for p in every),  # its own and its submodules'
            "total_trainable": sum(p.numel() for p in every if p.requires_grad),
            "training": module.training,
        })
    return {
        "format": "model",
        "spec": spec,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "num_params": total,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "num_buffers": len(buffers),
        "num_tensors": len(model.state_dict()),
        "parameters": [{"key": n, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                        "trainable": p.requires_grad} for n, p in params],
        "buffers": [{"key": n, "shape": list(b.shape), "dtype": str(b.dtype).removeprefix("torch.")}
                    for n, b in buffers],
        "modules": modules,
    }


def collapse_indices(names: list[str]) -> list[tuple[str, list[int]]]:
    """Collapse layer indices: `blocks.0.attn.qkv.weight` ... `blocks.11...` -> `blocks.{0..11}.attn.qkv.weight`.

    Returns (label, positions of the names it stands for), in order of first occurrence. Names are grouped by
    their text with every index replaced; each index position is written as one value, a range `{a..b}`, or
    a list `{a,b,c}`.
    """
    groups: OrderedDict[str, list[int]] = OrderedDict()
    indices: list[list[str]] = []
    for i, name in enumerate(names):
        indices.append(_INDEX.findall(name))
        groups.setdefault(_INDEX.sub("{}", name), []).append(i)
    out = []
    for pattern, members in groups.items():
        text = pattern
        for pos in range(len(indices[members[0]])):
            values = list(dict.fromkeys(int(indices[i][pos]) for i in members))
            text = text.replace("{}", _format_range(values), 1)
        out.append((text, members))
    return out


def _format_range(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    s = sorted(values)
    if s == list(range(s[0], s[-1] + 1)):
        return f"{{{s[0]}..{s[-1]}}}"
    if len(s) > 6:
        return "{" + ",".join(map(str, s[:3])) + ",...," + str(s[-1]) + "}"
    return "{" + ",".join(map(str, s)) + "}"


def group_by_prefix(info: dict[str, TensorInfo], depth: int = 1) -> list[dict[str, Any]]:
    """Tensor and parameter counts per module prefix (the first `depth` name components)."""
    groups: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for key, t in info.items():
        parts = key.split(".")
        prefix = ".".join(parts[:depth]) if len(parts) > depth else "(top level)"
        g = groups.setdefault(prefix, {"prefix": prefix, "tensors": 0, "params": 0})
        g["tensors"] += 1
        g["params"] += t.numel
    return list(groups.values())


# ---- diff -------------------------------------------------------------------------------------------------


@dataclass
class Diff:
    """How the tensors of two checkpoints or models differ; `notes` explain differences known to be benign."""

    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatch: list[dict[str, Any]] = field(default_factory=list)
    dtype_mismatch: list[dict[str, Any]] = field(default_factory=list)
    num_common: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def identical_layout(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.shape_mismatch or self.dtype_mismatch)


def diff(a: Source, b: Source) -> Diff:
    """Compare two sources key by key and explain what is known to be harmless or easy to fix."""
    keys_a, keys_b = a.info, b.info
    result = Diff(
        only_in_a=[k for k in keys_a if k not in keys_b],
        only_in_b=[k for k in keys_b if k not in keys_a],
    )
    common = [k for k in keys_a if k in keys_b]
    result.num_common = len(common)
    for k in common:
        ta, tb = keys_a[k], keys_b[k]
        if ta.shape != tb.shape:
            result.shape_mismatch.append({"key": k, "a": list(ta.shape), "b": list(tb.shape)})
        elif ta.dtype != tb.dtype:
            result.dtype_mismatch.append({"key": k, "a": ta.dtype, "b": tb.dtype})
    result.notes = _notes(a, b, result)
    return result


def _notes(a: Source, b: Source, d: Diff) -> list[str]:
    notes = []
    if d.num_common:  # benign extras only mean something when the two otherwise share names
        for side, keys, other, other_info in (("A", d.only_in_a, "B", b.info), ("B", d.only_in_b, "A", a.info)):
            # ... and only for modules the other side has (an old file's BatchNorm), not for whole extra blocks
            other_modules = {k.rpartition(".")[0] for k in other_info}
            for suffix, benign in BENIGN_TENSORS.items():
                hits = [k for k in keys if k.rsplit(".", 1)[-1] == suffix and k.rpartition(".")[0] in other_modules]
                if hits:
                    verb = "is one of the" if len(hits) == 1 else "are"
                    notes.append(f"{_count(len(hits), 'key')} only in {side} {verb} {benign.history} (absent from "
                                 f"{other}).")
    by_module: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for m in d.shape_mismatch:
        by_module.setdefault(m["key"].rpartition(".")[0] or m["key"], []).append(m)
    for module, items in by_module.items():
        sa, sb = items[0]["a"], items[0]["b"]
        if len(sa) in (1, 2) and len(sa) == len(sb) and sa[1:] == sb[1:] and sa[0] != sb[0]:
            notes.append(f"{module}: {sa[0]} vs {sb[0]} rows with the same input size — a classifier or "
                         "embedding with another class or vocabulary count; `graft transfer` keeps it new or "
                         "resizes it with a named adapter.")
        elif len(sa) == 4 and len(sb) == 4 and sa[0] == sb[0] and sa[2:] == sb[2:] and sa[1] != sb[1]:
            notes.append(f"{module}: {sa[1]} vs {sb[1]} input channels — a stem for another channel count; "
                         "`graft transfer` adapts it with the input-channel adapter.")
    if d.dtype_mismatch:
        pairs = Counter((m["a"], m["b"]) for m in d.dtype_mismatch)
        text = ", ".join(f"{n} x {x}->{y}" for (x, y), n in pairs.items())
        notes.append(f"{_count(len(d.dtype_mismatch), 'tensor')} differ{'s' if len(d.dtype_mismatch) == 1 else ''} only in dtype ({text}); values cast on load.")
    notes.extend(_prefix_notes(d))
    if d.num_common == 0 and a.info and b.info:
        shapes_a = [t.shape for t in a.info.values()]
        shapes_b = [t.shape for t in b.info.values()]
        same = sum(x == y for x, y in zip(shapes_a, shapes_b))
        if len(shapes_a) == len(shapes_b) and same == len(shapes_a):
            notes.append("No names in common, but the two hold the same sequence of shapes: likely the same "
                         "architecture with other module names (`graft transfer` matches by structure).")
        else:
            notes.append("No names in common: the files name their modules differently; `graft transfer` "
                         "matches by structure where names differ.")
    return notes


def _prefix_notes(d: Diff) -> list[str]:
    """Keys that match once one side's leading component is removed (`model.`, `backbone.`, `bert.` ...)."""
    notes = []
    for side, mine, theirs in (("A", d.only_in_a, set(d.only_in_b)), ("B", d.only_in_b, set(d.only_in_a))):
        heads = Counter(k.split(".", 1)[0] for k in mine if "." in k)
        for head, count in heads.most_common(3):
            matched = sum(1 for k in mine if k.startswith(head + ".") and k[len(head) + 1:] in theirs)
            if matched >= max(2, count // 2):
                notes.append(f"{_count(matched, 'key')} only in {side} match the other side once their prefix `{head}.` is "
                             "removed; `graft transfer` normalises such prefixes.")
    return notes


def _count(n: int, noun: str) -> str:
    """`1 key`, `2 keys`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _jsonable(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
