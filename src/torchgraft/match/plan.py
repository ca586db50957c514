"""The plan: which source tensor(s) each target tensor takes, how, and why — decided by stages, kept as data.

    plan(source, model) -> Plan        decide, reading names and shapes only
    Plan.to_dict() / Plan.from_dict()  a file to review and edit (`graft plan --out`), applied as it is

Matching is the ordered list `STAGES`. Each stage is a function over one shared `State`; it sees only the
target tensors the stages before it left undecided and the source tensors they left unused, and records every
decision as a `Step` with its evidence (`method`, `how`, `note`, `candidates`):

    drops              source tensors a rule drops are never used
    merges_and_splits  rules that join several source tensors into one target, or cut one into several
    renames            rules that rename a source tensor              method: rule
    exact              equal names                                    method: exact
    prefixes           names equal once a prefix found by analysing both sides is removed
                       (module., backbone., bert., ...)               method: prefix
    structure          first `trace`: the target's execution order (and the source model's, when given), by
                       one forward pass on the meta device (registration order, and a note why, when it
                       cannot run); then modules aligned in execution order by their tensors' shapes
                       where names differ; only
                       pairs every best alignment agrees on, in runs of at least MIN_RUN modules that agree
                       in order (or a shape found once on each side)  method: structure
    folds              conv biases that stand for a BatchNorm (another framework's file): into the target
                       conv's bias, the norm's running mean (`bias_into_bn`), or an identity norm the
                       exporter folded away (`unfold_bn`)
    stem               a renamed first convolution with other input channels, tied by its neighbours
    adapters           each shape mismatch goes to the adapter registry (`torchgraft.adapt.ADAPTERS`): a
                       named adapter with its arguments, or the tensor stays new and says why
    orphans            a counter (`num_batches_tracked`) loads only beside its module's other tensors
    module_settings    a source module's eps/momentum (a Keras BatchNorm's) carried to its target module
    casts              the dtype each value is placed in, when it changes
    layouts            each tensor of another framework's file: its name there and its layout adapter

A plan step never says `loaded`: its `action` is `load`, `adapt` or `new`; applying the plan
(`torchgraft.transfer.apply`) returns a `Report` of what happened. Everything `apply` needs is in the plan
(adapter names and arguments, class-row maps, split parts, casts), with fingerprints of the source and target
it was made for, so a stale plan is refused instead of applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from torchgraft import adapt
from torchgraft.classes import known_classes
from torchgraft.errors import GraftError
from torchgraft.io.read import Source, load
from torchgraft.match.names import BENIGN_TENSORS, Rules, best_prefixes, is_benign, load_rules, under_prefix
from torchgraft.match.trace import execution_order
from torchgraft.match.structure import (
    FUSED_LAYOUTS,
    Group,
    GroupMatch,
    align,
    ancestors,
    check_blocks,
    fuse_projections,
    fused_layout,
    split_containers,
    groups_from_keys,
    natural_order,
    order_known,
    settle_by_flow,
    signature,
    tensor_pairs,
)
from torchgraft.report import LOW_OVERLAP, check_finite, check_new, sources_of
from torchgraft.summary import collapse_indices

__all__ = ["Plan", "Step", "State", "STAGES", "ACTIONS", "PLAN_VERSION", "plan", "as_source", "DTYPES"]

PLAN_FORMAT = "torchgraft.plan"
#: Module attributes a plan may carry from a source module to its target (`Plan.settings`).
MODULE_SETTINGS = ("eps", "momentum")
PLAN_VERSION = 1
#: What a step will do: place the source tensor as it is (or cut or joined exactly), place an adapter's output,
#: or leave the model's own value.
ACTIONS = ("load", "adapt", "new")
#: The dtypes `dtype=` (and `graft transfer --dtype`) can name.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Step:
    """What will happen to one target tensor, and the evidence for it."""

    target: str
    source: str | list[str] | None
    action: str
    """"load" | "adapt" | "new"."""
    method: str
    """The stage that decided: "exact" | "prefix" | "rule" | "rule:merge" | "rule:split" | "structure" | "none"."""
    how: str = ""
    """The evidence in a word or two: the alignment kind, the prefix removed, the rule that renamed."""
    adapter: str | None = None
    args: dict[str, Any] | None = None
    """The adapter's arguments, all that applying it needs."""
    note: str = ""
    candidates: list[str] = field(default_factory=list)
    """Source modules a target could come from, when the evidence does not single one out (the first
    `MAX_CANDIDATES`)."""
    cast: str | None = None
    """The dtype the value is placed in, when it differs from the source tensor's."""
    layout: str | None = None
    """The layout adapter (`torchgraft.layout`) the reader of another framework's file lays the stored value
    out with, as the source says; applying the plan reads the source again, so this is the record."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "source": self.source, "action": self.action,
                               "method": self.method}
        for name in ("how", "adapter", "args", "note", "candidates", "cast", "layout"):
            value = getattr(self, name)
            if value:
                out[name] = value
        return out


def _fingerprint(shapes: Mapping[str, tuple[tuple[int, ...], str]]) -> str:
    text = json.dumps(sorted((k, list(s), d) for k, (s, d) in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _source_shapes(source: Source) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(i.shape), i.dtype) for k, i in source.info.items()}


def _target_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for k, t in model.state_dict(keep_vars=True).items()}


@dataclass
class Plan:
    """Every target tensor's step, the source tensors no step uses, and what the plan was made for."""

    source: str
    target: str
    steps: list[Step]
    unused_source: list[dict[str, str]] = field(default_factory=list)
    """`{"source": key, "why": reason}` for each source tensor no step takes."""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """How matching ran: whether each model was traced in execution order, or why not."""
    dtype: str | None = None
    """None: each value takes the dtype of the target tensor; else every floating tensor ends in this dtype."""
    fingerprint: dict[str, str] = field(default_factory=dict)
    """`{"source": ..., "target": ...}`: hashes of the keys, shapes and dtypes the plan was made for."""
    target_numel: dict[str, int] = field(default_factory=dict, repr=False)
    numeric: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False, compare=False)
    """Numeric problems of source tensors already checked (by `check_strict`), so `apply` reads each once."""
    origin: str = field(default="plan", repr=False, compare=False)
    """Where the plan was read from, for error messages."""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """target module -> attributes it takes from its source module (a Keras BatchNorm's `eps`, `momentum`)."""

    def step(self, target: str) -> Step:
        for s in self.steps:
            if s.target == target:
                return s
        raise KeyError(target)

    def counts(self) -> dict[str, int]:
        c = Counter(s.action for s in self.steps)
        return {**{a: c.get(a, 0) for a in ACTIONS}, "unused_source": len(self.unused_source)}

    @property
    def loaded_fraction(self) -> float:
        """Share of the target's elements the plan takes from the source."""
        total = sum(self.target_numel.values()) or 1
        return sum(self.target_numel.get(s.target, 0) for s in self.steps if s.action != "new") / total

    def summary(self, max_rows: int = 12) -> str:
        c = self.counts()
        lines = [f"{c['load']} to load, {c['adapt']} to adapt, {c['new']} new, {c['unused_source']} source tensors "
                 f"unused ({self.loaded_fraction:.1%} of the target's values from the source)"]
        lines += [f"warning: {w}" for w in self.warnings]
        rows = collapse_indices([s.target for s in self.steps if s.action == "new" and not is_benign(s.target)])
        if rows:
            lines.append("new:")
            lines += [f"  {label}" + (f"  x{len(m)}" if len(m) > 1 else "") for label, m in rows[:max_rows]]
            if len(rows) > max_rows:
                lines.append(f"  ... and {len(rows) - max_rows} more (Plan.to_dict() lists them all)")
        return "\n".join(lines)

    def check_strict(self, allow_new: Sequence[str] = (), source: Source | None = None) -> None:
        """Raise unless every target tensor will be loaded or adapted (benign buffers and `allow_new` globs
        aside), and (with `source`) unless every source tensor the plan takes is finite."""
        from torchgraft.numeric import check_tensor

        check_new(self.steps, allow_new, "new")
        if source is None:
            return
        problems = []
        for s in self.steps:
            for name in sources_of(s.source) if s.action != "new" else []:
                if name not in self.numeric and name in source.info:
                    self.numeric[name] = check_tensor(name, source[name])
                problems += self.numeric.get(name, [])
        check_finite(problems)

    # -- as a file

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "source": self.source,
            "target": self.target,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "summary": self.counts(),
            "steps": [s.to_dict() for s in self.steps],
            "unused_source": self.unused_source,
            "warnings": self.warnings,
            "notes": self.notes,
            **({"settings": self.settings} if self.settings else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        """A plan from `to_dict()`'s form (a reviewed, perhaps edited file); every field is checked."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            old = isinstance(data, dict) and "entries" in data
            raise GraftError(f"{where}: " + ("a plan written by an older torchgraft (no format version)" if old else
                                             "not a plan written by `graft plan --out`")
                             + f"; expected a JSON object with \"format\": \"{PLAN_FORMAT}\". Re-run `graft plan`.")
        if data.get("version") != PLAN_VERSION:
            raise GraftError(f"{where}: plan format version {data.get('version')!r}; this torchgraft reads version "
                             f"{PLAN_VERSION}. Re-run `graft plan` with this torchgraft.")
        steps_data = data.get("steps")
        if not isinstance(steps_data, list):
            raise GraftError(f"{where}: \"steps\" is {type(steps_data).__name__}; expected a list of steps.")
        steps = [_step_from_dict(item, f"{where}: step {i + 1}") for i, item in enumerate(steps_data)]
        dtype = data.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise GraftError(f"{where}: dtype {dtype!r}; expected null or one of {', '.join(DTYPES)}.")
        unused = data.get("unused_source", [])
        if not isinstance(unused, list) or not all(isinstance(u, dict) and isinstance(u.get("source"), str)
                                                   for u in unused):
            raise GraftError(f"{where}: \"unused_source\" must be a list of {{\"source\": KEY, \"why\": TEXT}}.")
        fingerprint = data.get("fingerprint") or {}
        if not isinstance(fingerprint, dict):
            raise GraftError(f"{where}: \"fingerprint\" must be an object; re-run `graft plan`.")
        warnings = [str(w) for w in data.get("warnings") or []]
        notes = [str(n) for n in data.get("notes") or []]
        settings = data.get("settings") or {}
        if not isinstance(settings, dict) or not all(
                isinstance(v, dict) and all(a in MODULE_SETTINGS and isinstance(x, (int, float)) for a, x in v.items())
                for v in settings.values()):
            raise GraftError(f"{where}: \"settings\" must map module names to {{attribute: number}} with attributes "
                             f"among {', '.join(MODULE_SETTINGS)}; re-run `graft plan`.")
        return cls(source=str(data.get("source", "")), target=str(data.get("target", "")), steps=steps,
                   unused_source=[{"source": u["source"], "why": str(u.get("why", ""))} for u in unused],
                   warnings=warnings, notes=notes, dtype=dtype,
                   fingerprint={str(k): str(v) for k, v in fingerprint.items()}, settings=settings)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON, atomically."""
        from torchgraft.io.write import atomic_write

        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise GraftError(f"{path}: cannot read the plan ({type(exc).__name__}: {exc}); expected a JSON file "
                             "written by `graft plan --out`.") from None
        result = cls.from_dict(data, where=str(path))
        result.origin = str(path)
        return result

    def check_fits(self, source: Source, model: nn.Module) -> None:
        """Refuse a plan made for another source or model, or one they have changed since: one error naming the
        first key that does not fit."""
        where = self.origin
        target = _target_shapes(model)
        src = _source_shapes(source)
        for s in self.steps:
            if s.target not in target:
                raise GraftError(f"{where}: the plan names target tensor {s.target!r}, which the model does not "
                                 "have; expected a plan made for this --model. Re-run `graft plan`.")
            for name in sources_of(s.source) if s.action != "new" else []:
                if name not in src:
                    raise GraftError(f"{where}: the plan takes source tensor {name!r} (for {s.target}), which "
                                     f"{source.path} does not hold; expected a plan made for this checkpoint. "
                                     "Re-run `graft plan`.")
            if s.action == "load" and s.adapter is None and isinstance(s.source, str) \
                    and src[s.source][0] != target[s.target][0]:
                raise GraftError(f"{where}: the plan loads {s.source} {list(src[s.source][0])} into {s.target} "
                                 f"{list(target[s.target][0])}; expected equal shapes or an adapter. Fix the step "
                                 "or re-run `graft plan`.")
        planned = {s.target for s in self.steps}
        missing = [k for k in target if k not in planned]
        if missing:
            raise GraftError(f"{where}: the model has {len(missing)} tensors the plan does not mention (first: "
                             f"{missing[0]}); expected a plan made for this --model. Re-run `graft plan`.")
        for side, shapes, mentioned in (("source", src, self._source_keys()), ("target", target, set(target))):
            expected = self.fingerprint.get(side)
            if expected is None or expected == _fingerprint(shapes):
                continue
            new = [k for k in shapes if k not in mentioned]
            what = source.path if side == "source" else "the model"
            first = (f"{new[0]!r} is not in the plan" if new else
                     "the same keys, but shapes or dtypes differ")
            raise GraftError(f"{where}: a stale plan: {what} changed since it was made ({first}); expected the "
                             f"{side} the plan was made for. Re-run `graft plan`.")

    def _source_keys(self) -> set[str]:
        keys = {u["source"] for u in self.unused_source}
        for s in self.steps:
            keys.update(sources_of(s.source))
        return keys


def _step_from_dict(item: Any, where: str) -> Step:
    if not isinstance(item, dict) or not isinstance(item.get("target"), str):
        raise GraftError(f"{where}: expected an object with a \"target\" tensor name.")
    target = item["target"]
    action = item.get("action")
    if action not in ACTIONS:
        raise GraftError(f"{where} ({target}): action {action!r}; expected one of {', '.join(ACTIONS)}.")
    source = item.get("source")
    if not (source is None or isinstance(source, str)
            or isinstance(source, list) and source and all(isinstance(x, str) for x in source)):
        raise GraftError(f"{where} ({target}): source {source!r}; expected a tensor name, a list of them, or null.")
    if action != "new" and source is None:
        raise GraftError(f"{where} ({target}): action {action!r} without a source; expected a source tensor name, "
                         "or action \"new\".")
    name, args = item.get("adapter"), item.get("args")
    if name is not None:
        adapter = adapt.get(name, f"{where} ({target})")
        args = adapter.check_args(args, f"{where} ({target})")
        if action == "new":
            raise GraftError(f"{where} ({target}): action \"new\" with adapter {name!r}; expected \"load\" or "
                             "\"adapt\" for an adapter, or no adapter.")
    elif action == "adapt":
        raise GraftError(f"{where} ({target}): action \"adapt\" without an adapter; expected one of "
                         f"{', '.join(sorted(adapt.ADAPTERS))}.")
    elif isinstance(source, list):
        raise GraftError(f"{where} ({target}): several sources without the \"merge\" adapter.")
    cast = item.get("cast")
    if cast is not None and cast not in DTYPES and not isinstance(cast, str):
        raise GraftError(f"{where} ({target}): cast {cast!r}; expected a dtype name or null.")
    candidates = item.get("candidates") or []
    layout = item.get("layout")
    if layout is not None:
        adapt.get(layout, f"{where} ({target}) layout")
    return Step(target=target, source=source, action=action, method=str(item.get("method", "rule")),
                how=str(item.get("how", "")), adapter=name, args=args, note=str(item.get("note", "")),
                candidates=[str(c) for c in candidates], cast=cast, layout=layout)


# ---- the shared state -------------------------------------------------------------------------------------


def _first_conv(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and isinstance(cfg.get("first_conv"), str):
        return cfg["first_conv"]
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return name
    return None


@dataclass
class _Pending:
    """A pair whose shapes differ: the adapters stage decides."""

    target: str
    source: str
    method: str
    how: str
    note: str


#: The most candidate source modules a step that stays new lists (a stack of identical blocks makes every block
#: a candidate for every other).
MAX_CANDIDATES = 8


class State:
    """What the stages share: both sides' shapes, the steps decided so far, and the source tensors used."""

    def __init__(self, source: Source, model: nn.Module, rules: Rules, source_classes: Sequence[str] | None,
                 target_classes: Sequence[str] | None, dtype: str | None, source_model: nn.Module | None = None,
                 input_shape: tuple[int, ...] | None = None) -> None:
        self.source, self.model, self.rules = source, model, rules
        self.source_model, self.input_shape = source_model, input_shape
        self.tracing, self.traced = True, False
        self.source_classes, self.target_classes, self.dtype = source_classes, target_classes, dtype
        state = model.state_dict(keep_vars=True)
        self.tgt = {k: tuple(v.shape) for k, v in state.items()}
        self.tgt_dtype = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}
        self.tgt_floating = {k: v.dtype.is_floating_point for k, v in state.items()}
        self.tgt_numel = {k: v.numel() for k, v in state.items()}
        self.src = {k: tuple(i.shape) for k, i in source.info.items()}
        self.modules = dict(model.named_modules())
        self.first_conv = _first_conv(model)
        self.steps: dict[str, Step] = {}
        self.used: set[str] = set()
        self.why_unused: dict[str, str] = {}
        self.pending: list[_Pending] = []
        self.warnings: list[str] = []
        self.notes: list[str] = list(source.notes)  # what the reader could not know comes first
        self.target_order: list[str] | None = None
        self.virtual_targets: dict[str, list[Group]] = {}  # virtual fused group -> the separate projections
        self.source_order: list[str] | None = None
        self.target_flow: dict[str, set[str]] | None = None  # module -> modules its output feeds (traced)
        self.source_flow: dict[str, set[str]] | None = None
        self.target_joined: set[tuple[str, str]] = set()  # flow edges only through a residual addition
        self.source_joined: set[tuple[str, str]] = set()
        self.settings: dict[str, dict[str, Any]] = {}  # target module -> attributes from its source module

    def free_targets(self) -> list[str]:
        return [k for k in self.tgt if k not in self.steps]

    def free_sources(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, s in self.src.items() if k not in self.used and k not in self.why_unused}

    def take(self, target: str, source: str | list[str], method: str, how: str = "", note: str = "",
             adapter: str | None = None, args: dict[str, Any] | None = None) -> None:
        """Decide that `target` loads `source` (exactly, or cut or joined by an exact adapter)."""
        self.steps[target] = Step(target, source, "load", method, how, adapter, args, note)
        self.used.update(sources_of(source))

    def pair(self, target: str, source: str, method: str, how: str = "", note: str = "") -> None:
        """`target` comes from `source`: loaded when the shapes agree, else left to the adapters stage."""
        if self.src[source] == self.tgt[target]:
            self.take(target, source, method, how, note)
        else:
            self.pending.append(_Pending(target, source, method, how, note))
            self.used.add(source)
            self.steps[target] = Step(target, source, "new", method, how, note="(shape mismatch, pending)")

    def leave_new(self, group: Group, note: str, candidates: Sequence[str] = ()) -> None:
        """Every tensor of `group` stays new (each separate projection, for a virtual fused group), with at most
        `MAX_CANDIDATES` of its candidates (the note counts them all)."""
        shown = list(candidates[:MAX_CANDIDATES])
        for member in self.virtual_targets.get(group.name, [group]):
            self._leave_new(member, note, shown)

    def _leave_new(self, group: Group, note: str, candidates: Sequence[str]) -> None:
        for n, _ in group.tensors:
            key = _join(group.name, n)
            self.steps[key] = Step(key, None, "new", "none", note=note, candidates=list(candidates))


# ---- the stages, in order ---------------------------------------------------------------------------------


def trace(st: State) -> None:
    """Execution order of the target (and of the source model, when one is given), for structure matching;
    run by `structure` only when names left something to align (tracing costs a forward pass on the meta
    device), and not at all with `trace=False`."""
    if st.traced or not st.tracing:
        return
    st.traced = True
    found = execution_order(st.model, st.input_shape)
    st.target_order, st.target_flow, st.target_joined = found.order, found.flow, found.joined
    st.notes.append(f"target {found.note}")
    if st.source_model is not None:
        traced = execution_order(st.source_model, st.input_shape)
        st.notes.append(f"source model {traced.note}")
        st.source_flow, st.source_joined = traced.flow, traced.joined
        if traced.order is not None:
            st.source_order = [k for k in traced.order if k in st.src] + [k for k in st.src if k not in
                                                                          set(traced.order)]
    elif getattr(st.source, "flow", None) is not None:  # a file that describes its graph (a Keras config)
        st.source_flow, st.source_joined = st.source.flow, st.source.joined
        st.notes.append("source data flow from the file's graph")


def drops(st: State) -> None:
    """Source tensors a rule drops are never used."""
    for k in st.src:
        if st.rules.is_dropped(k):
            st.why_unused[k] = "dropped by a rule"


def merges_and_splits(st: State) -> None:
    """Rules that concatenate several source tensors into one target, or cut one into equal parts."""
    free = st.free_sources()
    for target, sources, dim in st.rules.expand_merges(free):
        if target not in st.tgt or target in st.steps or not all(s in free for s in sources):
            continue
        shapes = [list(st.src[s]) for s in sources]
        total = list(shapes[0])
        total[dim] = sum(s[dim] for s in shapes)
        rest = shapes[0][:dim] + shapes[0][dim + 1:]
        if tuple(total) == st.tgt[target] and all(s[:dim] + s[dim + 1:] == rest for s in shapes):
            args = {"dim": dim}
            st.take(target, list(sources), "rule:merge", "merge rule", adapt.get("merge").sentence(args, (), ()),
                    "merge", args)
    free = st.free_sources()
    for source, targets, dim in st.rules.expand_splits(free):
        if source not in free or any(t not in st.tgt or t in st.steps for t in targets):
            continue
        shape = list(st.src[source])
        if shape[dim] % len(targets):
            continue
        chunk = shape[:dim] + [shape[dim] // len(targets)] + shape[dim + 1:]
        if all(st.tgt[t] == tuple(chunk) for t in targets):
            for i, t in enumerate(targets):
                args = {"dim": dim, "part": i, "parts": len(targets)}
                st.take(t, source, "rule:split", "split rule", adapt.get("split").sentence(args, (), ()), "split",
                        args)


def renames(st: State) -> None:
    """Rules that rename a source tensor."""
    for s in list(st.free_sources()):
        hit = st.rules.renamed(s)
        if hit is None:
            continue
        target, rule = hit
        if target in st.tgt and target not in st.steps:
            st.pair(target, s, "rule", rule, note=f"renamed by {rule!r}")


def exact(st: State) -> None:
    """Equal names."""
    free = st.free_sources()
    for t in st.free_targets():
        if t in free:
            st.pair(t, t, "exact")


def prefixes(st: State) -> None:
    """Names equal once prefixes found by analysing both sides are removed (`module.`, `backbone.` ...). A
    prefix renames only the names under it; two that fit equally well but pair differently are a warning."""
    free = st.free_sources()
    targets = {t: st.tgt[t] for t in st.free_targets()}
    if not free or not targets:
        return
    choice = best_prefixes(free, targets)
    if choice.rivals:
        shown = " and ".join(f"{sp or '(none)'!r} -> {tp or '(none)'!r}" for sp, tp in choice.rivals[:3])
        sp, tp = choice.rivals[0]
        st.warnings.append(
            f"prefixes {shown} fit equally well but pair the tensors differently (two copies of one network?); "
            f"none was used. Choose with a rule, e.g. rename: {{'re:^{re.escape(sp)}': '{tp}'}}")
    sp, tp = choice.source, choice.target
    if choice.hits <= 0 or not (sp or tp):
        return
    by_name = under_prefix(free, sp)
    parts = [f"source prefix {sp!r} removed" if sp else "", f"target prefix {tp!r} removed" if tp else ""]
    note = "; ".join(p for p in parts if p)
    for rest, t in under_prefix(targets, tp).items():
        s = by_name.get(rest)
        if s is not None and s not in st.used:
            st.pair(t, s, "prefix", f"{sp or '(none)'} -> {tp or '(none)'}", note)


def structure(st: State) -> None:
    """Modules aligned by their tensors' names and shapes where module names differ (`match.structure`)."""
    with _conv_biases_aside(st):
        _structure(st)


def _structure(st: State) -> None:
    free = st.free_sources()
    targets = st.free_targets()
    if not free or not targets:
        return
    trace(st)
    # Module classes are not compared: libraries name the same computation differently (BatchNorm2d in
    # torchvision, BatchNormAct2d in timm); shapes and local tensor names decide.
    # A file stored with keys sorted as strings (safetensors) has lost its module order. natural_order puts
    # numbered modules back in order; when that is the whole order that matters (`order_known`), align
    # against the model's own order, leaving out the positions of the groups a sort may have moved (their
    # place does not matter). Otherwise put both sides in the same canonical order, so that `blocks.2`
    # meets `blocks.2`, and load by position only under equal names.
    # Both sides in execution order where it is known: the target traced, the source traced when its model
    # was given (`source_model=`), else the file's order.
    # a file whose order is not its model's (`Source.order_known`: a Keras .weights.h5 without its config) is
    # read as if sorted: nothing is placed by its position alone
    order_lost = st.source_order is None and (not st.source.order_known or _string_sorted(list(st.src)))
    src_keys = _in_order(free, st.source_order) if st.source_order else \
        (natural_order(free) if order_lost else list(free))
    src_groups, src_virtual = fuse_projections(split_containers(groups_from_keys({k: free[k] for k in src_keys})))
    tgt_order = _in_order(targets, st.target_order)
    if st.source_order is None:  # the file's order: a module's own tensors stand before its children's
        tgt_order = _own_tensors_first(tgt_order)
    tgt_groups, tgt_virtual = fuse_projections(split_containers(groups_from_keys({k: st.tgt[k] for k in tgt_order})))
    cut_at_anchors = True
    if order_lost and st.source.order_known and _order_recovered(src_groups, tgt_groups):
        order_lost = cut_at_anchors = False
    elif order_lost:
        # Both sides sorted by name: where a unique module sits in that order says nothing about its place in
        # the network (a target's `added` sorts before its `classifier`, a source's `body` before its `head`),
        # so the unique matches do not cut the alignment into regions.
        tgt_groups, tgt_virtual = fuse_projections(split_containers(groups_from_keys(
            {k: st.tgt[k] for k in natural_order(sorted(targets))})))
        cut_at_anchors = False
    st.virtual_targets = tgt_virtual
    matches = align(src_groups, tgt_groups, cut_at_anchors=cut_at_anchors)
    short = _short_runs(matches, len(src_groups), len(tgt_groups)) if not order_lost else set()
    known = {(step.source.rpartition(".")[0], k.rpartition(".")[0]) for k, step in st.steps.items()
             if step.action != "new" and isinstance(step.source, str)}
    evidenced = [m for m in matches if m.target not in short]
    off_block, settled, regions = check_blocks(src_groups, tgt_groups, evidenced, known,
                                               cut_at_anchors=cut_at_anchors)
    how = dict.fromkeys(settled, "aligned in block")
    if st.source_flow and st.target_flow:  # both traced: neighbours along the data flow settle the rest
        trusted = [m.target for m in evidenced if m.source is not None and m.target not in off_block]
        trusted += [t for t in settled if t not in off_block]
        for t, s in settle_by_flow(src_groups, tgt_groups, _settle(matches, settled, how), st.source_flow,
                                   st.target_flow, trusted, regions, st.source_joined, st.target_joined).items():
            off_block.pop(t, None)
            settled[t], how[t] = s, "data flow"
    if settled:
        matches = _settle(matches, settled, how)
        if not order_lost:
            short = _short_runs(matches, len(src_groups), len(tgt_groups)) - {t for t in how if how[t] == "data flow"}
    unplaced: list[Group] = []  # unmatched target groups: explained once the stage has used what it loads
    for m in matches:
        tg = tgt_groups[m.target]
        if m.target in off_block:
            st.leave_new(tg, off_block[m.target], [src_groups[m.source].name])
            continue
        if m.source is None:
            if m.candidates:
                names = [src_groups[i].name or "(root)" for i in m.candidates]
                st.leave_new(tg, f"ambiguous: fits source modules {_listed(names)} equally well; add a rename rule "
                                 "to choose", names)
            else:
                unplaced.append(tg)
            continue
        sg = src_groups[m.source]
        if m.how == "aligned+names" and _local(sg.name) != _local(tg.name):
            # Equally good alignments, settled by the likeness of whole paths: soft evidence, trusted only when
            # the modules' own names agree too. A block whose shortcut is registered first (Hugging Face's
            # ResNet) makes the 1x1 convolutions of its main path and shortcut trade places otherwise.
            st.leave_new(tg, f"ambiguous: fits source module {sg.name or '(root)'} and others equally well in "
                             "order, and their names differ; add a rename rule, or give the source model to "
                             "align both in execution order", [sg.name])
            continue
        if order_lost and m.how != "unique-signature" and _local(sg.name) != _local(tg.name):
            # Aligned by position in an order the file did not keep, under other names: not evidence enough.
            st.leave_new(tg, f"might be source module {sg.name or '(root)'}, but the file stores keys sorted by "
                             "name, so its module order is unknown; add a rename rule to load it", [sg.name])
            continue
        if tg.name in tgt_virtual or sg.name in src_virtual:
            if m.target in short:
                st.leave_new(tg, "separate and fused projections alike in shape, but fewer than "
                                 f"{MIN_RUN} modules in a row agree with them; not loaded", [sg.name])
            else:
                _take_projections(st, sg, tg, src_virtual.get(sg.name), tgt_virtual.get(tg.name), m.how)
            continue
        if m.target in short:
            st.leave_new(tg, f"resembles source module {sg.name or '(root)'} (same tensor shapes), but fewer than "
                             f"{MIN_RUN} modules in a row agree with it in execution order: not evidence enough "
                             "(another architecture?); add a rename rule to load it", [sg.name])
            continue
        for s_name, t_name in tensor_pairs(sg, tg):  # shapes may differ in size-1 dimensions: `reshape`
            st.pair(_join(tg.name, t_name), _join(sg.name, s_name), "structure", m.how,
                    note=f"module {sg.name or '(root)'} -> {tg.name or '(root)'} ({m.how})")
    _explain_unplaced(st, unplaced, src_groups)


def _settle(matches: Sequence[GroupMatch], settled: Mapping[int, int], how: Mapping[int, str]) -> list[GroupMatch]:
    """`matches` with each settled target group given its source (and how it was settled)."""
    return [GroupMatch(m.target, settled[m.target], [], how[m.target]) if m.target in settled else m
            for m in matches]


def _explain_unplaced(st: State, groups: list[Group], src_groups: list[Group]) -> None:
    """Target groups no alignment placed, while source groups of the same shapes are still unused: say which
    they resemble, so that "no source tensor matches" is never said of a module that has look-alikes."""
    if not groups:
        return
    free: dict[Any, list[str]] = {}
    for g in src_groups:
        if all(_join(g.name, n) not in st.used for n, _ in g.tensors):
            free.setdefault(signature(g), []).append(g.name or "(root)")
    how = "" if st.source_model is not None else "give the source model (both traced, their data flow compared) or "
    for tg in groups:
        names = free.get(signature(tg))
        if names:
            st.leave_new(tg, f"resembles source modules {_listed(names)} (same shapes), but neither "
                             f"their order nor their neighbours place one here; {how}add a rename rule", names)


#: The fewest consecutive module pairs (consecutive in both models' execution order) that make structural
#: evidence: equal shapes in a short run are what two different architectures share by chance.
MIN_RUN = 6


def _take_projections(st: State, sg: Group, tg: Group, s_parts: list[Group] | None, t_parts: list[Group] | None,
                      how: str) -> None:
    """A fused projection paired with separate ones (or separate with separate): each separate target tensor
    takes its part of the fused source (`split`), a fused target takes the separate sources joined (`merge`)."""
    fused = sg if t_parts is not None and s_parts is None else tg if s_parts is not None and t_parts is None \
        else None
    layout = fused_layout(fused) if fused is not None else "blocked"
    if layout != "blocked":
        parts = t_parts if t_parts is not None else s_parts or []
        fused_keys = [_join(fused.name, n) for n, _ in fused.tensors]
        part_keys = [_join(p.name, n) for p in parts for n, _ in p.tensors[:1]]
        family = fused.name.rpartition(".")[2]
        where = f"{'source ' if fused is sg else ''}module {fused.name}"
        if layout == "heads":
            note = (f"resembles {where}, a fused projection that interleaves its heads ({family!r}); no adapter "
                    "cuts that layout yet, so it stays new")
        else:
            rule = (f"split: [{{source: {fused_keys[0]}, targets: [{', '.join(part_keys)}], dim: 0}}]"
                    if fused is sg else
                    f"merge: [{{target: {fused_keys[0]}, sources: [{', '.join(part_keys)}], dim: 0}}]")
            note = (f"resembles {where}, a fused projection of a family torchgraft does not know ({family!r}; "
                    f"known: {', '.join(sorted(FUSED_LAYOUTS))}); if its rows are [Q; K; V] one after another, "
                    f"this rule loads it: {rule}")
        st.leave_new(tg, note, [sg.name])
        return
    note = f"module {sg.name} -> {tg.name} ({how}; blocked [Q; K; V] layout)"
    for s_name, t_name in tensor_pairs(sg, tg):
        if t_parts is not None and s_parts is not None:
            for s_part, t_part in zip(s_parts, t_parts):
                st.pair(_join(t_part.name, t_name), _join(s_part.name, s_name), "structure", how, note)
        elif t_parts is not None:
            source = _join(sg.name, s_name)
            for i, t_part in enumerate(t_parts):
                args = {"dim": 0, "part": i, "parts": len(t_parts)}
                st.take(_join(t_part.name, t_name), source, "structure", how,
                        f"{note}; {adapt.get('split').sentence(args, (), ())}", "split", args)
        else:
            args = {"dim": 0}
            st.take(_join(tg.name, t_name), [_join(p.name, s_name) for p in s_parts or []], "structure", how,
                    f"{note}; {adapt.get('merge').sentence(args, (), ())}", "merge", args)


def _short_runs(matches: Sequence[Any], n_source: int, n_target: int) -> set[int]:
    """Target groups aligned by position ("aligned", "aligned+names") whose run of consecutive pairs — target
    i -> source j, i + 1 -> j + 1, ... — is shorter than `MIN_RUN` (or than the smaller model, when it has
    fewer groups). A unique signature stands on its own evidence."""
    pairs = {m.target: m.source for m in matches if m.source is not None}
    need = min(MIN_RUN, n_source, n_target)
    short: set[int] = set()
    for t in sorted(pairs):
        if t - 1 in pairs and pairs[t - 1] == pairs[t] - 1:
            continue  # not the start of a run
        run = [t]
        while run[-1] + 1 in pairs and pairs[run[-1] + 1] == pairs[run[-1]] + 1:
            run.append(run[-1] + 1)
        if len(run) < need:
            short.update(run)
    how = {m.target: m.how for m in matches}
    return {t for t in short if how[t] != "unique-signature"}


def _own_tensors_first(keys: list[str]) -> list[str]:
    """Traced keys with each module's own tensors moved before its first submodule's, as a state dict (and so a
    checkpoint file) orders them: ConvNeXt's layer scale is used after its block's convolutions but stored
    before them. Aligned against a file's order, the trace keeps what it knows (the order of leaf modules)
    and takes the file's convention for the rest."""
    modules = {k.rpartition(".")[0] for k in keys}
    owners = modules & ancestors(modules)
    if not owners:
        return keys
    out: list[str] = []
    placed: set[str] = set()
    own: dict[str, list[str]] = {m: [] for m in owners}
    for k in keys:
        module = k.rpartition(".")[0]
        if module in own:
            own[module].append(k)
    for key in keys:
        module = key.rpartition(".")[0]
        if module in owners:
            continue  # placed with its first descendant (or at the end, when it has none here)
        parts = module.split(".") if module else []
        for depth in range(len(parts) + 1):
            ancestor = ".".join(parts[:depth])
            if ancestor in owners and ancestor not in placed and ancestor != module:
                placed.add(ancestor)
                out.extend(own[ancestor])
        out.append(key)
    out.extend(k for m in owners if m not in placed for k in own[m])
    return out


def _in_order(keys: Iterable[str], order: Sequence[str] | None) -> list[str]:
    """`keys` in `order` (a traced execution order), those it lacks last in their own order."""
    keys = list(keys)
    if not order:
        return keys
    wanted = set(keys)
    ranked = [k for k in order if k in wanted]
    seen = set(ranked)
    return ranked + [k for k in keys if k not in seen]


def stem(st: State) -> None:
    """The first convolution when its input channels changed and its name did too (timm's `in_chans=4` model
    from torchvision's file): the first convolution of each side, in module order, paired only when every other
    dimension agrees and the modules right after them were matched to each other. It then goes to the
    `input_channels` adapter, with its bias if it has one."""
    name = st.first_conv
    key = f"{name}.weight"
    if name is None or key not in st.tgt or key in st.steps:
        return
    order = _source_order(st)
    t = st.tgt[key]
    first = next((k for k in order or () if k.endswith(".weight") and len(st.src[k]) == len(t) >= 3), None)
    if first is None or first in st.used or first in st.why_unused:
        return
    s = st.src[first]
    if not (s[0] == t[0] and s[2:] == t[2:] and s[1] != t[1]):
        return
    s_module = first.rpartition(".")[0]
    s_next, t_next = _module_after(order, s_module), _module_after(st.tgt, name)
    if s_next is None or t_next is None:
        return
    loaded_from = {step.source.rpartition(".")[0] for k, step in st.steps.items()
                   if k.rpartition(".")[0] == t_next and step.action == "load" and isinstance(step.source, str)}
    if loaded_from != {s_next}:
        return  # nothing confirms that these two are the same place in the network
    note = f"first convolution {s_module} -> {name}, as {s_next} -> {t_next} after it"
    st.pair(key, first, "structure", "stem", note)
    bias_s, bias_t = f"{s_module}.bias", f"{name}.bias"
    if bias_t in st.tgt and bias_t not in st.steps and bias_s in st.free_sources() \
            and st.src[bias_s] == st.tgt[bias_t]:
        st.take(bias_t, bias_s, "structure", "stem", note)


def adapters(st: State) -> None:
    """Each pair whose shapes differ goes to the adapter registry: a named adapter with its arguments, or the
    target stays new and the source unused, each saying why. Nothing is cropped."""
    prefix_tokens = getattr(st.model, "num_prefix_tokens", 1)
    for p in st.pending:
        s, t = st.src[p.source], st.tgt[p.target]
        module = st.modules.get(p.target.rpartition(".")[0])
        fit = adapt.Fit(p.target, p.source, t, s, module, p.target.rpartition(".")[0] == st.first_conv,
                        st.source_classes, st.target_classes,
                        prefix_tokens if isinstance(prefix_tokens, int) else 1)
        chosen = adapt.choose(fit)
        before = f"{p.note}; " if p.note else ""
        if isinstance(chosen, tuple):
            adapter, args = chosen
            st.steps[p.target] = Step(p.target, p.source, "load" if adapter.exact else "adapt", p.method, p.how,
                                      adapter.name, args, before + adapter.sentence(args, s, t))
            continue
        why = chosen or (f"source {p.source} has shape {list(s)}, target {list(t)}; not cropped — a rule can ask "
                         "for it")
        st.steps[p.target] = Step(p.target, None, "new", "none", note=before + why)
        st.used.discard(p.source)
        st.why_unused[p.source] = f"shape {list(s)} does not fit {p.target} {list(t)}"


_NORM_ROLES = ("weight", "bias", "running_mean", "running_var")


def _is_conv_bias(key: str, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    module, _, local = key.rpartition(".")
    return local == "bias" and len(shapes.get(_join(module, "weight"), ())) >= 3


def _following_norm(st: State, module: str) -> str | None:
    """The BatchNorm the target conv `module` feeds, over as many channels as it has: by the traced data flow,
    else the next module with tensors in registration order."""
    channels = st.tgt.get(_join(module, "weight"), (0,))[0]
    if st.target_flow is not None:
        after = sorted(st.target_flow.get(module, ()))
    else:
        names = [n for n, m in st.modules.items() if any(True for _ in m.parameters(recurse=False))]
        at = names.index(module) if module in names else -1
        after = names[at + 1:at + 2] if at >= 0 else []
    norms = [n for n in after if isinstance(st.modules.get(n), nn.modules.batchnorm._BatchNorm)
             and all(_join(n, r) in st.tgt for r in _NORM_ROLES) and st.tgt[_join(n, "weight")][0] == channels]
    return norms[0] if len(norms) == 1 else None


@contextlib.contextmanager
def _conv_biases_aside(st: State) -> Iterator[None]:
    """For a source whose conv biases may stand for a BatchNorm (`Source.folded_bn`, `Source.foldable_bias`),
    convs are aligned by their kernels alone: those biases, and the target's conv biases that could meet them,
    are set aside while `structure` runs; the `folds` stage then decides where each goes."""
    source = st.source
    if not (source.folded_bn or source.foldable_bias):
        yield
        return
    trace(st)
    hidden_src = {k for k in st.src if k in source.foldable_bias or (source.folded_bn and _is_conv_bias(k, st.src))}
    free = st.free_targets()
    hidden_tgt = {k for k in free if _is_conv_bias(k, st.tgt)
                  and (source.folded_bn or _following_norm(st, k.rpartition(".")[0]) is not None)}
    if source.folded_bn and not any(k.endswith(".running_mean") for k in st.src):
        # every norm was folded: the norms after convs have nothing to meet, and would only break the runs
        convs = {k.rpartition(".")[0] for k in free if k.endswith(".weight") and len(st.tgt[k]) >= 3}
        norms = {n for n in (_following_norm(st, c) for c in convs) if n is not None}
        hidden_tgt |= {k for k in free if k.rpartition(".")[0] in norms}
    full_src, full_tgt = st.src, st.tgt
    st.src = {k: v for k, v in full_src.items() if k not in hidden_src}
    st.tgt = {k: v for k, v in full_tgt.items() if k not in hidden_tgt}
    try:
        yield
    finally:
        st.src, st.tgt = full_src, full_tgt


def folds(st: State) -> None:
    """Conv biases that stand for a BatchNorm, once convs are matched by their kernels:
    - the target conv has a bias: it takes the source conv's;
    - a bias the source feeds alone into a BatchNorm (`Source.foldable_bias`), for a target conv without one:
      moved into the matched norm's running mean (`bias_into_bn`);
    - a source whose exporter folded BatchNorms into convs (`Source.folded_bn`), for a target conv without a
      bias followed by a BatchNorm nothing placed: the conv keeps the folded kernel and the norm becomes the
      identity carrying the folded bias (`unfold_bn`). All exact in eval mode."""
    source = st.source
    if not (source.folded_bn or source.foldable_bias):
        return
    for key, step in list(st.steps.items()):
        if step.action == "new" or not isinstance(step.source, str) or not key.endswith(".weight") \
                or len(st.tgt[key]) < 3:
            continue
        t_mod, s_mod = key.rpartition(".")[0], step.source.rpartition(".")[0]
        s_bias: str | None = _join(s_mod, "bias")
        if s_bias not in st.src or s_bias in st.used:
            s_bias = None
        t_bias = _join(t_mod, "bias")
        if t_bias in st.tgt:
            if s_bias is not None and t_bias not in st.steps:
                st.pair(t_bias, s_bias, step.method, step.how)
            continue
        norm = _following_norm(st, t_mod)
        if norm is None:
            continue
        keys = [_join(norm, r) for r in _NORM_ROLES]
        if s_bias is not None and s_bias in source.foldable_bias:
            mean = st.steps.get(keys[2])
            if mean is not None and mean.action == "load" and mean.adapter is None \
                    and mean.source == _join(source.foldable_bias[s_bias], "running_mean") \
                    and st.src[s_bias] == st.tgt[keys[2]]:
                st.steps[keys[2]] = Step(keys[2], [mean.source, s_bias], "adapt", mean.method, mean.how,
                                         "bias_into_bn", {}, f"{s_mod}'s bias moved into the running mean: "
                                         f"{t_mod} has no bias")
                st.used.add(s_bias)
        elif source.folded_bn and not any(k in st.steps for k in keys):
            eps = float(st.modules[norm].eps)
            for role, k in zip(_NORM_ROLES, keys):
                st.steps[k] = Step(k, s_bias or step.source, "adapt", "folded", f"folded into {s_mod}",
                                   "unfold_bn", {"role": role, "eps": eps},
                                   f"the exporter folded this BatchNorm into {s_mod}: the identity"
                                   + (" carrying its bias" if role == "bias" and s_bias else ""))
            if s_bias is not None:
                st.used.add(s_bias)


def module_settings(st: State) -> None:
    """Attributes a source module says its target module should take (`Source.module_attrs`: a Keras
    BatchNorm's `eps` and `momentum`), for a target module whose tensors come from that module alone; each one
    that differs from the model's is recorded in `Plan.settings` and noted on the module's tensors."""
    attrs = st.source.module_attrs
    if not attrs:
        return
    origins: dict[str, set[str]] = {}
    for key, step in st.steps.items():
        if step.action != "new":
            for name in sources_of(step.source):
                origins.setdefault(key.rpartition(".")[0], set()).add(name.rpartition(".")[0])
    changed = Counter()
    for t_mod, s_mods in origins.items():
        carrying = [m for m in s_mods if m in attrs]
        module = st.modules.get(t_mod)
        if len(carrying) != 1 or module is None:
            continue
        for attr, value in attrs[carrying[0]].items():
            now = getattr(module, attr, None)
            if attr in MODULE_SETTINGS and isinstance(now, (int, float)) and not isinstance(now, bool) \
                    and float(now) != float(value):
                st.settings.setdefault(t_mod, {})[attr] = value
                changed[(attr, now, value)] += 1
                for key in (k for k in st.steps if k.rpartition(".")[0] == t_mod):
                    note = f"{attr} {now} -> {value} from {carrying[0]}"
                    st.steps[key].note = f"{st.steps[key].note}; {note}" if st.steps[key].note else note
    for (attr, now, value), n in changed.items():
        st.notes.append(f"{n} modules take {attr} {value} from the source (the model had {now})")


def orphans(st: State) -> None:
    """A benign tensor (`num_batches_tracked`) is loaded only beside its module's other tensors, from the same
    source module: a counter is shaped like every other counter, so alone it is no evidence of anything."""
    for key, step in list(st.steps.items()):
        if step.action == "new" or not is_benign(key) or not isinstance(step.source, str):
            continue
        module, source_module = key.rpartition(".")[0], step.source.rpartition(".")[0]
        siblings = [s for k, s in st.steps.items() if k.rpartition(".")[0] == module and not is_benign(k)]
        if siblings and all(s.action != "new" and isinstance(s.source, str)
                            and s.source.rpartition(".")[0] == source_module for s in siblings):
            continue
        st.steps[key] = Step(key, None, "new", "none", note=BENIGN_TENSORS[key.rpartition(".")[2]].keeps)
        st.used.discard(step.source)


def casts(st: State) -> None:
    """Record the dtype each value is placed in when it changes: the target tensor's dtype, or `dtype` for
    every floating tensor."""
    for key, step in st.steps.items():
        out = st.tgt_dtype[key]
        if st.dtype is not None and st.tgt_floating[key]:
            out = st.dtype
        first = sources_of(step.source)[:1] if step.action != "new" else []
        before = st.source.info[first[0]].dtype if first else st.tgt_dtype[key]
        if before != out:
            step.cast = out
            cast = f"cast {before} -> {out}"
            step.note = f"{step.note}; {cast}" if step.note else cast


def layouts(st: State) -> None:
    """Each step from another framework's file says the tensor's name in the file and records the layout
    adapter its reader laid the stored value out with (`Source.origins`, `Source.layouts`)."""
    if not st.source.origins:
        return
    for step in st.steps.values():
        if step.action == "new":
            continue
        said = []
        for name in sources_of(step.source):
            origin = st.source.origins.get(name, name)
            if name in st.source.layouts:
                adapter, args = st.source.layouts[name]
                step.layout = step.layout or adapter
                said.append(f"{origin}: {adapt.get(adapter).sentence(args, (), st.tgt[step.target])}")
            elif origin != name:
                said.append(f"from {origin}")
        if said:
            step.note = "; ".join(said + ([step.note] if step.note else []))


#: The matching stages, in the order they run; each sees only what the stages before it left.
STAGES: tuple[Callable[[State], None], ...] = (drops, merges_and_splits, renames, exact, prefixes, structure,
                                               folds, stem, adapters, orphans, module_settings)


def _finish(st: State) -> Plan:
    for t in st.tgt:
        if t not in st.steps:
            benign = BENIGN_TENSORS.get(t.rsplit(".", 1)[-1])
            st.steps[t] = Step(t, None, "new", "none", note=benign.keeps if benign else "no source tensor matches")
    casts(st)
    layouts(st)
    steps = [st.steps[t] for t in st.tgt]
    unused = [{"source": k, "why": st.why_unused.get(k, "no target tensor matches its name or structure")}
              for k in st.src if k not in st.used]
    result = Plan(source=st.source.path, target=type(st.model).__name__, steps=steps, unused_source=unused,
                  warnings=list(st.warnings), notes=list(st.notes), dtype=st.dtype,
                  fingerprint={"source": _fingerprint(_source_shapes(st.source)),
                               "target": _fingerprint(_target_shapes(st.model))},
                  target_numel=st.tgt_numel, settings=st.settings)
    if result.loaded_fraction < LOW_OVERLAP:
        result.warnings.append(
            f"only {result.loaded_fraction:.1%} of the target's values come from {st.source.path}: is this the "
            "right checkpoint for this model?")
    return result


# ---- helpers ----------------------------------------------------------------------------------------------


def _listed(names: Sequence[str], shown: int = 4) -> str:
    """`a, b, c, d and 3 more`."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _local(module: str) -> str:
    return module.rpartition(".")[2]


def _join(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _module_after(keys: Iterable[str], module: str) -> str | None:
    """The module whose tensors come next after `module`'s among `keys` (tensor names in module order)."""
    modules = list(dict.fromkeys(k.rpartition(".")[0] for k in keys))
    i = modules.index(module) + 1
    return modules[i] if i < len(modules) else None


def _order_recovered(src_groups: list[Group], tgt_groups: list[Group]) -> bool:
    """Whether natural order gave a string-sorted source all the module order alignment needs: the only groups
    that may still be out of place are those whose place does not matter — a signature unique on both sides
    (matched wherever it stands) or absent from the target (never matched: an old head, a changed stem)."""
    count_s = Counter(signature(g) for g in src_groups)
    count_t = Counter(signature(g) for g in tgt_groups)

    def placeless(g: Group) -> bool:
        sig = signature(g)
        return count_t[sig] == 0 or count_s[sig] == count_t[sig] == 1

    return order_known(src_groups, placeless)


def _source_order(st: State) -> list[str] | None:
    """The source's keys in module order, or None when a string-sorted file lost an order that matters."""
    keys = list(st.src)
    if not _string_sorted(keys):
        return keys
    keys = natural_order(keys)
    src_groups = groups_from_keys({k: st.src[k] for k in keys})
    return keys if _order_recovered(src_groups, groups_from_keys(st.tgt)) else None


def _string_sorted(keys: list[str]) -> bool:
    return len(keys) > 1 and keys == sorted(keys)


def as_source(source: Source | Mapping[str, torch.Tensor] | str | os.PathLike[str]) -> Source:
    """What users hold, as a Source: a Source as it is, a state dict (`Source.from_state_dict`), or a path."""
    if isinstance(source, Source):
        return source
    if isinstance(source, Mapping):
        return Source.from_state_dict(source)
    if isinstance(source, (str, os.PathLike)):
        return load(source)
    raise GraftError(f"found a source of type {type(source).__name__}; expected a checkpoint path, a Source from "
                     "torchgraft.load, or a state dict of tensors.")


def resolve_classes(src: Source, given: Sequence[str] | None,
                    target_classes: Sequence[str] | None) -> Sequence[str] | None:
    """Class names of the source's classifier: as given, else known for its file (classes.txt, torchvision)."""
    if given is None and target_classes is not None:
        return known_classes(src.path)
    return given


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """A `dtype=` argument as one of `DTYPES`' names (None stays None)."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise GraftError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}, or None to give "
                         "each loaded tensor the dtype of the target tensor it goes into.")
    return name


def plan(source: Source | Mapping[str, torch.Tensor] | str | os.PathLike[str], model: nn.Module, *,
         rules: Any = None, source_classes: Sequence[str] | None = None,
         target_classes: Sequence[str] | None = None, dtype: str | torch.dtype | None = None,
         source_model: nn.Module | str | None = None, input_shape: Sequence[int] | None = None,
         trace: bool = True) -> Plan:
    """Decide, without touching any values, which source tensor(s) each target tensor takes.

    Args:
        source: a checkpoint path, a `Source` from `torchgraft.load`, or a state dict.
        model: the target model (it may be on the meta device: only names and shapes are read).
        rules: rename/drop/merge/split rules (a dict, a YAML/JSON path, or `Rules`).
        source_classes, target_classes: class names; when both are known, a classifier with another class
            count keeps the rows of the classes the two share (the row map is in the plan).
        dtype: None, or "float32", "float16", "bfloat16" for every floating tensor of the result.
        source_model: the model the checkpoint was saved from (a module, or a spec built with its parameters
            on the meta device): traced, its execution order replaces the file's order (which a safetensors
            file loses).
        input_shape: the input for tracing, e.g. (1, 3, 224, 224); by default read from the model's metadata.
        trace: False aligns in registration order without the forward pass on the meta device (a model that
            cannot run there, or one so large that the pass costs too much).
    """
    src = as_source(source)
    if isinstance(source_model, str):
        from torchgraft.transfer import build_target

        source_model, _ = build_target(source_model)
    st = State(src, model, load_rules(rules), resolve_classes(src, source_classes, target_classes), target_classes,
               dtype_name(dtype), source_model, tuple(input_shape) if input_shape else None)
    st.tracing = trace
    for stage in STAGES:
        stage(st)
    return _finish(st)
