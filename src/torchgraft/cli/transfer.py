"""`graft plan` and `graft transfer`: map a checkpoint into a model spec, with a report for every tensor."""

from __future__ import annotations

import json as jsonlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from torchgraft.cli.common import console, print_json
from torchgraft.errors import GraftError
from torchgraft.io.read import load
from torchgraft.io.write import atomic_write, refuse_same_path, save_safetensors
from torchgraft.specs import build_model
from torchgraft.summary import collapse_indices
from torchgraft.transfer import DTYPES, Report, apply, meta_blockers, parameters_on_meta, plan

log = logging.getLogger(__name__)

PLAN_DESCRIPTION = """Propose which source tensor each tensor of a model takes, without loading any values.

Matching runs in layers: your rules, exact names, names after removing wrapper prefixes, then structure
(module types and shapes aligned in order) where names differ. Ambiguous cases stay new and list their
candidates so a rule can settle them. Write the plan with --out, review or edit it, then apply it with
`graft transfer --plan PLAN`.

Examples:
  graft plan mobilenet_v2-b0353104.pth --model timm:mobilenetv2_100 --out plan.json
  graft plan resnet50.pth --model my_model.py:build --rules rules.yaml
"""

TRANSFER_DESCRIPTION = """Load what fits from a checkpoint into a model spec and write the model's complete state_dict.

Every target tensor is reported as loaded, adapted (a named adapter: stem channels, classifier rows,
position embeddings, vocabulary) or new, with the method that matched it. --strict fails unless every target
tensor is loaded or adapted (allow heads with --allow-new). The output is written atomically and never over
the source.

Big checkpoints cost about one copy of memory: the model is built with its parameters on the meta device (no
memory, no random initialisation; buffers as usual, so Hugging Face models too), receives the checkpoint's
tensors as views of the file, initialises only what stays new, and is written tensor by tensor. Loaded
tensors take the model's dtype unless --dtype names one for all.

Examples:
  graft transfer resnet18.pth --model torchvision:resnet18 --model-kwargs '{"num_classes": 21}' \\
      --out resnet18-21.safetensors --report report.json
  graft transfer mobilenet_v2-b0353104.pth --model timm:mobilenetv2_100 --out timm-mnv2.safetensors --strict
  graft transfer old.pth --model net.py:Net --plan plan.json --out net.safetensors
  graft transfer big.safetensors --model my_net.py:build --dtype bfloat16 --out net-bf16.safetensors
"""


def _common(p) -> None:
    p.add_argument("source", help="checkpoint file or folder")
    p.add_argument("--model", required=True, metavar="SPEC", help="target model spec")
    p.add_argument("--model-kwargs", default=None, metavar="JSON", help="JSON object passed to the model factory")
    p.add_argument("--rules", default=None, metavar="FILE", help="YAML/JSON rules: rename, drop, merge, split")
    p.add_argument("--key", default=None, help="take the weights from this entry of a training checkpoint")
    p.add_argument("--source-classes", default=None, metavar="FILE", help="class names of the source, one per line")
    p.add_argument("--target-classes", default=None, metavar="FILE", help="class names of the target, one per line")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of files named name-<hash>.pth")


