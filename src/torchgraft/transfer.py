"""Map a checkpoint into a model that is not quite the one it was trained for, and say what happened to every tensor.

    plan(source, model)      -> Report   which source tensor(s) each target tensor takes, how, and why not
    apply(report, source, model)         place the tensors (copy, or assign into a meta-device model)
    transfer(source, model)  -> Report   both, in place, like `load_state_dict`

Matching runs in layers, each recorded per tensor as its `method`: user rules (`rule`, `rule:merge`,
`rule:split`), exact names (`exact`), names after removing wrapper prefixes found by analysis (`prefix`), and
structure (`structure`) for whatever is still unmatched. A shape mismatch goes to a named adapter when one
applies (stem channels, classifier rows, position embeddings, vocabularies) and otherwise stays `new`: nothing
is cropped silently. A tensor is loaded only when its source is unambiguous.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchgraft import adapt
from torchgraft.classes import known_classes
from torchgraft.errors import GraftError
from torchgraft.io.pages import FileMaps
from torchgraft.io.read import Source, load
from torchgraft.match.names import Rules, best_prefixes, load_rules, under_prefix
from torchgraft.match.structure import (
    Group,
    align,
    groups_from_keys,
    natural_order,
    order_known,
    signature,
    tensor_pairs,
)
from torchgraft.summary import collapse_indices
from torchgraft.numeric import check_tensor, describe_problems

__all__ = ["Entry", "Report", "plan", "apply", "transfer", "meta_blockers", "parameters_on_meta", "BENIGN_NEW",
           "DTYPES"]

log = logging.getLogger(__name__)

#: Target tensors that may stay new without harm: counters and index buffers a model rebuilds itself.
BENIGN_NEW = {
    "num_batches_tracked": "a BatchNorm counter older files lack; it keeps its default (0)",
    "position_ids": "an index buffer (0, 1, 2, ...) the model builds itself",
}
LOW_OVERLAP = 0.10


@dataclass
class Entry:
    """What one target tensor receives."""

    target: str
    source: str | list[str] | None
    status: str  # "loaded" | "adapted" | "new"
    method: str  # "exact" | "prefix" | "rule" | "rule:merge" | "rule:split" | "structure" | "none"
    adapter: str | None = None
    note: str = ""
    dim: int | None = None  # for merges and splits
    part: int | None = None  # which chunk of a split

    @property
    def benign(self) -> bool:
        return self.status == "new" and self.target.rsplit(".", 1)[-1] in BENIGN_NEW


@dataclass
class Report:
    """The outcome of matching (a plan) or of a transfer: one entry per target tensor, and unused sources."""

    source: str
    target: str
    entries: list[Entry]
    unused_source: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    target_numel: dict[str, int] = field(default_factory=dict, repr=False)
    #: NaN/Inf/all-zero source tensors that were loaded: `{"key", "problem", "count", "target"}` each.
    numeric: list[dict[str, Any]] = field(default_factory=list)
    _numeric_seen: set[str] = field(default_factory=set, repr=False, compare=False)

    def counts(self) -> dict[str, int]:
        c = {"loaded": 0, "adapted": 0, "new": 0}
        for e in self.entries:
            c[e.status] += 1
        c["unused_source"] = len(self.unused_source)
        return c

    @property
    def loaded_fraction(self) -> float:
        """Share of the target's elements that came from the source (loaded or adapted)."""
        total = sum(self.target_numel.values()) or 1
        done = sum(self.target_numel.get(e.target, 0) for e in self.entries if e.status != "new")
        return done / total

    def entry(self, target: str) -> Entry:
        for e in self.entries:
            if e.target == target:
                return e
        raise KeyError(target)

    def by_status(self, status: str) -> list[Entry]:
        return [e for e in self.entries if e.status == status]

    def to_dict(self) -> dict[str, Any]:
        keep = ("target", "source", "status", "method", "adapter", "note")
        return {
            "source": self.source,
            "target": self.target,
            "entries": [{k: v for k, v in asdict(e).items() if k in keep or v is not None} for e in self.entries],
            "unused_source": self.unused_source,
            "summary": self.counts(),
            "warnings": self.warnings,
            "numeric": self.numeric,
        }

    def summary(self, max_rows: int = 12) -> str:
        """A short text: counts, then new and unused tensors with layer indices collapsed ("... and N more")."""
        c = self.counts()
        lines = [f"{c['loaded']} loaded, {c['adapted']} adapted, {c['new']} new, "
                 f"{c['unused_source']} source tensors unused ({self.loaded_fraction:.1%} of the target's values "
                 "from the source)"]
        lines += [f"warning: {w}" for w in self.warnings]
        for title, names in (("adapted", [f"{e.target} ({e.adapter})" for e in self.by_status("adapted")]),
                             ("new", [e.target for e in self.by_status("new") if not e.benign]),
                             ("unused", [u["key"] for u in self.unused_source])):
            rows = collapse_indices(names)
            if rows:
                lines.append(f"{title}:")
                lines += [f"  {label}" + (f"  x{len(m)}" if len(m) > 1 else "") for label, m in rows[:max_rows]]
                if len(rows) > max_rows:
                    lines.append(f"  ... and {len(rows) - max_rows} more")
        return "\n".join(lines)

    def check_numeric(self, source: Source, entries: Sequence[Entry] | None = None) -> None:
        """Check the source tensors that `entries` (default: every loaded or adapted one) take, once each: NaN,
        Inf and all-zero weights are added to `numeric`, with a warning per source tensor."""
        for e in (entries if entries is not None else [e for e in self.entries if e.status != "new"]):
            names = [e.source] if isinstance(e.source, str) else list(e.source or [])
            for name in names:
                if name in self._numeric_seen or name not in source.info:
                    continue
                self._numeric_seen.add(name)
                for problem in check_tensor(name, source[name]):
                    self.numeric.append({**problem, "target": e.target})
                    self.warnings.append(f"source tensor {describe_problems([problem])} (loaded into {e.target})")

    def check_strict(self, allow_new: Sequence[str] = (), source: Source | None = None) -> None:
        """Raise unless every target tensor is loaded or adapted (benign buffers and `allow_new` globs aside),
        and (with `source`, or after `apply`) unless every loaded source tensor is finite."""
        missing = [e.target for e in self.entries if e.status == "new" and not e.benign
                   and not any(fnmatch.fnmatchcase(e.target, p) for p in allow_new)]
        if missing:
            shown = ", ".join(label for label, _ in collapse_indices(missing)[:5])
            raise GraftError(
                f"--strict: {len(missing)} target tensors would stay new ({shown}); expected every tensor loaded "
                "or adapted. Nothing was written. Add a rule for them, or allow them with --allow-new PATTERN "
                "(e.g. --allow-new 'fc.*' for a new head)."
            )
        if source is not None:
            self.check_numeric(source)
        bad = [p for p in self.numeric if p["problem"] in ("nan", "inf")]
        if bad:
            raise GraftError(
                f"--strict: {len(bad)} loaded source tensors hold NaN or infinite values ({describe_problems(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}); the checkpoint is damaged or diverged. Nothing was written. "
                "Use another checkpoint, or drop those tensors with a rule."
            )


