"""Functional checks: run the source model and the target model on the same input and compare what they compute.

After a transfer, equal weights are not enough: a hand-written block that puts the stride on another conv, or a
missing activation, computes something else with the same tensors. `verify` hooks every pair of modules the
report matched, runs both models in eval mode on one input, and names the first pair whose activations differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchgraft import _callable
from torchgraft.adapt import canonical_shape
from torchgraft.errors import GraftError

__all__ = ["Verification", "verify", "module_pairs", "example_input", "ForeignRunner"]


class ForeignRunner(nn.Module):
    """A source that runs in its own framework (Keras on the torch backend, onnxruntime): takes what the PyTorch
    target takes (an `(N, C, H, W)` image batch, token ids) and returns its output as a torch tensor in PyTorch's
    layout. It has no modules to pair, so `verify` compares the outputs only.

    Subclasses set `framework` (for reports) and implement `forward`."""

    framework = "another framework"

    def describe(self) -> str:
        return self.framework

    def example_input(self) -> tuple[torch.Tensor, ...] | None:
        """An input of the one shape the source takes, when it takes one only (an ONNX model exported at
        1x3x64x64); None lets the target's example input serve both."""
        return None


@dataclass
class Divergence:
    target_module: str
    source_module: str
    max_abs_diff: float
    note: str = ""


@dataclass
class Verification:
    """What `verify` found: how many module pairs agreed, the first that did not, and the outputs."""

    compared: int
    agreed: int
    first_divergence: Divergence | None
    output_max_abs_diff: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None and self.compared > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}

    def summary(self) -> str:
        head = f"{self.agreed}/{self.compared} matched modules agree"
        if self.output_max_abs_diff is not None:
            head += f"; outputs differ by at most {self.output_max_abs_diff:.3g}"
        if self.first_divergence is not None:
            d = self.first_divergence
            head += (f"; first divergence at {d.target_module} (source {d.source_module}): max |diff| "
                     f"{d.max_abs_diff:.3g}{' — ' + d.note if d.note else ''}")
        return head


def module_pairs(report: Any) -> dict[str, str]:
    """target module -> source module, for modules whose tensors all came from one source module."""
    pairs: dict[str, set[str]] = {}
    for e in report.entries:
        if e.status != "loaded" or not isinstance(e.source, str) or e.adapter is not None:
            continue  # a part of a fused tensor, or a reshaped one, computes something shaped otherwise
        t_mod, s_mod = e.target.rpartition(".")[0], e.source.rpartition(".")[0]
        pairs.setdefault(t_mod, set()).add(s_mod)
    return {t: next(iter(s)) for t, s in pairs.items() if len(s) == 1}


def example_input(model: nn.Module, seed: int = 0) -> tuple[tuple, dict]:
    """Random `(args, kwargs)` for one forward pass of `model`, shaped as its metadata says
    (`torchgraft.match.trace.example_inputs`: a Hugging Face config, timm's pretrained_cfg, the image size a
    module was built for, or the first layer): floating inputs random, token ids zero."""
    from torchgraft.match.trace import example_inputs

    try:
        args, kwargs = example_inputs(model)
    except ValueError as exc:
        raise GraftError(f"verify needs an example input: {exc}; pass `inputs=`.") from None
    generator = torch.Generator().manual_seed(seed)

    def real(t: torch.Tensor) -> torch.Tensor:
        if t.dtype.is_floating_point:
            return torch.randn(tuple(t.shape), generator=generator)
        return torch.zeros(tuple(t.shape), dtype=t.dtype)

    return tuple(real(a) for a in args), {k: real(v) for k, v in kwargs.items()}


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    for attr in ("last_hidden_state", "logits"):
        if hasattr(value, attr):
            return getattr(value, attr)
    return None


def _record(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], list[str], list[Any]]:
    outputs: dict[str, torch.Tensor] = {}
    order: list[str] = []
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if module is None:
            continue

        def hook(_m, _inp, out, name=name):
            t = _first_tensor(out)
            if t is not None and name not in outputs:
                outputs[name] = t.detach().float().clone()
                order.append(name)

        handles.append(module.register_forward_hook(hook))
    return outputs, order, handles


