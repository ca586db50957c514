"""Which parameters train, what normalization layers do while theirs don't, and how the optimizer sees it.

    freeze(model, *patterns)          stop training the selected parameters; their BatchNorm layers stay in eval
    unfreeze(model, *patterns)        train them again; their BatchNorm layers follow `model.train()` again
    trainable_summary(model)          trainable / frozen counts per module, and the norm layers held in eval
    param_groups(model, lr, ...)      optimizer groups of the trainable parameters: no decay on norms and biases,
                                      learning-rate multipliers by pattern, timm-style layer-wise decay
    UnfreezeSchedule(steps)           gradual unfreezing that adds groups to a live optimizer and resumes exactly
    freeze_bn_modules(model)          optionally swap held BatchNorm2d for torchvision's FrozenBatchNorm2d

Selection. A pattern is an fnmatch glob over parameter names (`layer4.0.conv1.weight`) and module names
(`layer4`, `layer4.*`, `features.1?.*`); a module that matches covers all of its parameters. `types=` selects
modules by class, `first=N` the first N parameters in `named_parameters()` order; selections add up, and no
selection at all means the whole model. A pattern that matches nothing is an error naming the closest real
names, raised before anything changes.

Frozen BatchNorm. A layer with running statistics (BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm with
`track_running_stats`) keeps updating `running_mean`, `running_var` and `num_batches_tracked` in `train()`
mode even when `requires_grad` is off, so a "frozen" backbone drifts. With `bn="eval"` (the default), every
such layer that a freeze concerns and whose parameters are all frozen gets a forward pre-hook that sets
`layer.training = False` just before each forward: `model.train()` cannot undo it, and the hook itself is the
registry (`is_held` looks for it, `unfreeze` removes it by identity). Living in the module's own hook dict, it
survives `copy.deepcopy` (EMA copies) and pickling of whole models, needs no global state, and leaves the
module's class alone. A norm layer without affine parameters (`affine=False`) follows the module that contains
it: it is held when every parameter of that parent is frozen. GroupNorm, LayerNorm and RMSNorm have no
running statistics, so only their parameters are frozen.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchgraft import _callable
from torchgraft.errors import GraftError

__all__ = [
    "freeze",
    "unfreeze",
    "is_held",
    "freeze_bn_modules",
    "trainable_summary",
    "TrainableSummary",
    "ModuleCounts",
    "param_groups",
    "layer_depths",
    "UnfreezeSchedule",
]

log = logging.getLogger(__name__)

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                            *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
# Norm classes from other libraries (timm RmsNorm, LayerNorm2d; transformers LlamaRMSNorm, T5LayerNorm ...).
_NORM_NAME = re.compile(r"Norm(\d+d)?$")
_BN_MODES = ("eval", "train")


# ---- selection --------------------------------------------------------------------------------------------


def _module_prefixes(name: str) -> Iterator[str]:
    """`layer4.0.conv1.weight` -> `layer4`, `layer4.0`, `layer4.0.conv1`: the modules that own the parameter."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def _matches(name: str, pattern: str) -> bool:
    """True when the parameter name, or the name of a module that owns it, matches the glob."""
    return fnmatch.fnmatchcase(name, pattern) or any(fnmatch.fnmatchcase(p, pattern) for p in _module_prefixes(name))