# ---- planning ---------------------------------------------------------------------------------------------


def _first_conv(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and isinstance(cfg.get("first_conv"), str):
        return cfg["first_conv"]
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return name
    return None


class _Planner:
    def __init__(self, source: Source, model: nn.Module, rules: Rules,
                 source_classes: Sequence[str] | None, target_classes: Sequence[str] | None) -> None:
        self.source, self.model, self.rules = source, model, rules
        self.source_classes, self.target_classes = source_classes, target_classes
        state = model.state_dict(keep_vars=True)
        self.tgt = {k: tuple(v.shape) for k, v in state.items()}
        self.tgt_numel = {k: v.numel() for k, v in state.items()}
        self.src = {k: tuple(i.shape) for k, i in source.info.items()}
        self.modules = dict(model.named_modules())
        self.first_conv = _first_conv(model)
        self.entries: dict[str, Entry] = {}
        self.used: set[str] = set()
        self.why_unused: dict[str, str] = {}
        self.mismatched: list[tuple[str, str, str, str]] = []  # (target, source, method, note)
        self.prefix_warning: str | None = None

    # -- helpers
    def _free_targets(self) -> list[str]:
        return [k for k in self.tgt if k not in self.entries]

    def _free_sources(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, s in self.src.items() if k not in self.used and k not in self.why_unused}

    def _take(self, target: str, source: str | list[str], method: str, note: str = "", **kw: Any) -> None:
        self.entries[target] = Entry(target, source, "loaded", method, note=note, **kw)
        self.used.update([source] if isinstance(source, str) else source)

    def _pair(self, target: str, source: str, method: str, note: str = "") -> None:
        if self.src[source] == self.tgt[target]:
            self._take(target, source, method, note)
        else:
            self.mismatched.append((target, source, method, note))
            self.used.add(source)
            self.entries[target] = Entry(target, source, "new", method, note="(shape mismatch, pending)")

    # -- layers
    def drops(self) -> None:
        for k in self.src:
            if self.rules.is_dropped(k):
                self.why_unused[k] = "dropped by a rule"

    def merges_and_splits(self) -> None:
        free = self._free_sources()
        for target, sources, dim in self.rules.expand_merges(free):
            if target not in self.tgt or target in self.entries:
                continue
            if not all(s in free for s in sources):
                continue
            shapes = [list(self.src[s]) for s in sources]
            total = list(shapes[0])
            total[dim] = sum(s[dim] for s in shapes)
            if tuple(total) == self.tgt[target] and all(s[:dim] + s[dim + 1:] == shapes[0][:dim] + shapes[0][dim + 1:]
                                                         for s in shapes):
                self._take(target, list(sources), "rule:merge", note=f"concatenated along dim {dim}", dim=dim)
        free = self._free_sources()
        for source, targets, dim in self.rules.expand_splits(free):
            if source not in free or any(t not in self.tgt or t in self.entries for t in targets):
                continue
            shape = list(self.src[source])
            if shape[dim] % len(targets):
                continue
            chunk = shape[:dim] + [shape[dim] // len(targets)] + shape[dim + 1:]
            if all(self.tgt[t] == tuple(chunk) for t in targets):
                for i, t in enumerate(targets):
                    self.entries[t] = Entry(t, source, "loaded", "rule:split",
                                            note=f"part {i + 1} of {len(targets)} along dim {dim}", dim=dim, part=i)
                self.used.add(source)

    def renames(self) -> None:
        for s in list(self._free_sources()):
            hit = self.rules.renamed(s)
            if hit is None:
                continue
            target, rule = hit
            if target in self.tgt and target not in self.entries:
                self._pair(target, s, "rule", note=f"renamed by {rule!r}")

    def exact(self) -> None:
        free = self._free_sources()
        for t in self._free_targets():
            if t in free:
                self._pair(t, t, "exact")

    def prefixes(self) -> None:
        free = self._free_sources()
        targets = {t: self.tgt[t] for t in self._free_targets()}
        if not free or not targets:
            return
        choice = best_prefixes(free, targets)
        if choice.rivals:
            shown = " and ".join(f"{sp or '(none)'!r} -> {tp or '(none)'!r}" for sp, tp in choice.rivals[:3])
            sp, tp = choice.rivals[0]
            self.prefix_warning = (
                f"prefixes {shown} fit equally well but pair the tensors differently (two copies of one network?); "
                f"none was used. Choose with a rule, e.g. rename: {{'re:^{re.escape(sp)}': '{tp}'}}")
        sp, tp = choice.source, choice.target
        if choice.hits <= 0 or not (sp or tp):
            return
        by_name = under_prefix(free, sp)  # a prefix renames its own subtree; names outside it stay for later
        parts = [f"source prefix {sp!r} removed" if sp else "", f"target prefix {tp!r} removed" if tp else ""]
        note = "; ".join(p for p in parts if p)
        for rest, t in under_prefix(targets, tp).items():
            s = by_name.get(rest)
            if s is not None and s not in self.used:
                self._pair(t, s, "prefix", note)

    def structure(self) -> None:
        free = self._free_sources()
        targets = self._free_targets()
        if not free or not targets:
            return
        # Module classes are not compared: libraries name the same computation differently (BatchNorm2d in
        # torchvision, BatchNormAct2d in timm); shapes and local tensor names decide.
        # A file stored with keys sorted as strings (safetensors) has lost its module order. natural_order puts
        # numbered modules back in order; when that is the whole order that matters (`order_known`), align
        # against the model's own order, leaving out the positions of the groups a sort may have moved (their
        # place does not matter). Otherwise put both sides in the same canonical order, so that `blocks.2`
        # meets `blocks.2`, and load by position only under equal names.
        order_lost = _string_sorted(list(self.src))
        src_groups = groups_from_keys({k: free[k] for k in (natural_order(free) if order_lost else free)})
        tgt_groups = groups_from_keys({k: self.tgt[k] for k in targets})
        cut_at_anchors = True
        if order_lost and _order_recovered(src_groups, tgt_groups):
            order_lost = cut_at_anchors = False
        elif order_lost:
            tgt_groups = groups_from_keys({k: self.tgt[k] for k in natural_order(sorted(targets))})
        for m in align(src_groups, tgt_groups, cut_at_anchors=cut_at_anchors):
            tg = tgt_groups[m.target]
            if m.source is None:
                if m.candidates:
                    cands = ", ".join(src_groups[i].name or "(root)" for i in m.candidates[:4])
                    more = f" and {len(m.candidates) - 4} more" if len(m.candidates) > 4 else ""
                    self._leave_new(tg, f"ambiguous: fits source modules {cands}{more} equally well; add a "
                                        "rename rule to choose")
                continue
            sg = src_groups[m.source]
            if order_lost and m.how != "unique-signature" and _local(sg.name) != _local(tg.name):
                # Aligned by position in an order the file did not keep, under other names: not evidence enough.
                self._leave_new(tg, f"might be source module {sg.name or '(root)'}, but the file stores keys "
                                    "sorted by name, so its module order is unknown; add a rename rule to load it")
                continue
            for s_name, t_name in tensor_pairs(sg, tg):
                s_key, t_key = _join(sg.name, s_name), _join(tg.name, t_name)
                self._take(t_key, s_key, "structure",
                           note=f"module {sg.name or '(root)'} -> {tg.name or '(root)'} ({m.how})")

    def stem(self) -> None:
        """The first convolution when its input channels changed and its name did too (timm's `in_chans=4`
        model from torchvision's file): the first convolution of each side, in module order, paired only when
        every other dimension agrees and the modules right after them were matched to each other. It then goes
        to the `input_channels` adapter, with its bias if it has one."""
        name = self.first_conv
        key = f"{name}.weight"
        if name is None or key not in self.tgt or key in self.entries:
            return
        order = self._source_order()
        t = self.tgt[key]
        first = next((k for k in order or () if k.endswith(".weight") and len(self.src[k]) == len(t) >= 3), None)
        if first is None or first in self.used or first in self.why_unused:
            return
        s = self.src[first]
        if not (s[0] == t[0] and s[2:] == t[2:] and s[1] != t[1]):
            return
        s_module = first.rpartition(".")[0]
        s_next, t_next = _module_after(order, s_module), _module_after(self.tgt, name)
        if s_next is None or t_next is None:
            return
        loaded_from = {e.source.rpartition(".")[0] for k, e in self.entries.items()
                       if k.rpartition(".")[0] == t_next and e.status == "loaded" and isinstance(e.source, str)}
        if loaded_from != {s_next}:
            return  # nothing confirms that these two are the same place in the network
        note = f"first convolution {s_module} -> {name}, as {s_next} -> {t_next} after it"
        self._pair(key, first, "structure", note)
        bias_s, bias_t = f"{s_module}.bias", f"{name}.bias"
        if bias_t in self.tgt and bias_t not in self.entries and bias_s in self._free_sources() \
                and self.src[bias_s] == self.tgt[bias_t]:
            self._take(bias_t, bias_s, "structure", note)

    def _source_order(self) -> list[str] | None:
        """The source's keys in module order, or None when a string-sorted file lost an order that matters."""
        keys = list(self.src)
        if not _string_sorted(keys):
            return keys
        keys = natural_order(keys)
        src_groups = groups_from_keys({k: self.src[k] for k in keys})
        return keys if _order_recovered(src_groups, groups_from_keys(self.tgt)) else None

    def _leave_new(self, group: Group, note: str) -> None:
        for n, _ in group.tensors:
            key = _join(group.name, n)
            self.entries[key] = Entry(key, None, "new", "none", note=note)

    def adapters(self) -> None:
        for target, source, method, note in self.mismatched:
            entry = self._adapt(target, source, method, note)
            self.entries[target] = entry
            if entry.status == "new":
                self.used.discard(source)
                self.why_unused[source] = (f"shape {list(self.src[source])} does not fit {target} "
                                           f"{list(self.tgt[target])}")

    def _adapt(self, target: str, source: str, method: str, note: str) -> Entry:
        s, t = self.src[source], self.tgt[target]
        module_name, _, pname = target.rpartition(".")
        module = self.modules.get(module_name)
        prefix = f"{note}; " if note else ""
        same_rest = len(s) == len(t) and s[1:] == t[1:]
        if isinstance(module, nn.modules.conv._ConvNd) and pname == "weight" and len(s) == len(t) and \
                s[0] == t[0] and s[2:] == t[2:] and module_name == self.first_conv:
            return Entry(target, source, "adapted", method, "input_channels",
                         prefix + f"stem {s[1]} -> {t[1]} input channels")
        if isinstance(module, nn.Linear) and same_rest and s[0] != t[0]:
            if self.source_classes and self.target_classes and len(self.source_classes) == s[0] \
                    and len(self.target_classes) == t[0]:
                shared = adapt.count_shared_classes(self.source_classes, self.target_classes)
                if shared:
                    return Entry(target, source, "adapted", method, "classifier_rows",
                                 prefix + f"classifier {s[0]} -> {t[0]} classes: the rows of {shared} shared "
                                          "class names copied, the rest new")
                return Entry(target, None, "new", "none", None,
                             prefix + f"classifier with {t[0]} outputs shares no class name with the source's "
                                      f"{s[0]}; it starts new (source {source})")
            return Entry(target, None, "new", "none", None,
                         prefix + f"classifier with {t[0]} outputs; the source has {s[0]} and no class names on both "
                                  f"sides, so it starts new (source {source})")
        if isinstance(module, nn.Embedding) and same_rest and s[0] != t[0]:
            return Entry(target, source, "adapted", method, "embedding_resize",
                         prefix + f"{s[0]} -> {t[0]} rows: overlap copied, the rest initialised")
        if "pos_embed" in pname and len(s) == 3 == len(t) and s[0] == t[0] == 1 and s[2] == t[2]:
            return Entry(target, source, "adapted", method, "pos_embed_resize",
                         prefix + f"{s[1]} -> {t[1]} positions: grid interpolated, prefix tokens kept")
        return Entry(target, None, "new", "none", None,
                     prefix + f"source {source} has shape {list(s)}, target {list(t)}; not cropped — a rule can ask "
                              "for it")

    def finish(self) -> Report:
        entries = []
        for t in self.tgt:
            e = self.entries.get(t)
            if e is None:
                suffix = t.rsplit(".", 1)[-1]
                e = Entry(t, None, "new", "none", None, BENIGN_NEW.get(suffix, "no source tensor matches"))
            entries.append(e)
        unused = []
        for k in self.src:
            if k in self.used:
                continue
            unused.append({"key": k, "why": self.why_unused.get(k, "no target tensor matches its name or structure")})
        report = Report(source=self.source.path, target=type(self.model).__name__, entries=entries,
                        unused_source=unused, target_numel=self.tgt_numel)
        if self.prefix_warning:
            report.warnings.append(self.prefix_warning)
        if report.loaded_fraction < LOW_OVERLAP:
            report.warnings.append(
                f"only {report.loaded_fraction:.1%} of the target's values come from {self.source.path}: is this the "
                "right checkpoint for this model?")
        return report


def _local(module: str) -> str:
    return module.rpartition(".")[2]


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


def _string_sorted(keys: list[str]) -> bool:
    return len(keys) > 1 and keys == sorted(keys)


def _join(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _source_classes(src: Source, given: Sequence[str] | None,
                    target_classes: Sequence[str] | None) -> Sequence[str] | None:
    """Class names of the source's classifier: as given, else known for its file (classes.txt, torchvision)."""
    if given is None and target_classes is not None:
        return known_classes(src.path)
    return given


def plan(source: Source | str | os.PathLike[str], model: nn.Module, *, rules: Any = None,
         source_classes: Sequence[str] | None = None, target_classes: Sequence[str] | None = None) -> Report:
    """Decide, without touching any values, which source tensor(s) each target tensor takes."""
    src = source if isinstance(source, Source) else load(source)
    source_classes = _source_classes(src, source_classes, target_classes)
    planner = _Planner(src, model, load_rules(rules), source_classes, target_classes)
    planner.drops()
    planner.merges_and_splits()
    planner.renames()
    planner.exact()
    planner.prefixes()
    planner.structure()
    planner.stem()
    planner.adapters()
    return planner.finish()


# ---- applying ---------------------------------------------------------------------------------------------


def _value(entry: Entry, source: Source, current: torch.Tensor, planner_info: dict[str, Any]) -> torch.Tensor:
    if entry.method == "rule:merge":
        return torch.cat([source[s] for s in entry.source], dim=entry.dim or 0)
    tensor = source[entry.source]
    if entry.method == "rule:split":
        n = planner_info["split_counts"][entry.source]
        return torch.chunk(tensor, n, dim=entry.dim or 0)[entry.part or 0]
    if entry.status == "loaded":
        return tensor
    name = entry.adapter
    if name == "input_channels":
        return adapt.adapt_input_channels(tensor, current.shape[1])
    if name == "classifier_rows":
        value, _ = adapt.adapt_classifier_rows(tensor, planner_info["source_classes"],
                                               planner_info["target_classes"], current.detach())
        return value
    if name == "embedding_resize":
        return adapt.resize_embedding(tensor, current.shape[0], current.detach())
    if name == "pos_embed_resize":
        prefix = planner_info["num_prefix_tokens"]
        return adapt.resize_pos_embed(tensor, current.shape[1], num_prefix_tokens=prefix)
    raise GraftError(f"{entry.target}: unknown adapter {name!r}; expected one of {sorted(adapt.ADAPTERS)}.")


#: Adapters that build on the target's freshly initialised tensor (its rows for new classes or tokens).
_ADAPTERS_ON_INIT = ("classifier_rows", "embedding_resize")
#: The dtypes `dtype=` (and `graft transfer --dtype`) can name.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_policy(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise GraftError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}, or None to give "
                         "each loaded tensor the dtype of the target tensor it goes into.")
    return DTYPES[name]


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _note_cast(entry: Entry, before: torch.dtype | str, after: torch.dtype) -> None:
    before, after_name = _dtype_name(before), _dtype_name(after)
    if before == after_name:
        return
    cast = f"cast {before} -> {after_name}"
    if cast not in entry.note:
        entry.note = f"{entry.note}; {cast}" if entry.note else cast


def apply(report: Report, source: Source, model: nn.Module, *, source_classes: Sequence[str] | None = None,
          target_classes: Sequence[str] | None = None, dtype: str | torch.dtype | None = None,
          progress: Callable[[int, int], None] | None = None, release_pages: bool = False) -> None:
    """Place every loaded or adapted tensor of `report` into `model`, in place.

    A tensor of `model` on the meta device gets the source tensor itself (assigned, no copy: for a safetensors
    or torch zip source, a view of the file's memory map), cast only when the dtypes differ; the modules whose
    meta tensors stay new are materialised on the CPU and initialised with their own `reset_parameters` (the
    tensors they share with loaded ones keep the loaded values). Any other tensor is copied into.

    Args:
        dtype: None gives each loaded tensor the dtype of the target tensor it goes into; "float32",
            "float16" or "bfloat16" casts every floating tensor of the model to it. Each entry whose values
            change dtype says so in its note ("cast float16 -> float32").
        progress: called as `progress(bytes_placed, total_bytes)` after each tensor placed.
        release_pages: once a memory-mapped source tensor has been checked and placed, hand its pages back
            (`torchgraft.io.pages`): a tensor assigned as it is reads them from the file again when it is used,
            so resident memory stays near one tensor however big the checkpoint is.
    """
    policy = _dtype_policy(dtype)
    state = model.state_dict(keep_vars=True)
    split_counts: dict[str, int] = {}
    for e in report.entries:
        if e.method == "rule:split" and isinstance(e.source, str):
            split_counts[e.source] = split_counts.get(e.source, 0) + 1
    info = {"split_counts": split_counts, "source_classes": _source_classes(source, source_classes, target_classes),
            "target_classes": target_classes,
            "num_prefix_tokens": getattr(model, "num_prefix_tokens", 1)}
    placed = [e for e in report.entries if e.status != "new"]
    for e in placed:
        if e.target not in state:
            raise GraftError(f"{e.target}: the plan names a tensor the model does not have; the plan does not fit "
                             "this model. Re-run `graft plan`.")
    if any(t.is_meta for t in state.values()):
        _materialise_new(model, report, state)
        state = model.state_dict(keep_vars=True)
    owners = _owners(model)
    releaser = FileMaps() if release_pages else None

    def out_dtype(current: torch.Tensor) -> torch.dtype:
        return policy if policy is not None and current.dtype.is_floating_point else current.dtype

    total = sum(state[e.target].numel() * out_dtype(state[e.target]).itemsize for e in placed)
    done = 0
    assigned: dict[tuple[int, int], int] = {}  # (address, bytes) of values assigned -> id of the target tensor
    for e in placed:
        current = state[e.target]
        value = _value(e, source, current, info)
        report.check_numeric(source, [e])
        if tuple(value.shape) != tuple(current.shape):
            raise GraftError(f"{e.target}: the plan gives shape {list(value.shape)} but the model has "
                             f"{list(current.shape)}; the plan does not fit this model. Re-run `graft plan`.")
        first = e.source if isinstance(e.source, str) else (e.source or [None])[0]
        _note_cast(e, source.info[first].dtype if first in source.info else value.dtype, out_dtype(current))
        cast = value.to(dtype=out_dtype(current))
        if current.is_meta:
            cast = cast.contiguous()
            key = (cast.data_ptr(), cast.numel() * cast.element_size())
            if cast.numel() and assigned.setdefault(key, id(current)) != id(current):
                cast = cast.clone()  # two untied targets from one stored tensor: each gets its own memory
            _assign(owners[id(current)], cast)
        else:
            with torch.no_grad():
                current.copy_(cast)
        if releaser:  # read by the check, copied or assigned unchanged: the file still holds these bytes
            for name in ([e.source] if isinstance(e.source, str) else e.source or []):
                releaser.release(source[name])
        done += current.numel() * out_dtype(current).itemsize
        if progress is not None:
            progress(done, total)
    if policy is not None:
        _cast_floating(model, report, state, policy)
    if releaser is not None:
        releaser.close()
    if progress is not None and not placed:
        progress(0, 0)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        report.warnings.append(
            f"{len(still_meta)} tensors stay on the meta device ({', '.join(still_meta[:3])}"
            f"{', ...' if len(still_meta) > 3 else ''}): they are not in the state_dict (non-persistent buffers "
            "the model computes when it is built), so no checkpoint can fill them. Build the model on the CPU "
            "instead of the meta device.")


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """Every place (module, name, is_parameter) that holds each tensor: tied weights are held in several."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for module in model.modules():
        for name, t in module._parameters.items():
            if t is not None:
                owners.setdefault(id(t), []).append((module, name, True))
        for name, t in module._buffers.items():
            if t is not None:
                owners.setdefault(id(t), []).append((module, name, False))
    return owners


def _assign(places: list[tuple[nn.Module, str, bool]], value: torch.Tensor) -> torch.Tensor:
    """Put `value` itself (no copy) where a tensor was held, everywhere it was held (ties are kept)."""
    param = None
    for module, name, is_param in places:
        if is_param:
            if param is None:
                old = module._parameters[name]
                param = value if isinstance(value, nn.Parameter) else nn.Parameter(
                    value, requires_grad=bool(old is not None and old.requires_grad))
            module._parameters[name] = param
        else:
            module._buffers[name] = value
    return param if param is not None else value


def _cast_floating(model: nn.Module, report: Report, before: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Cast every floating tensor of the model to `dtype` (ties kept); note it on the entries left new."""
    for e in report.entries:
        current = before[e.target]
        if e.status == "new" and current.dtype.is_floating_point:
            _note_cast(e, current.dtype, dtype)
    model.to(dtype)


def _initialiser(module: nn.Module, root: nn.Module | None = None) -> Callable[[], None] | None:
    """The module's own `reset_parameters`; in a Hugging Face model, followed by the model's `_init_weights`
    for that module, so new tensors start as a normal build starts them (a classifier at N(0, 0.02))."""
    reset = next((fn for name in ("reset_parameters", "_reset_parameters")
                  if callable(fn := getattr(module, name, None))), None)
    model_init = getattr(root, "_init_weights", None) if root is not None else None
    if reset is None or not callable(model_init):
        return reset

    def reset_then_model_init() -> None:
        reset()
        try:
            model_init(module)
        except Exception as exc:  # written for a fully built model; reset_parameters has already initialised
            log.debug("%s: the model's _init_weights failed on a partly loaded module (%s: %s); kept "
                      "reset_parameters' values", type(module).__name__, type(exc).__name__, exc)

    return reset_then_model_init


def _materialise_new(model: nn.Module, report: Report, state: dict[str, torch.Tensor]) -> None:
    """Give storage and initial values to the meta tensors the plan leaves new (and to those an adapter builds on).

    Only these tensors get memory; each module holding one runs its own `reset_parameters` while its loaded
    tensors are still on the meta device, so it cannot overwrite them (they are assigned afterwards). A module
    without `reset_parameters` leaves its new tensors at zero, and the entries say so.
    """
    loaded_ids = {id(state[e.target]) for e in report.entries if e.status != "new"}
    needed = {id(state[e.target]) for e in report.entries
              if state[e.target].is_meta and (e.adapter in _ADAPTERS_ON_INIT
                                              or (e.status == "new" and id(state[e.target]) not in loaded_ids))}
    if not needed:
        return
    keys_of: dict[int, list[Entry]] = {}
    for e in report.entries:
        keys_of.setdefault(id(state[e.target]), []).append(e)
    fresh: dict[int, torch.Tensor] = {}  # id of a meta tensor -> the tensor that replaces it (tied ones share it)

    def materialise(module: nn.Module, ids: set[int]) -> list[torch.Tensor]:
        made = []
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(table.items()):
                if t is None or id(t) not in ids:
                    continue
                if id(t) not in fresh:
                    data = torch.zeros(t.shape, dtype=t.dtype, device="cpu")
                    fresh[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if is_param else data
                table[name] = fresh[id(t)]
                made.append(t)
        return made

    for name, module in model.named_modules():
        made = materialise(module, needed)
        if not made:
            continue
        init = _initialiser(module, model)
        if init is None:
            for t in made:
                for e in keys_of.get(id(t), []):
                    if e.status == "new":
                        e.note = (f"{e.note}; " if e.note else "") + (
                            f"left at zero: {type(module).__name__} has no reset_parameters and the model was "
                            "built on the meta device")
            continue
        try:
            with torch.no_grad():
                init()
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            # reset_parameters mixes these tensors with the module's loaded ones, still on the meta device:
            # give the whole module memory and initialise it again (the loaded values are copied in afterwards).
            everything = {id(t) for t in [*module._parameters.values(), *module._buffers.values()]
                          if t is not None and t.is_meta}
            materialise(module, everything)
            with torch.no_grad():
                init()
        log.debug("initialised %s (%s) on the CPU for the tensors it keeps new", name or "(root)",
                  type(module).__name__)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build a model whose parameters are on the meta device and whose buffers are real.

    Each parameter moves to the meta device as it is registered, so the module's own initialisation (which
    runs after) costs nothing, and a model is never held twice; buffers, computed at construction and often in
    no checkpoint (Hugging Face `position_ids`, rotary `inv_freq`), are built as usual, and so is everything
    else a factory computes (timm's `torch.linspace(...).tolist()` drop-path rates). This is what
    `accelerate.init_empty_weights()` does for Hugging Face's `low_cpu_mem_usage`. Parameters a factory then
    reads (`.item()` on a weight) raise, as on the meta device.

        with parameters_on_meta():
            model = AutoModelForSequenceClassification.from_config(config)
        report = transfer("model.safetensors", model)   # loaded tensors assigned, new ones initialised
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta and not isinstance(param, nn.parameter.UninitializedParameter):
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def meta_blockers(model: nn.Module, report: Report) -> list[str]:
    """Why a model built on the meta device could not receive `report` as well as one built normally.

    Empty when every tensor that stays new belongs to a module with `reset_parameters` and the model holds no
    non-persistent buffer (those are computed when a model is built, and no checkpoint holds them).
    """
    reasons = []
    state = model.state_dict(keep_vars=True)
    loaded_ids = {id(state[e.target]) for e in report.entries if e.status != "new"}
    owners = {id(t): m for m in model.modules() for t in [*m._parameters.values(), *m._buffers.values()]
              if t is not None}
    for e in report.entries:
        t = state[e.target]
        if t.is_meta and (e.adapter in _ADAPTERS_ON_INIT or (e.status == "new" and id(t) not in loaded_ids)) \
                and _initialiser(owners[id(t)]) is None:
            reasons.append(f"{e.target} stays new and its module {type(owners[id(t)]).__name__} has no "
                           "reset_parameters to initialise it")
    keys = {id(t) for t in state.values()}
    for name, buffer in model.named_buffers():
        if buffer.is_meta and id(buffer) not in keys:
            reasons.append(f"{name} is a non-persistent buffer, computed when the model is built")
    return reasons


def transfer(source: Source | str | os.PathLike[str], model: nn.Module, *, rules: Any = None, strict: bool = False,
             allow_new: Sequence[str] = (), source_classes: Sequence[str] | None = None,
             target_classes: Sequence[str] | None = None, dtype: str | torch.dtype | None = None,
             progress: Callable[[int, int], None] | None = None) -> Report:
    """Load what fits from `source` into `model`, in place (like `load_state_dict`), and return the Report.

    Args:
        source: a checkpoint path or a `Source` from `torchgraft.load`.
        model: the target model; may be on the meta device.
        rules: rename/drop/merge/split rules (a dict, a YAML/JSON path, or `Rules`).
        strict: raise (before changing the model) unless every target tensor is loaded or adapted; benign
            buffers such as `num_batches_tracked` and `allow_new` globs are exempt.
        source_classes, target_classes: class names; when both are known, a classifier with another class
            count keeps the rows of the classes the two share.
        dtype: None (each loaded tensor takes the dtype of the target tensor), or "float32", "float16",
            "bfloat16": every floating tensor of the model ends in that dtype. Casts are noted per entry.
        progress: called as `progress(bytes_placed, total_bytes)` as tensors are placed.

    A model built on the meta device (`with torch.device("meta"): model = build()`) costs no memory and no
    initialisation: it receives the source tensors themselves (views of the file for safetensors and torch
    zip sources), and only the modules that keep new tensors get memory and run `reset_parameters`.
    """
    src = source if isinstance(source, Source) else load(source)
    report = plan(src, model, rules=rules, source_classes=source_classes, target_classes=target_classes)
    if strict:
        report.check_strict(allow_new, source=src)
    apply(report, src, model, source_classes=source_classes, target_classes=target_classes, dtype=dtype,
          progress=progress)
    for w in report.warnings:
        log.warning(w)
    return report