def plan_parser():
    from torchgraft.cli import new_parser

    p = new_parser(PLAN_DESCRIPTION)
    _common(p)
    p.add_argument("--out", default=None, metavar="PLAN", help="write the plan as JSON (edit it, then --plan)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def transfer_parser():
    from torchgraft.cli import new_parser

    p = new_parser(TRANSFER_DESCRIPTION)
    _common(p)
    p.add_argument("--plan", default=None, metavar="PLAN", help="apply this (reviewed) plan instead of matching")
    p.add_argument("--out", default=None, metavar="OUT.safetensors", help="write the model's state_dict here")
    p.add_argument("--report", default=None, metavar="REPORT.json", help="write the per-tensor report as JSON")
    p.add_argument("--strict", action="store_true", help="fail unless every target tensor is loaded or adapted")
    p.add_argument("--allow-new", nargs="*", default=[], metavar="PATTERN",
                   help="globs of target tensors that may stay new under --strict (e.g. 'fc.*')")
    p.add_argument("--dry-run", action="store_true", help="match and report, write nothing")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="cast every floating tensor of the output to this dtype (default: each loaded tensor "
                        "takes the dtype of the model's tensor)")
    p.add_argument("--verify", action="store_true",
                   help="run --source-model (with the checkpoint) and the target on one input; compare activations")
    p.add_argument("--source-model", default=None, metavar="SPEC", help="the model the checkpoint belongs to")
    p.add_argument("--source-model-kwargs", default=None, metavar="JSON", help="JSON kwargs for --source-model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _classes(path: str | None) -> list[str] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise GraftError(f"{path}: class list not found; expected a text file with one class name per line.")
    names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not names:
        raise GraftError(f"{path}: the class list is empty; expected one class name per line.")
    return names


def run_plan(source, model, model_kwargs, rules, key, source_classes, target_classes, no_verify, out, json) -> int:
    if out is not None:
        refuse_same_path(out, source, rules)
    src = load(source, key=key, verify_hash=not no_verify)
    target, _ = build_target(model, model_kwargs)  # planning reads shapes only
    report = plan(src, target, rules=rules, source_classes=_classes(source_classes),
                  target_classes=_classes(target_classes))
    if out is not None:
        with atomic_write(out, "w") as f:
            jsonlib.dump(report.to_dict(), f, indent=2)
    if json:
        print_json(report.to_dict())
    else:
        render(report)
        if out is not None:
            console.print(f"plan written to [bold]{out}[/]; apply it with `graft transfer {source} --model {model} "
                          f"--plan {out} --out OUT.safetensors`")
    return 0


def build_target(spec: str, kwargs: str | dict | None) -> tuple[nn.Module, bool]:
    """Build the model with its parameters on the meta device (no memory, no initialisation; buffers are built
    as usual: `parameters_on_meta`); build it normally if its factory fails that way (one that reads a weight
    while building). Returns the model and whether its parameters are on meta."""
    try:
        with parameters_on_meta():
            model = build_model(spec, kwargs)
    except Exception as exc:  # any failure: a normal build either works or raises the error the user should see
        log.debug("%s: built normally, its factory fails with parameters on the meta device (%s: %s)", spec,
                  type(exc).__name__, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "")
        return build_model(spec, kwargs), False
    log.debug("%s: built with its parameters on the meta device", spec)
    return model, True


class ProgressBars:
    """Byte progress bars on stderr that appear only once the work has taken more than `delay` seconds."""

    def __init__(self, out: Console | None = None, delay: float = 1.0) -> None:
        self._console = out or Console(stderr=True)
        self._bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                              TransferSpeedColumn(), TimeRemainingColumn(), console=self._console,
                              disable=not self._console.is_terminal)
        self._tasks: dict[str, int] = {}
        self._start = time.monotonic()
        self._delay = delay
        self.shown = False

    def bar(self, description: str) -> Callable[[int, int], None]:
        """A `progress(done, total)` callback for one bar."""
        def update(done: int, total: int) -> None:
            if description not in self._tasks:
                self._tasks[description] = self._bars.add_task(description, total=total)
            self._bars.update(self._tasks[description], completed=done, total=total)
            if not self.shown and time.monotonic() - self._start > self._delay:
                self._bars.start()
                self.shown = True
        return update

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shown:
            self._bars.stop()


def run_transfer(source, model, model_kwargs, rules, key, source_classes, target_classes, no_verify, plan,
                 out, report, strict, allow_new, dry_run, verify, source_model, source_model_kwargs, json,
                 dtype=None) -> int:
    if out is None and not dry_run:
        raise GraftError("graft transfer needs --out OUT.safetensors (or --dry-run to only report).")
    if verify and source_model is None:
        raise GraftError("--verify needs --source-model SPEC: the model the checkpoint was saved from.")
    if verify and dtype not in (None, "float32"):
        raise GraftError(f"--verify runs both models on one float32 input, so it cannot check a --dtype {dtype} "
                         "output; nothing was done. Run with --verify and without --dtype first, then again with "
                         "--dtype.")
    for output in (out, report):
        if output is not None:
            refuse_same_path(output, source, rules, plan)
    bars = ProgressBars()
    src = load(source, key=key, verify_hash=not no_verify)
    target, on_meta = build_target(model, model_kwargs)
    s_classes, t_classes = _classes(source_classes), _classes(target_classes)
    if plan is not None:
        result = _read_plan(plan, src.path, target)
    else:
        from torchgraft.transfer import plan as make_plan

        result = make_plan(src, target, rules=rules, source_classes=s_classes, target_classes=t_classes)
    if strict:
        result.check_strict(allow_new, source=src)
    if on_meta:
        blockers = meta_blockers(target, result)
        if blockers:
            log.debug("%s: built again normally, the meta-device model cannot receive this checkpoint as well: "
                      "%s%s", model, blockers[0], f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else "")
            target = build_model(model, model_kwargs)
        else:
            log.debug("%s: filled on the meta device; only modules with new tensors are initialised", model)
    with bars:
        apply(result, src, target, source_classes=s_classes, target_classes=t_classes, dtype=dtype,
              progress=bars.bar("placing tensors"), release_pages=True)
        checked = _verify(src, source_model, source_model_kwargs, target, result) if verify else None
        if not dry_run and out is not None:
            save_safetensors(target.state_dict(), out, metadata={"torchgraft.source": str(source),
                                                                 "torchgraft.model": model},
                             progress=bars.bar(f"writing {Path(out).name}"), release_pages=True)
    if not dry_run:
        if report is not None:
            with atomic_write(report, "w") as f:
                jsonlib.dump(_report_dict(result, checked), f, indent=2)
    if json:
        print_json(_report_dict(result, checked))
    else:
        render(result)
        if checked is not None:
            color = "green" if checked.ok else "red"
            console.print(f"[{color}]verify:[/] {checked.summary()}")
        if out is not None and not dry_run:
            console.print(f"wrote [bold]{out}[/]" + (f" and [bold]{report}[/]" if report else ""))
    return 0