def _closest(pattern: str, candidates: Sequence[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The `n` names most like the pattern (glob characters removed), best first, ties in model order."""
    plain = re.sub(r"[*?\[\]]", "", pattern).strip(".")
    scored = []
    for i, name in enumerate(candidates):
        matcher = difflib.SequenceMatcher(None, plain, name)
        if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff:
            score = matcher.ratio()
            if score >= cutoff:
                scored.append((-score, i, name))
    return [name for _, _, name in sorted(scored)[:n]]


def _no_match_error(what: str, bad: Sequence[str], model: nn.Module, consequence: str) -> GraftError:
    modules = [name for name, _ in model.named_modules() if name]
    params = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    parts = []
    for pattern in bad:
        empty = [name for name in modules if fnmatch.fnmatchcase(name, pattern)]
        if empty:
            shown = ", ".join(empty[:3]) + (f" ... and {len(empty) - 3} more" if len(empty) > 3 else "")
            parts.append(f"{what} pattern {pattern!r} matches only modules without parameters ({shown})")
            continue
        close = _closest(pattern, modules + params)
        hint = f"closest: {', '.join(close)}" if close else f"top-level modules: {_top_level(model)}"
        parts.append(f"{what} pattern {pattern!r} matches no parameter or module; {hint}")
    module = next((name for name, child in model.named_children() if any(True for _ in child.parameters())), "")
    example = f" ({module!r}, {module + '.*'!r}) " if module else " "
    param = f" ({params[0]!r})" if params else ""
    return GraftError(
        "; ".join(parts) + f". {consequence} Patterns are fnmatch globs over module names{example}and parameter "
        f"names{param}; `graft inspect --model SPEC` lists them."
    )


def _top_level(model: nn.Module) -> str:
    names = [name for name, _ in model.named_children()]
    return ", ".join(names[:8]) + (f" ... and {len(names) - 8} more" if len(names) > 8 else "") or "(none)"


def _select(model: nn.Module, patterns: Sequence[str], types: type | Sequence[type], first: int | None,
            verb: str) -> set[int]:
    """Ids of the selected parameter tensors; raises (changing nothing) when any part selects nothing."""
    named = list(model.named_parameters(remove_duplicate=False))
    if not patterns and not types and first is None:
        return {id(p) for _, p in named}
    chosen: set[int] = set()
    bad = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise GraftError(f"{verb}: patterns are strings (globs such as 'layer4.*'), got {pattern!r}.")
        hits = {id(p) for name, p in named if _matches(name, pattern)}
        if not hits:
            bad.append(pattern)
        chosen |= hits
    if bad:
        raise _no_match_error(verb, bad, model, "Nothing was changed.")
    if types:
        wanted = (types,) if isinstance(types, type) else tuple(types)
        hits = {id(p) for m in model.modules() if isinstance(m, wanted) for p in m.parameters()}
        if not hits:
            present = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(False))})
            raise GraftError(
                f"{verb} types=({', '.join(t.__name__ for t in wanted)}) match no module with parameters; the "
                f"model's module types with parameters are {', '.join(present)}. Nothing was changed."
            )
        chosen |= hits
    if first is not None:
        ordered = list(model.parameters())
        if not isinstance(first, int) or isinstance(first, bool) or not 0 < first <= len(ordered):
            raise GraftError(f"{verb} first={first!r}: expected a count from 1 to {len(ordered)} (the model's "
                             "parameter tensors, in named_parameters() order). Nothing was changed.")
        chosen |= {id(p) for p in ordered[:first]}
    return chosen


# ---- the BatchNorm policy ---------------------------------------------------------------------------------


def _hold_in_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: run this norm layer in eval mode whatever `model.train()` said (statistics stay put)."""
    module.training = False


def is_held(module: nn.Module) -> bool:
    """True when `freeze` holds this norm layer in eval mode."""
    return any(hook is _hold_in_eval for hook in module._forward_pre_hooks.values())


def _hold(module: nn.Module) -> None:
    if not is_held(module):
        module.register_forward_pre_hook(_hold_in_eval)
    module.training = False


def _release(module: nn.Module, training: bool) -> None:
    for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _hold_in_eval]:
        del module._forward_pre_hooks[key]
        getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)
    module.training = training


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def _has_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats


def _governing_params(model: nn.Module, name: str, module: nn.Module) -> list[nn.Parameter]:
    """The parameters that decide whether a norm layer is frozen: its own, else those of its nearest parent."""
    own = list(module.parameters(recurse=False))
    while not own and name:
        name = name.rpartition(".")[0]
        own = list(model.get_submodule(name).parameters())
    return own