def verify(source_model: nn.Module, target_model: nn.Module, report: Any, inputs: Any = None, *,
           atol: float = 1e-4, rtol: float = 1e-4) -> Verification:
    """Run both models on `inputs` (default: `example_input(target_model)`) and compare matched activations.

    The first divergence is the earliest target module, in execution order, whose output differs from its
    source module's by more than `atol + rtol * |source|`. Models are put in eval mode and restored after.
    """
    if isinstance(source_model, ForeignRunner):
        return _verify_outputs(source_model, target_model, inputs, atol=atol, rtol=rtol)
    pairs = module_pairs(report)
    notes: list[str] = []
    src_modules, tgt_modules = dict(source_model.named_modules()), dict(target_model.named_modules())
    # A module that fuses more work (timm's BatchNormAct2d = norm + activation) computes something else by design.
    differ = {t: s for t, s in pairs.items()
              if t in tgt_modules and s in src_modules and type(tgt_modules[t]) is not type(src_modules[s])}
    if differ:
        t, s = next(iter(differ.items()))
        notes.append(f"{len(differ)} matched pairs have different module types and were not compared (e.g. "
                     f"{type(tgt_modules[t]).__name__} vs {type(src_modules[s]).__name__})")
        pairs = {t: s for t, s in pairs.items() if t not in differ}
    if not pairs:
        raise GraftError("verify found no module whose tensors were loaded from one source module; nothing to "
                         "compare. Check the transfer report first.")
    if inputs is None:  # each model its own way of taking it (pixel_values=, or positional), the same values
        args, kwargs = example_input(target_model)
        src_args, src_kwargs = example_input(source_model)
        if [t.shape for t in [*src_args, *src_kwargs.values()]] != [t.shape for t in [*args, *kwargs.values()]]:
            src_args, src_kwargs = args, kwargs
    else:
        args, kwargs = (inputs if isinstance(inputs, tuple) else (inputs,)), {}
        src_args, src_kwargs = args, kwargs
    was = (source_model.training, target_model.training)
    source_model.eval()
    target_model.eval()
    src_out, _, src_handles = _record(source_model, list(set(pairs.values())))
    tgt_out, tgt_order, tgt_handles = _record(target_model, list(pairs))
    try:
        y_src, y_tgt = _run_both(source_model, (src_args, src_kwargs), target_model, (args, kwargs),
                                 "both models")
    finally:
        for h in src_handles + tgt_handles:
            h.remove()
        source_model.train(was[0])
        target_model.train(was[1])
    compared = agreed = 0
    first: Divergence | None = None
    for t_name in tgt_order:
        s_name = pairs[t_name]
        if s_name not in src_out:
            continue
        a, b = tgt_out[t_name], src_out[s_name]
        compared += 1
        if a.shape != b.shape and a.numel() == b.numel():
            # the same numbers in another batch layout ([1, 8, 64] and [8, 64]) are compared as such; a token grid
            # ([1, 56, 56, 96]) against a sequence ([1, 3136, 96]) only when its values agree that way
            if canonical_shape(a.shape) == canonical_shape(b.shape) or torch.allclose(a.reshape(b.shape), b,
                                                                                       atol=atol, rtol=rtol):
                a = a.reshape(b.shape)
        if a.shape != b.shape:
            if first is None:
                first = Divergence(t_name, s_name, float("inf"), f"shapes {list(b.shape)} -> {list(a.shape)}")
            continue
        diff = (a - b).abs()
        if bool((diff <= atol + rtol * b.abs()).all()):
            agreed += 1
        elif first is None:
            first = Divergence(t_name, s_name, float(diff.max()))
    output_diff = None
    if y_src is not None and y_tgt is not None and y_src.shape == y_tgt.shape:
        output_diff = float((y_src.float() - y_tgt.float()).abs().max())
    else:
        notes.append("outputs have different shapes (a new head?); compared the matched modules only")
    return Verification(compared, agreed, first, output_diff, notes)


def _run_both(source: nn.Module, source_input: tuple[tuple, dict], target: nn.Module,
              target_input: tuple[tuple, dict], what: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The first output tensor of each model on its input, without gradients; one GraftError when either
    cannot run on it."""
    try:
        with torch.no_grad():
            return (_first_tensor(source(*source_input[0], **source_input[1])),
                    _first_tensor(target(*target_input[0], **target_input[1])))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GraftError(f"verify could not run {what} on the same input ({str(exc).splitlines()[0]}); "
                         "pass an input that fits both.") from None


def _verify_outputs(runner: ForeignRunner, target_model: nn.Module, inputs: Any, *, atol: float,
                    rtol: float) -> Verification:
    """Both models on one input, outputs compared: all a source running in another framework allows."""
    if inputs is None:
        inputs = runner.example_input()
    args, kwargs = example_input(target_model) if inputs is None else \
        ((inputs if isinstance(inputs, tuple) else (inputs,)), {})
    was = target_model.training
    target_model.eval()
    try:
        y_src, y_tgt = _run_both(runner, (args, kwargs), target_model, (args, kwargs),
                                 f"{runner.describe()} and the target")
    finally:
        target_model.train(was)
    name = f"(output of {runner.describe()})"
    if y_src is None or y_tgt is None or y_src.numel() != y_tgt.numel():
        shapes = [list(y.shape) if y is not None else None for y in (y_src, y_tgt)]
        return Verification(1, 0, Divergence("(output)", name, float("inf"), f"shapes {shapes[0]} -> {shapes[1]}"),
                            None, ["outputs have different shapes (a new head?); nothing else can be compared"])
    a, b = y_tgt.float().reshape(y_src.shape), y_src.float()
    diff = (a - b).abs()
    ok = bool((diff <= atol + rtol * b.abs()).all())
    return Verification(1, int(ok), None if ok else Divergence("(output)", name, float(diff.max())),
                        float(diff.max()), [f"compared the outputs only: the source runs in {runner.describe()}"])


_callable.make_callable(__name__, verify)
