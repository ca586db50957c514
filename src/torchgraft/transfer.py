"""Apply a plan to a model, with low memory, and report what happened to every tensor.

    plan = match.plan(source, model)       which source tensor(s) each target tensor takes, and why (a Plan)
    report = apply(plan, source, model)    place them: copied, or assigned into a meta-device model (a Report)
    transfer(source, model)                both, in place, like `load_state_dict`
    transfer(source, build=SPEC, out=F)    build the model with its parameters on the meta device, apply,
                                           verify when asked, and write F atomically: about one copy of memory

This module is callable: `torchgraft.transfer(...)` is `torchgraft.transfer.transfer(...)`, and
`import torchgraft.transfer as t` gives the module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from torchgraft import _callable, adapt
from torchgraft.errors import GraftError
from torchgraft.io.pages import FileMaps
from torchgraft.io.read import Source
from torchgraft.match.names import is_benign
from torchgraft.match.plan import DTYPES, Plan, Step, as_source, dtype_name
from torchgraft.match.plan import plan as make_plan
from torchgraft.report import Entry, Report, check_loads_something, sources_of
from torchgraft.verify import ForeignRunner, verify

__all__ = ["Entry", "Report", "Plan", "apply", "transfer", "build_target", "save_state", "meta_blockers",
           "parameters_on_meta", "DTYPES", "OUTPUT_SUFFIXES", "written_settings"]

log = logging.getLogger(__name__)

_STATUS = {"load": "loaded", "adapt": "adapted", "new": "new"}
#: What `out=` can be: the file format each extension names.
OUTPUT_SUFFIXES = {".safetensors": "safetensors", ".pth": "torch", ".pt": "torch", ".bin": "torch"}


def _entry(step: Step) -> Entry:
    return Entry(step.target, step.source, _STATUS[step.action], step.method, step.adapter, step.note,
                 dict(step.args) if step.args else None, step.layout)


def apply(plan: Plan, source: Source | Mapping[str, torch.Tensor] | str | os.PathLike[str], model: nn.Module, *,
          progress: Callable[[int, int], None] | None = None, release_pages: bool = False) -> Report:
    """Carry out `plan` on `model`, in place, and return the Report of what happened.

    Nothing is re-derived: each step's source tensor(s) go through its adapter with the plan's arguments. A
    tensor of `model` on the meta device gets the source tensor itself (assigned, no copy: for a safetensors or
    torch zip source, a view of the file's memory map), cast only when the dtypes differ; the modules whose meta
    tensors stay new are materialised on the CPU and initialised with their own `reset_parameters` (tensors
    they share with loaded ones keep the loaded values). Any other tensor is copied into.

    Args:
        progress: called as `progress(bytes_placed, total_bytes)` after each tensor placed.
        release_pages: once a memory-mapped source tensor has been checked and placed, hand its pages back
            (`torchgraft.io.pages`): a tensor assigned as it is reads them from the file again when it is used,
            so resident memory stays near one tensor however big the checkpoint is.
    """
    src = as_source(source)
    policy = DTYPES[plan.dtype] if plan.dtype is not None else None
    state = model.state_dict(keep_vars=True)
    report = Report(source=src.path, target=type(model).__name__, entries=[_entry(s) for s in plan.steps],
                    unused_source=[dict(u) for u in plan.unused_source], warnings=list(plan.warnings),
                    target_numel={k: v.numel() for k, v in state.items()}, model=model)
    placing = [(s, e) for s, e in zip(plan.steps, report.entries) if s.action != "new"]
    for s, _ in placing:
        if s.target not in state:
            raise GraftError(f"{s.target}: the plan names a tensor the model does not have; the plan does not fit "
                             "this model. Re-run `graft plan`.")
        lacking = [name for name in sources_of(s.source) if name not in src.info]
        if lacking:
            raise GraftError(f"{s.target}: the plan takes source tensor {lacking[0]!r}, which {src.path} does not "
                             "hold; the plan does not fit this checkpoint. Nothing was changed. Re-run `graft plan`.")
    if any(t.is_meta for t in state.values()):
        _materialise_new(model, report.entries, state)
        state = model.state_dict(keep_vars=True)
    owners = _owners(model)
    releaser = FileMaps() if release_pages else None

    def out_dtype(current: torch.Tensor) -> torch.dtype:
        return policy if policy is not None and current.dtype.is_floating_point else current.dtype

    total = sum(state[s.target].numel() * out_dtype(state[s.target]).itemsize for s, _ in placing)
    done = 0
    assigned: dict[tuple[int, int], int] = {}  # (address, bytes) of values assigned -> id of the target tensor
    for step, entry in placing:
        current = state[step.target]
        names = sources_of(step.source)
        report.check_numeric(src, [entry], known=plan.numeric)  # once per source tensor, as it is placed
        values = [src[name] for name in names]
        value = adapt.get(step.adapter).run(values, current.detach(), step.args or {}) if step.adapter else values[0]
        if tuple(value.shape) != tuple(current.shape):
            raise GraftError(f"{step.target}: the plan gives shape {list(value.shape)} but the model has "
                             f"{list(current.shape)}; the plan does not fit this model. Re-run `graft plan`.")
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
            for value in values:
                releaser.release(value)
        done += current.numel() * out_dtype(current).itemsize
        if progress is not None:
            progress(done, total)
    modules = dict(model.named_modules())
    for name, attrs in plan.settings.items():  # a source module's eps/momentum, carried to its target module
        for attr, value in attrs.items():
            setattr(modules[name], attr, value)
    report.settings = {k: dict(v) for k, v in plan.settings.items()}
    if policy is not None:
        model.to(policy)
    if releaser is not None:
        releaser.close()
    if progress is not None and not placing:
        progress(0, 0)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        report.warnings.append(
            f"{len(still_meta)} tensors stay on the meta device ({', '.join(still_meta[:3])}"
            f"{', ...' if len(still_meta) > 3 else ''}): they are not in the state_dict (non-persistent buffers "
            "the model computes when it is built), so no checkpoint can fill them. Build the model on the CPU "
            "instead of the meta device.")
    return report


def build_target(build: str | Callable[[], nn.Module], model_kwargs: str | dict | None = None
                 ) -> tuple[nn.Module, bool]:
    """Build the target with its parameters on the meta device (no memory, no initialisation; buffers as
    usual: `parameters_on_meta`), or normally when its factory fails that way (one that reads a weight while
    building). `build` is a model spec (`"timm:resnet50"`) or a function of no arguments. Returns the model
    and whether its parameters are on the meta device."""
    try:
        with parameters_on_meta():
            model = _build(build, model_kwargs)
    except Exception as exc:  # any failure: a normal build either works or raises the error the user should see
        log.debug("%s: built normally, its factory fails with parameters on the meta device (%s: %s)", build,
                  type(exc).__name__, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "")
        return _build(build, model_kwargs), False
    return model, True


def _build(build: str | Callable[[], nn.Module], model_kwargs: str | dict | None) -> nn.Module:
    from torchgraft.specs import build_model

    if isinstance(build, str):
        return build_model(build, model_kwargs)
    if model_kwargs:
        raise GraftError("model_kwargs goes with a model spec; pass build=lambda: Factory(**kwargs) instead.")
    model = build()
    if not isinstance(model, nn.Module):
        raise GraftError(f"build returned a {type(model).__name__}; expected a torch.nn.Module.")
    return model


def written_settings(report: Report, metadata: dict[str, str] | None) -> dict[str, str] | None:
    """The output file's metadata with the module attributes the transfer set (`torchgraft.settings`), and a
    warning in the report: a weights file holds tensors, so a model built anew from it must set them too."""
    if not report.settings:
        return metadata
    first, attrs = next(iter(report.settings.items()))
    shown = ", ".join(f"{a} {v}" for a, v in attrs.items())
    report.warnings.append(
        f"{len(report.settings)} modules take attributes from the source (e.g. {first}: {shown}); they are not "
        "tensors, so a model built anew from the written file must set them too (the report's \"settings\"; a "
        ".safetensors output holds them as metadata `torchgraft.settings`)")
    return {**(metadata or {}), "torchgraft.settings": json.dumps(report.settings, sort_keys=True)}


def save_state(model: nn.Module, out: str | os.PathLike[str], metadata: dict[str, str] | None = None, *,
               progress: Callable[[int, int], None] | None = None, release_pages: bool = False) -> None:
    """Write the model's state_dict atomically in the format the extension names: `.safetensors`, or a torch
    zip state dict for `.pth`, `.pt`, `.bin`."""
    from torchgraft.io.write import atomic_write, save_safetensors

    kind = OUTPUT_SUFFIXES.get(Path(out).suffix.lower())
    if kind is None:
        raise GraftError(f"{out}: the output's extension {Path(out).suffix or '(none)'!r} names no weights format; "
                         f"expected one of {', '.join(OUTPUT_SUFFIXES)}. Nothing was written.")
    if kind == "safetensors":
        save_safetensors(model.state_dict(), out, metadata=metadata, progress=progress,
                         release_pages=release_pages)
        return
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(out) as f:
        torch.save(state, f)
    if progress is not None:
        total = sum(v.numel() * v.element_size() for v in state.values())
        progress(total, total)


def transfer(source: Source | Mapping[str, torch.Tensor] | str | os.PathLike[str], model: nn.Module | None = None,
             *, build: str | Callable[[], nn.Module] | None = None, model_kwargs: str | dict | None = None,
             out: str | os.PathLike[str] | None = None, plan: Plan | None = None, rules: Any = None,
             strict: bool = False, allow_new: Sequence[str] = (), source_classes: Sequence[str] | None = None,
             target_classes: Sequence[str] | None = None, dtype: str | torch.dtype | None = None,
             source_model: str | nn.Module | None = "auto", source_model_kwargs: str | dict | None = None,
             input_shape: Sequence[int] | None = None, trace: bool = True, allow_empty: bool = True,
             metadata: dict[str, str] | None = None,
             progress: Callable[[int, int], None] | None = None,
             write_progress: Callable[[int, int], None] | None = None) -> Report:
    """Load what fits from `source` into a model and return the Report.

    Give either `model` (filled in place, like `load_state_dict`) or `build` (a model spec such as
    `"timm:resnet50"`, or a function of no arguments): then the model is built with its parameters on the meta
    device when it can be (no memory, no initialisation), receives the checkpoint's tensors as views of the
    file, initialises only what stays new, and with `out` is written tensor by tensor — about one copy of
    memory however big the checkpoint. When a meta-device model could not receive the plan as well as a normal
    one (a module without `reset_parameters` keeps a tensor new), it is built normally and `report.notes`
    says why. The model is `report.model`.

        report = tg.transfer("resnet50.pth", model)                              # in place
        report = tg.transfer("big.safetensors", build="timm:vit_base_patch16_224", out="vit.safetensors")

    Args:
        source: a checkpoint path, a `Source` from `torchgraft.load`, or a state dict.
        out: write the model's state_dict here, atomically (`.safetensors`, or `.pth/.pt/.bin`).
        plan: apply this (reviewed) plan instead of matching; it is refused when it does not fit the source
            and model (a key they lack, or either changed since the plan was made).
        rules: rename/drop/merge/split rules (a dict, a YAML/JSON path, or `Rules`).
        strict: raise (before changing the model or writing anything) unless every target tensor is loaded or
            adapted and every loaded value finite; benign buffers such as `num_batches_tracked` and `allow_new`
            globs are exempt.
        source_classes, target_classes: class names; when both are known, a classifier with another class
            count keeps the rows of the classes the two share.
        dtype: None (each loaded tensor takes the dtype of the target tensor), or "float32", "float16",
            "bfloat16": every floating tensor of the model ends in that dtype. Casts are noted per entry.
        source_model: the model the checkpoint was saved from (a spec or a module). "auto" (the default)
            takes the one the checkpoint names — a Hugging Face folder's config.json, timm's config.json, or a
            file named as torchvision publishes it — and says so in `report.notes`; None uses none. The
            source model is traced so both sides align in execution order, and both models run on one input:
            `report.verified` says whether the matched modules compute the same, and `strict` fails when they
            do not.
        input_shape: the input for tracing, e.g. (1, 3, 224, 224); by default read from the models' metadata.
        trace: False aligns in registration order, without the forward pass that finds execution order.
        allow_empty: False refuses to write `out` (raises before writing) when the plan loads or adapts no tensor
            beyond benign buffers such as `num_batches_tracked`: the output would be a freshly initialised model.
        progress, write_progress: called as `progress(bytes_done, total_bytes)` as tensors are placed and
            written.
    """
    if (model is None) == (build is None):
        raise GraftError("transfer needs exactly one of `model` (a module to fill in place) and `build` (a model "
                         "spec or a function that builds the model).")
    if source_model not in (None, "auto") and dtype_name(dtype) not in (None, "float32"):
        raise GraftError(f"verifying runs both models on one float32 input, so it cannot check a dtype {dtype} "
                         "output; nothing was done. Verify without dtype first, then transfer again with it.")
    if out is not None and Path(out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise GraftError(f"{out}: the output's extension {Path(out).suffix or '(none)'!r} names no weights format; "
                         f"expected one of {', '.join(OUTPUT_SUFFIXES)}. Nothing was written.")
    src = as_source(source)
    on_meta = False
    notes = []
    if model is None:
        model, on_meta = build_target(build, model_kwargs)  # type: ignore[arg-type]
        notes.append("built with its parameters on the meta device" if on_meta else
                     "built normally: its factory cannot run with parameters on the meta device")
    reference = None
    if source_model == "auto":
        if dtype_name(dtype) in (None, "float32"):
            reference = _found_source_model(src, notes)
    elif source_model is not None:
        reference = _source_model(src, source_model, source_model_kwargs)
    if plan is None:
        plan = make_plan(src, model, rules=rules, source_classes=source_classes, target_classes=target_classes,
                         dtype=dtype, source_model=None if isinstance(reference, ForeignRunner) else reference,
                         input_shape=input_shape, trace=trace)
    else:
        plan.check_fits(src, model)
    if strict:
        plan.check_strict(allow_new, source=src)
    if out is not None and not allow_empty:
        check_loads_something(plan.steps, src.path, type(model).__name__)
    if on_meta:
        blockers = meta_blockers(model, plan)
        if blockers:
            more = f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else ""
            notes.append(f"built again normally: a meta-device model cannot receive this plan as well "
                         f"({blockers[0]}{more})")
            model, on_meta = _build(build, model_kwargs), False  # type: ignore[arg-type]
        else:
            notes.append("filled on the meta device; only modules with new tensors are initialised")
    report = apply(plan, src, model, progress=progress, release_pages=out is not None)
    report.notes[:0] = notes + plan.notes
    if reference is not None:
        try:
            report.verification = verify(reference, model, report)
        except GraftError as exc:  # nothing to compare, or no input fits both: said, and verified stays None
            report.notes.append(f"not verified: {exc}")
        if strict and report.verified is False:
            d = report.verification.first_divergence
            raise GraftError(f"--strict: the transfer does not compute what the source model computes: first "
                             f"divergence at {d.target_module} (source {d.source_module}), max |diff| "
                             f"{d.max_abs_diff:.3g}. Nothing was written. Review the plan (`graft plan`).")
    if out is not None:
        save_state(model, out, metadata=written_settings(report, metadata), progress=write_progress,
                   release_pages=True)
    for w in report.warnings:
        log.warning(w)
    return report


def _source_model(src: Source, spec: str | nn.Module, kwargs: str | dict | None) -> nn.Module:
    """The model the checkpoint was saved from, holding the checkpoint (loaded strictly): built from a spec with
    its parameters on the meta device and given the source tensors themselves (no copy), or a module given."""
    if isinstance(spec, str):
        reference, on_meta = build_target(spec, kwargs)
    else:
        reference, on_meta = spec, False
    shown = spec if isinstance(spec, str) else type(spec).__name__
    wanted = reference.state_dict(keep_vars=True)
    state = {k: v for k, v in src.state_dict().items() if k in wanted or not is_benign(k)}  # old position_ids
    try:
        missing, _ = reference.load_state_dict(state, strict=False, assign=on_meta)
        unexpected = [k for k in state if k not in wanted]
        if unexpected or any(not is_benign(k) for k in missing):
            raise RuntimeError(f"Error(s) in loading state_dict:\n  keys that do not fit: "
                               f"{(unexpected + [k for k in missing if not is_benign(k)])[:3]}")
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise GraftError(f"source model {shown}: the checkpoint does not load strictly into it "
                         f"({first[1].strip() if len(first) > 1 else first[0]}); expected the model the checkpoint "
                         "was saved from.") from None
    return reference.eval()


def _found_source_model(src: Source, notes: list[str]) -> nn.Module | None:
    """The source model the checkpoint says it comes from (`specs.source_spec`), or None; `notes` say which and
    how it was found, or why none is used."""
    from torchgraft.specs import source_spec

    if src.runner is not None:  # another framework's file that runs in its own runtime
        try:
            reference = src.runner()
        except GraftError as exc:
            notes.append(f"not run in its own framework: {exc}")
            return None
        notes.append(f"source runs in {reference.describe()}: outputs compared")
        return reference
    found = source_spec(src.path, src.metadata)
    if found is None:
        notes.append("no source model: the checkpoint does not say which model it was saved from (give one to "
                     "trace both sides and verify by function)")
        return None
    spec, kwargs, how = found
    try:
        reference = _source_model(src, spec, kwargs)
    except GraftError as exc:
        notes.append(f"source model {spec} ({how}) not used: {exc}")
        return None
    notes.append(f"source model {spec}: {how}")
    return reference


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


def _needed(state: dict[str, torch.Tensor], placing: list[tuple[str, bool, bool]]) -> set[int]:
    """Ids of the meta tensors that need memory and initial values: those kept new (unless tied to a loaded
    one) and those an adapter builds on. `placing` is (target, stays new, adapter builds on its init) each."""
    loaded_ids = {id(state[t]) for t, new, _ in placing if not new}
    return {id(state[t]) for t, new, on_init in placing
            if state[t].is_meta and (on_init or (new and id(state[t]) not in loaded_ids))}


def _on_init(adapter: str | None) -> bool:
    return adapter is not None and adapt.get(adapter).needs_init


def _materialise_new(model: nn.Module, entries: list[Entry], state: dict[str, torch.Tensor]) -> None:
    """Give storage and initial values to the meta tensors the plan leaves new (and to those an adapter builds on).

    Only these tensors get memory; each module holding one runs its own `reset_parameters` while its loaded
    tensors are still on the meta device, so it cannot overwrite them (they are assigned afterwards). A module
    without `reset_parameters` leaves its new tensors at zero, and the entries say so.
    """
    needed = _needed(state, [(e.target, e.status == "new", _on_init(e.adapter)) for e in entries])
    if not needed:
        return
    keys_of: dict[int, list[Entry]] = {}
    for e in entries:
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


def meta_blockers(model: nn.Module, plan: Plan) -> list[str]:
    """Why a model built on the meta device could not receive `plan` as well as one built normally.

    Empty when every tensor that stays new belongs to a module with `reset_parameters` and the model holds no
    non-persistent buffer (those are computed when a model is built, and no checkpoint holds them).
    """
    reasons = []
    state = model.state_dict(keep_vars=True)
    needed = _needed(state, [(s.target, s.action == "new", _on_init(s.adapter)) for s in plan.steps])
    owners = {id(t): m for m in model.modules() for t in [*m._parameters.values(), *m._buffers.values()]
              if t is not None}
    for s in plan.steps:
        t = state[s.target]
        if id(t) in needed and _initialiser(owners[id(t)]) is None:
            reasons.append(f"{s.target} stays new and its module {type(owners[id(t)]).__name__} has no "
                           "reset_parameters to initialise it")
    keys = {id(t) for t in state.values()}
    for name, buffer in model.named_buffers():
        if buffer.is_meta and id(buffer) not in keys:
            reasons.append(f"{name} is a non-persistent buffer, computed when the model is built")
    return reasons




_callable.make_callable(__name__, transfer)