def _apply_norm_policy(model: nn.Module, touched: set[int], hold: bool) -> tuple[int, int]:
    """Hold or release the norm layers with running statistics that this call concerns; (held, released)."""
    held = released = 0
    for name, module in model.named_modules():
        if not _has_stats(module):
            continue
        params = _governing_params(model, name, module)
        if not params or not any(id(p) in touched for p in params):
            continue
        if hold and not any(p.requires_grad for p in params):
            _hold(module)
            held += 1
        elif is_held(module):
            _release(module, model.training)
            released += 1
    return held, released


def _check_bn(bn: str) -> None:
    if bn not in _BN_MODES:
        raise GraftError(f"bn={bn!r}: expected 'eval' (frozen BatchNorm layers keep their running statistics, "
                         "the default) or 'train' (they keep updating them in train mode). Nothing was changed.")


# ---- freeze / unfreeze ------------------------------------------------------------------------------------


def freeze(model: nn.Module, *patterns: str, types: type | Sequence[type] = (), first: int | None = None,
           bn: str = "eval", train_bn: bool = False) -> list[str]:
    """Stop training the selected parameters (all of them when nothing is selected); returns their names.

    bn: "eval" holds every norm layer with running statistics whose parameters end up all frozen in eval mode,
        even after `model.train()`, so its statistics do not move; "train" leaves those layers to `model.train()`
        (and releases any this call concerns that an earlier freeze held).
    train_bn: keep the affine parameters of the selected norm layers trainable (fastai's default); those
        layers are not frozen, so they keep training mode and update their statistics.

    Returns the names of the parameters this call leaves frozen (the selection minus norm parameters kept by
    `train_bn`), in `named_parameters()` order. Raises GraftError, changing nothing, when a pattern, `types`
    or `first` selects nothing.
    """
    _check_bn(bn)
    chosen = _select(model, patterns, types, first, "freeze")
    kept: set[int] = set()
    if train_bn:
        kept = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)} & chosen
    for p in model.parameters():
        if id(p) in chosen:
            p.requires_grad_(id(p) in kept)
    held, released = _apply_norm_policy(model, chosen, hold=bn == "eval")
    names = [name for name, p in model.named_parameters() if id(p) in chosen and id(p) not in kept]
    log.info("froze %d parameter tensors (%d kept trainable by train_bn); %d norm layers held in eval, %d released",
             len(names), len(kept), held, released)
    return names


def unfreeze(model: nn.Module, *patterns: str, types: type | Sequence[type] = (),
             first: int | None = None) -> list[str]:
    """Train the selected parameters again (all of them when nothing is selected); returns their names.

    Norm layers among them that `freeze` held in eval follow `model.train()` / `model.eval()` again (they take
    the model's current mode). Raises GraftError, changing nothing, when a pattern, `types` or `first` selects
    nothing.
    """
    chosen = _select(model, patterns, types, first, "unfreeze")
    for p in model.parameters():
        if id(p) in chosen:
            p.requires_grad_(True)
    _, released = _apply_norm_policy(model, chosen, hold=False)
    names = [name for name, p in model.named_parameters() if id(p) in chosen]
    log.info("unfroze %d parameter tensors; %d norm layers released to train mode", len(names), released)
    return names


def freeze_bn_modules(model: nn.Module) -> int:
    """Replace each held `nn.BatchNorm2d` with torchvision's `FrozenBatchNorm2d` (statistics and affine copied).

    Only plain BatchNorm2d layers are replaced (subclasses such as timm's BatchNormAct2d also apply an
    activation). The state_dict loses their `num_batches_tracked` and keeps every other key; `weight` and
    `bias` become buffers. Returns how many layers were replaced.
    """
    from torchvision.ops import FrozenBatchNorm2d

    targets = [(name, m) for name, m in model.named_modules()
               if name and type(m) is nn.BatchNorm2d and m.track_running_stats and is_held(m)]
    for name, bn in targets:
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, frozen)
    log.info("replaced %d held BatchNorm2d layers with FrozenBatchNorm2d", len(targets))
    return len(targets)


# ---- summary ----------------------------------------------------------------------------------------------


