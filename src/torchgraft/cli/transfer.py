"""`graft plan` and `graft transfer`: map a checkpoint into a model spec, with a report for every tensor."""

from __future__ import annotations

import json as jsonlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from torchgraft.classes import read_class_names
from torchgraft.cli.common import add_hash_check_argument, console, hash_check, print_json
from torchgraft.errors import GraftError
from torchgraft.io.read import load
from torchgraft.io.write import atomic_write, refuse_same_path
from torchgraft.summary import collapse_indices
from torchgraft.match.plan import DTYPES, Plan, plan
from torchgraft.report import Report
from torchgraft.transfer import build_target, save_state, transfer

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
    add_hash_check_argument(p)


def plan_parser():
    from torchgraft.cli import new_parser

    p = new_parser(PLAN_DESCRIPTION)
    _common(p)
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="plan for every floating tensor of the output in this dtype")
    p.add_argument("--out", default=None, metavar="PLAN", help="write the plan as JSON (edit it, then --plan)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def transfer_parser():
    from torchgraft.cli import new_parser

    p = new_parser(TRANSFER_DESCRIPTION)
    _common(p)
    p.add_argument("--plan", default=None, metavar="PLAN", help="apply this (reviewed) plan instead of matching")
    p.add_argument("--out", default=None, metavar="OUT.safetensors",
                   help="write the model's state_dict here (.safetensors, or .pth/.pt/.bin for a torch file)")
    p.add_argument("--report", default=None, metavar="REPORT.json", help="write the per-tensor report as JSON")
    p.add_argument("--strict", action="store_true", help="fail unless every target tensor is loaded or adapted")
    p.add_argument("--allow-new", nargs="*", default=[], metavar="PATTERN",
                   help="globs of target tensors that may stay new under --strict (e.g. 'fc.*')")
    p.add_argument("--dry-run", action="store_true", help="match and report, write nothing")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="cast every floating tensor of the output to this dtype (default: each loaded tensor "
                        "takes the dtype of the model's tensor)")
    p.add_argument("--verify", action="store_true",
                   help="fail unless the transfer is verified: the source model (--source-model, or the one the "
                        "checkpoint names) and the target run on one input and their matched modules agree")
    p.add_argument("--source-model", default=None, metavar="SPEC",
                   help="the model the checkpoint was saved from: traced so both sides align in execution order, "
                        "and run to verify (default: the one the checkpoint names, e.g. a config.json or "
                        "torchvision's file name)")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="the input used to trace the models, e.g. 1,3,224,224 (default: from their metadata)")
    p.add_argument("--source-model-kwargs", default=None, metavar="JSON", help="JSON kwargs for --source-model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise GraftError(f"--input-shape {text!r}: expected positive integers separated by commas, e.g. 1,3,224,224.")
    return shape


def _classes(path: str | None) -> list[str] | None:
    return None if path is None else read_class_names(path)


def run_plan(source, model, model_kwargs, rules, key, source_classes, target_classes, out, json, dtype=None,
             no_hash_check=False, no_verify=False) -> int:
    if out is not None:
        refuse_same_path(out, source, rules)
    src = load(source, key=key, verify_hash=hash_check(no_hash_check, no_verify))
    target, _ = build_target(model, model_kwargs)  # planning reads shapes only
    result = plan(src, target, rules=rules, source_classes=_classes(source_classes),
                  target_classes=_classes(target_classes), dtype=dtype)
    if out is not None:
        result.save(out)
    if json:
        print_json(result.to_dict())
    else:
        render(result)
        if out is not None:
            console.print(f"plan written to [bold]{out}[/]; apply it with `graft transfer {source} --model {model} "
                          f"--plan {out} --out OUT.safetensors`")
    return 0


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


def run_transfer(source, model, model_kwargs, rules, key, source_classes, target_classes, plan, out, report, strict,
                 allow_new, dry_run, verify, source_model, source_model_kwargs, json, dtype=None,
                 input_shape=None, no_hash_check=False, no_verify=False) -> int:
    if out is None and not dry_run:
        raise GraftError("graft transfer needs --out OUT.safetensors (or --dry-run to only report).")
    shape = _input_shape(input_shape)
    if (verify or source_model is not None) and dtype not in (None, "float32"):
        raise GraftError(f"--verify runs both models on one float32 input, so it cannot check a --dtype {dtype} "
                         "output; nothing was done. Run with --verify and without --dtype first, then again with "
                         "--dtype.")
    for output in (out, report):
        if output is not None:
            refuse_same_path(output, source, rules, plan)
    src = load(source, key=key, verify_hash=hash_check(no_hash_check, no_verify))
    reviewed = Plan.read(plan) if plan is not None else None
    write_now = out if not (dry_run or verify) else None  # with --verify, only once verified
    metadata = {"torchgraft.source": str(source), "torchgraft.model": model}
    with ProgressBars() as bars:
        result = transfer(src, build=model, model_kwargs=model_kwargs, out=write_now,
                          plan=reviewed, rules=rules, strict=strict, allow_new=allow_new,
                          source_classes=_classes(source_classes), target_classes=_classes(target_classes),
                          dtype=dtype, source_model=source_model or "auto", source_model_kwargs=source_model_kwargs,
                          input_shape=shape,
                          metadata=metadata, progress=bars.bar("placing tensors"),
                          write_progress=bars.bar(f"writing {Path(out).name}") if out else None)
        if verify and result.verified is not True:
            why = "the matched modules diverge" if result.verified is False else next(
                (n for n in result.notes if n.startswith(("no source model", "not verified", "source model"))),
                "no source model")
            raise GraftError(f"--verify: the transfer was not verified ({why}); nothing was written. Pass "
                             "--source-model SPEC, the model the checkpoint was saved from.")
        if verify and out is not None and not dry_run:
            save_state(result.model, out, metadata=metadata, progress=bars.bar(f"writing {Path(out).name}"),
                       release_pages=True)
    for note in result.notes:
        log.debug("%s: %s", model, note)
    if not dry_run and report is not None:
        with atomic_write(report, "w") as f:
            jsonlib.dump(result.to_dict(), f, indent=2)
    if json:
        print_json(result.to_dict())
    else:
        render(result)
        if result.verification is not None:
            color = "green" if result.verified else "red"
            console.print(f"[{color}]verify:[/] {result.verification.summary()}")
        if out is not None and not dry_run:
            console.print(f"wrote [bold]{out}[/]" + (f" and [bold]{report}[/]" if report else ""))
    return 0


def _source_text(source: str | list[str] | None) -> str:
    return source if isinstance(source, str) else "+".join(source or [])


def render(report: Report | Plan) -> None:
    """A Report's entries (loaded, adapted, new) or a Plan's steps (load, adapt, new) as a table, then counts."""
    is_plan = isinstance(report, Plan)
    items = report.steps if is_plan else report.entries
    table = Table(show_edge=False, pad_edge=False)
    for col in ("target", "action" if is_plan else "status", "method", "source", "note"):
        table.add_column(col, overflow="fold")
    colors = {"loaded": "green", "adapted": "cyan", "new": "yellow", "load": "green", "adapt": "cyan"}
    groups: dict[tuple, list] = {}
    for e in items:
        groups.setdefault((e.action if is_plan else e.status, e.method, e.adapter), []).append(e)
    order = {"adapted": 0, "adapt": 0, "new": 1, "loaded": 2, "load": 2}  # what needs a look first
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
    loaded, adapted = ("to load", "to adapt") if is_plan else ("loaded", "adapted")
    c_loaded, c_adapted = (c["load"], c["adapt"]) if is_plan else (c["loaded"], c["adapted"])
    console.print(f"[green]{c_loaded} {loaded}[/], [cyan]{c_adapted} {adapted}[/], [yellow]{c['new']} new[/], "
                  f"{c['unused_source']} source tensors unused; {report.loaded_fraction:.1%} of the target's values "
                  "come from the source")
    for w in report.warnings:
        console.print(f"[bold red]warning:[/] {w}", soft_wrap=True)