def _report_dict(result: Report, checked) -> dict:
    data = result.to_dict()
    if checked is not None:
        data["verify"] = checked.to_dict()
    return data


def _verify(src, spec, kwargs, target, result: Report):
    from torchgraft.verify import verify

    reference = build_model(spec, kwargs)
    try:
        reference.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise GraftError(f"--source-model {spec}: the checkpoint does not load strictly into it "
                         f"({first[1].strip() if len(first) > 1 else first[0]}); expected the model the checkpoint "
                         "was saved from.") from None
    return verify(reference, target, result)


def _read_plan(path: str, source_path: str, model) -> Report:
    from torchgraft.transfer import Entry

    try:
        data = jsonlib.loads(Path(path).read_text())
        entries = [Entry(target=e["target"], source=e["source"], status=e["status"], method=e["method"],
                         adapter=e.get("adapter"), note=e.get("note", ""), dim=e.get("dim"), part=e.get("part"))
                   for e in data["entries"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GraftError(f"{path}: not a plan written by `graft plan --out` ({type(exc).__name__}: {exc}).") from None
    targets = set(model.state_dict())
    unknown = [e.target for e in entries if e.target not in targets]
    if unknown:
        raise GraftError(f"{path}: the plan names {len(unknown)} tensors the model does not have (first: "
                         f"{unknown[0]}); expected a plan made for this --model.")
    state = model.state_dict()
    return Report(source=source_path, target=type(model).__name__, entries=entries,
                  unused_source=data.get("unused_source", []),
                  target_numel={k: v.numel() for k, v in state.items()})


def _source_text(source: str | list[str] | None) -> str:
    return source if isinstance(source, str) else "+".join(source or [])


def render(report: Report) -> None:
    table = Table(show_edge=False, pad_edge=False)
    for col in ("target", "status", "method", "source", "note"):
        table.add_column(col, overflow="fold")
    colors = {"loaded": "green", "adapted": "cyan", "new": "yellow"}
    groups: dict[tuple, list] = {}
    for e in report.entries:
        groups.setdefault((e.status, e.method, e.adapter), []).append(e)
    order = {"adapted": 0, "new": 1, "loaded": 2}  # what needs a look first
    for (status, method, adapter), entries in sorted(groups.items(), key=lambda kv: order[kv[0][0]]):
        targets = collapse_indices([e.target for e in entries])
        for label, members in targets[:8]:
            sources = [_source_text(entries[i].source) for i in members]
            source_rows = collapse_indices([x for x in sources if x])
            source = source_rows[0][0] if len(source_rows) == 1 else (f"{len(source_rows)} groups" if source_rows else "")
            notes = {entries[i].note for i in members}
            note = notes.pop() if len(notes) == 1 else ""
            table.add_row(label + (f" [dim]x{len(members)}[/]" if len(members) > 1 else ""),
                          f"[{colors[status]}]{status}[/]", method + (f" ({adapter})" if adapter else ""), source,
                          note)
        if len(targets) > 8:
            table.add_row(f"[dim]... and {len(targets) - 8} more[/]", "", "", "", "")
    console.print(table)
    c = report.counts()
    console.print(f"[green]{c['loaded']} loaded[/], [cyan]{c['adapted']} adapted[/], [yellow]{c['new']} new[/], "
                  f"{c['unused_source']} source tensors unused; {report.loaded_fraction:.1%} of the target's values "
                  "come from the source")
    for w in report.warnings:
        console.print(f"[bold red]warning:[/] {w}", soft_wrap=True)