@dataclass
class ModuleCounts:
    """Trainable and frozen parameter elements of one module, and its norm layers with running statistics."""

    name: str  # "" for the parameters the model itself holds (cls_token, pos_embed ...)
    type: str
    depth: int
    trainable: int
    frozen: int
    norm_layers: int  # layers with running statistics inside this module
    held_in_eval: int  # of those, held in eval by `freeze`

    @property
    def state(self) -> str:
        """One of "trainable", "frozen" (no trainable element) and "partial"."""
        return "partial" if self.trainable and self.frozen else "frozen" if self.frozen else "trainable"


@dataclass
class TrainableSummary:
    """What trains: totals (elements and tensors) and a row per module down to `depth` (2 by default)."""

    trainable: int
    frozen: int
    trainable_tensors: int
    frozen_tensors: int
    norm_layers: int
    held_in_eval: int
    modules: list[ModuleCounts] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for row, counts in zip(out["modules"], self.modules):
            row["state"] = counts.state
        out["total"] = self.total
        return out

    def summary(self) -> str:
        """One line: trainable and frozen counts, and the norm layers held in eval."""
        share = self.trainable / self.total if self.total else 0.0
        return (f"trainable {self.trainable:,} ({share:.1%}) in {self.trainable_tensors} tensors, frozen "
                f"{self.frozen:,} in {self.frozen_tensors} tensors; {self.held_in_eval} of {self.norm_layers} "
                "norm layers with running statistics held in eval")


def trainable_summary(model: nn.Module, depth: int = 2) -> TrainableSummary:
    """Trainable / frozen counts for the whole model and per module (rows for modules down to `depth`)."""
    params = list(model.parameters())
    stats = [m for m in model.modules() if _has_stats(m)]
    summary = TrainableSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        frozen=sum(p.numel() for p in params if not p.requires_grad),
        trainable_tensors=sum(1 for p in params if p.requires_grad),
        frozen_tensors=sum(1 for p in params if not p.requires_grad),
        norm_layers=len(stats),
        held_in_eval=sum(1 for m in stats if is_held(m)),
    )
    own = list(model.parameters(recurse=False))
    if own:
        summary.modules.append(_counts("", type(model).__name__, 0, own, []))
    for name, module in model.named_modules():
        level = name.count(".") + 1
        if not name or level > depth:
            continue
        inner = list(module.parameters())
        norms = [m for m in module.modules() if _has_stats(m)]
        if inner or norms:
            summary.modules.append(_counts(name, type(module).__name__, level, inner, norms))
    return summary


def _counts(name: str, type_name: str, depth: int, params: list[nn.Parameter],
            norms: list[nn.Module]) -> ModuleCounts:
    return ModuleCounts(
        name=name, type=type_name, depth=depth,
        trainable=sum(p.numel() for p in params if p.requires_grad),
        frozen=sum(p.numel() for p in params if not p.requires_grad),
        norm_layers=len(norms), held_in_eval=sum(1 for m in norms if is_held(m)),
    )


# ---- optimizer parameter groups ---------------------------------------------------------------------------


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Each parameter's depth for layer-wise learning-rate decay: 0 at the input, the largest at the head.

    A model with timm's `group_matcher()` gets timm's own grouping (stem, each block, head), as timm's
    `param_groups_layer_decay` uses. Otherwise each top-level child holding parameters is one depth, and a
    top-level `nn.Sequential` / `nn.ModuleList` (a stack of blocks) gives one depth per child; parameters the
    model holds itself count with the first depth.
    """
    names = [name for name, _ in model.named_parameters()]
    if callable(getattr(model, "group_matcher", None)):
        try:
            from timm.models import group_parameters
        except ImportError:
            pass
        else:
            mapping = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
            top = max(mapping.values(), default=0)
            return {name: mapping.get(name, top) for name in names}
    units: list[str] = []
    for child_name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            units += [f"{child_name}.{sub}" for sub, block in child.named_children()
                      if any(True for _ in block.parameters())]
        else:
            units.append(child_name)
    depth_of = {unit: i for i, unit in enumerate(units)}
    out = {}
    for name in names:
        out[name] = next((depth_of[p] for p in _module_prefixes(name) if p in depth_of), 0)
    return out


def _no_decay_ids(model: nn.Module, no_decay: Sequence[str]) -> set[int]:
    """Ids of the parameters exempt from weight decay (see `param_groups`)."""
    if not no_decay:
        return set()
    globs = [rule for rule in no_decay if rule not in ("norm", "bias")]
    declared = getattr(model, "no_weight_decay", None)
    if callable(declared):
        globs += sorted(declared())
    out = set()
    if "norm" in no_decay:
        out |= {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters(remove_duplicate=False):
        if "bias" in no_decay and (name.rsplit(".", 1)[-1] == "bias" or p.ndim <= 1):
            out.add(id(p))
        elif any(_matches(name, g) for g in globs):
            out.add(id(p))
    return out


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 no_decay: Sequence[str] = ("norm", "bias"), lr_mult: Mapping[str, float] | None = None,
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters, each parameter in exactly one named group.

    no_decay: what gets weight_decay 0. "norm": the parameters of normalization layers; "bias": every bias
        and every other 1-D parameter (scales, layer-scale gammas); any other entry is a glob over parameter
        and module names. While it is not empty, the names a model declares with timm's `no_weight_decay()`
        (pos_embed, cls_token ...) are added; `no_decay=()` decays everything.
    lr_mult: {pattern: factor}; a parameter takes the factor of the first pattern it matches (fastai-style
        discriminative learning rates: `{"layer4.*": 0.1}`).
    layer_decay: timm-style layer-wise decay; a parameter at depth d (see `layer_depths`) gets
        `layer_decay ** (max_depth - d)`, with max_depth taken over all parameters, frozen ones included, so
        the factors do not change as a model is unfrozen.

    Each group holds "name" (e.g. "decay", "no_decay", "layer_3/no_decay", "lr_mult[layer4.*]/decay"),
    "params", "param_names", "lr" (= lr * lr_scale), "lr_scale" (what timm's schedulers multiply by) and
    "weight_decay". Groups come in the order of their first parameter in `named_parameters()`.
    """
    if layer_decay is not None and not layer_decay > 0:
        raise GraftError(f"layer_decay={layer_decay!r}: expected a factor > 0 (timm uses 0.65 to 0.85); "
                         "no groups were built.")
    mults = dict(lr_mult or {})
    unmatched = [pat for pat in mults if not any(_matches(n, pat) for n, _ in model.named_parameters())]
    if unmatched:
        raise _no_match_error("lr_mult", unmatched, model, "No groups were built.")
    exempt = _no_decay_ids(model, no_decay)
    depths = layer_depths(model) if layer_decay is not None else {}
    max_depth = max(depths.values(), default=0)
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pattern = next((pat for pat in mults if _matches(name, pat)), None)
        scale = mults[pattern] if pattern is not None else 1.0
        depth = depths.get(name)
        if depth is not None:
            scale = scale * layer_decay ** (max_depth - depth)
        decays = id(p) not in exempt
        key = (depth, pattern, decays)
        if key not in groups:
            parts = ([f"layer_{depth}"] if depth is not None else []) + \
                    ([f"lr_mult[{pattern}]"] if pattern is not None else []) + ["decay" if decays else "no_decay"]
            groups[key] = {"name": "/".join(parts), "params": [], "param_names": [], "lr": lr * scale,
                           "lr_scale": scale, "weight_decay": weight_decay if decays else 0.0}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


# ---- gradual unfreezing -----------------------------------------------------------------------------------


@dataclass
class UnfreezeSchedule:
    """Gradual unfreezing: what starts training at which epoch, with the optimizer kept in step.

        schedule = UnfreezeSchedule([(0, "classifier.*"), (1, "features.1[5-8].*"), (2, "*")])
        schedule.start(model)                                   # everything but the epoch-0 step is frozen
        optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.05))
        for epoch in range(epochs):
            schedule.step(epoch, model, optimizer, lr=1e-3, weight_decay=0.05)   # adds groups when due
            ...train, then save schedule.state_dict() with the model and optimizer...

    To resume, load the schedule's state, then `optimizer = schedule.restore(model, make_optimizer)` rebuilds
    the same groups in the same order, and only then `optimizer.load_state_dict(saved)`.
    """

    steps: list[tuple[int, str | list[str]]]
    """(epoch, pattern or patterns) pairs, epochs increasing from 0; patterns are those of `unfreeze`."""
    _applied: list[int] = field(default_factory=list, init=False, repr=False)
    _group_kwargs: dict[int, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    _start: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        normal: list[tuple[int, list[str]]] = []
        for item in self.steps:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise GraftError(f"unfreeze schedule: each step is (epoch, pattern or patterns), got {item!r}.")
            epoch, patterns = item
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            if not isinstance(epoch, int) or epoch < 0 or not patterns or not all(isinstance(p, str) for p in patterns):
                raise GraftError(f"unfreeze schedule: step {item!r} needs an epoch >= 0 and at least one pattern "
                                 "(e.g. (1, 'layer4.*')).")
            normal.append((epoch, patterns))
        epochs = [e for e, _ in normal]
        if not normal or epochs != sorted(set(epochs)):
            raise GraftError(f"unfreeze schedule: expected steps at increasing epochs, got epochs {epochs}; "
                             "merge the patterns of one epoch into one step.")
        self.steps = normal

    def check(self, model: nn.Module) -> None:
        """Raise now, not epochs into training, when a step's pattern matches nothing in `model`."""
        bad = [p for _, patterns in self.steps for p in patterns
               if not any(_matches(n, p) for n, _ in model.named_parameters(remove_duplicate=False))]
        if bad:
            raise _no_match_error("unfreeze schedule", bad, model, "Nothing was changed.")

    def start(self, model: nn.Module, *, bn: str = "eval", train_bn: bool = False) -> list[str]:
        """Freeze everything, then unfreeze the epoch-0 step; returns the names that train from the start."""
        if self.steps[0][0] != 0:
            raise GraftError(f"unfreeze schedule: start() needs a step at epoch 0 saying what trains first; the "
                             f"first step is at epoch {self.steps[0][0]}. Add e.g. (0, 'fc.*'), or set the initial "
                             "policy with freeze()/unfreeze() and only call step().")
        self.check(model)
        freeze(model, bn=bn, train_bn=train_bn)
        names = unfreeze(model, *self.steps[0][1])
        self._start = {"bn": bn, "train_bn": train_bn}
        self._applied = [0]
        self._group_kwargs = {}
        return names

    def step(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             **group_kwargs: Any) -> list[str]:
        """Unfreeze the steps due at `epoch` and add groups for their newly trainable parameters.

        `group_kwargs` go to `param_groups` (lr, weight_decay, no_decay, lr_mult, layer_decay); lr and
        weight_decay default to the optimizer's defaults. Added groups take param_groups' names with
        "@step{i}" appended. Parameters the optimizer already holds are not added again. Returns the names of
        the parameters added to the optimizer.
        """
        added: list[str] = []
        for i, (at, _) in enumerate(self.steps):
            if at <= epoch and i not in self._applied:
                added += self._apply(i, model, optimizer, group_kwargs)
        return added

    def _apply(self, i: int, model: nn.Module, optimizer: torch.optim.Optimizer,
               group_kwargs: dict[str, Any]) -> list[str]:
        unfreeze(model, *self.steps[i][1])
        kwargs = {"lr": optimizer.defaults.get("lr"), "weight_decay": optimizer.defaults.get("weight_decay", 0.0),
                  **group_kwargs}
        if kwargs["lr"] is None:
            raise GraftError("unfreeze schedule: the optimizer has no default lr; pass lr= to step().")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = all("param_names" in group for group in optimizer.param_groups)
        added = []
        for group in param_groups(model, **kwargs):
            new = [(n, p) for n, p in zip(group["param_names"], group["params"]) if id(p) not in held]
            if not new:
                continue
            group = {**group, "name": f"{group['name']}@step{i}", "params": [p for _, p in new],
                     "param_names": [n for n, _ in new]}
            if not named:  # torch refuses to mix groups with and without names
                del group["param_names"]
            optimizer.add_param_group(group)
            added += [n for n, _ in new]
        self._applied.append(i)
        self._group_kwargs[i] = kwargs
        log.info("unfreeze schedule step %d (epoch %d): %d parameter tensors added to the optimizer",
                 i, self.steps[i][0], len(added))
        return added

    def state_dict(self) -> dict[str, Any]:
        """Plain data (loads with `torch.load(weights_only=True)`): the steps, which were applied, and how."""
        return {
            "steps": [[epoch, list(patterns)] for epoch, patterns in self.steps],
            "applied": list(self._applied),
            "group_kwargs": {str(i): _plain(kw) for i, kw in self._group_kwargs.items()},
            "start": dict(self._start) if self._start is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = [(int(e), list(p)) for e, p in state["steps"]]
        if saved != self.steps:
            raise GraftError(f"unfreeze schedule: the checkpoint was trained with steps {saved}, this schedule has "
                             f"{self.steps}; nothing was loaded. Resume with the checkpoint's steps.")
        self._applied = [int(i) for i in state["applied"]]
        self._group_kwargs = {int(i): dict(kw) for i, kw in state["group_kwargs"].items()}
        self._start = dict(state["start"]) if state.get("start") is not None else None

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | Callable[[nn.Module], Any],
                epoch: int | None = None, **group_kwargs: Any) -> torch.optim.Optimizer:
        """Rebuild a checkpoint's trainable flags and optimizer groups, in order, before its state is loaded.

        Call after `load_state_dict` (and after loading the model's weights). It redoes `start` when the run
        used it, takes `optimizer` (built over the model as `start` or your own freeze policy leaves it) or calls
        it as a factory `optimizer(model)`, then replays the applied steps with the group settings they were
        applied with. Without saved state, `epoch` (the last epoch the checkpoint finished) says which steps
        were applied, `group_kwargs` how. Returns the optimizer; `optimizer.load_state_dict(saved)` comes next.
        """
        known = self._start is not None or bool(self._applied)
        if epoch is not None:
            due = [i for i, (at, _) in enumerate(self.steps) if at <= epoch]
            if known and due != sorted(self._applied):
                raise GraftError(f"unfreeze schedule: the loaded state applied steps {sorted(self._applied)}, but "
                                 f"epoch {epoch} makes steps {due} due; nothing was restored. Pass the epoch the "
                                 "checkpoint finished, or leave epoch out.")
            if not known and self.steps[0][0] == 0:
                self._start = {"bn": "eval", "train_bn": False}
        elif not known:
            raise GraftError("unfreeze schedule: restore() needs the saved state (load_state_dict) or the epoch the "
                             "checkpoint finished; nothing was restored.")
        replay = due if epoch is not None else sorted(self._applied)
        saved_kwargs = dict(self._group_kwargs)
        if self._start is not None:
            self.start(model, **self._start)
        else:
            self._applied, self._group_kwargs = [], {}
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(model)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = sum(1 for p in model.parameters() if p.requires_grad and id(p) not in held)
        if missing:
            raise GraftError(f"unfreeze schedule: the optimizer lacks {missing} of the model's trainable parameter "
                             "tensors; build it over the model as schedule.start(model) leaves it, or pass a "
                             "factory `lambda model: ...` to restore(). Nothing was replayed.")
        for i in replay:
            if i not in self._applied:
                self._apply(i, model, optimizer, saved_kwargs.get(i, group_kwargs))
        return optimizer


def _plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Group settings as plain data: tuples become lists, tensors numbers."""
    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.item()
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        return value

    return {k: convert(v) for k, v in kwargs.items()}



_callable.make_callable(__name__, freeze)
