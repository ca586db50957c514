"""`graft plan` and `graft transfer`: map a checkpoint into a model spec, with a report for every tensor."""

from __future__ import annotations

import json as jsonlib
import logging
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from torchgraft.classes import read_class_names
from torchgraft.cli.common import JSON_OBJECT, add_hash_check_argument, console, err_console, hash_check, print_json
from torchgraft.errors import GraftError, UsageError
from torchgraft.io.read import load
from torchgraft.io.write import atomic_write, refuse_same_path, save_pretrained_folder
from torchgraft.summary import collapse_indices
from torchgraft.match.plan import DTYPES, Plan, plan
from torchgraft.report import Report, check_loads_something
from torchgraft.transfer import OUTPUT_SUFFIXES, build_target, save_state, transfer, written_settings

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
    p.add_argument("--model-kwargs", default=None, type=JSON_OBJECT, metavar="JSON", help="JSON object passed to the model factory")
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
    p.add_argument("--all", action="store_true", help="list every tensor instead of collapsing layer indices")
    return p


def transfer_parser():
    from torchgraft.cli import new_parser

    p = new_parser(TRANSFER_DESCRIPTION)
    _common(p)
    p.add_argument("--plan", default=None, metavar="PLAN", help="apply this (reviewed) plan instead of matching")
    p.add_argument("--out", default=None, metavar="OUT.safetensors",
                   help="write the model's state_dict here: .safetensors, or .pth/.pt/.bin for a torch file, or DIR/ "
                   "for a transformers model (a save_pretrained folder: config.json + model.safetensors)")
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
    p.add_argument("--source-model-kwargs", default=None, type=JSON_OBJECT, metavar="JSON", help="JSON kwargs for --source-model")
    p.add_argument("--allow-empty", action="store_true",
                   help="write the output even when no tensor loads (it is then the model as initialised)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--all", action="store_true", help="list every tensor instead of collapsing layer indices")
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
             no_hash_check=False, no_verify=False, all=False) -> int:
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
        render(result, every=all, more="--all lists them; --out PLAN writes JSON")
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
                 input_shape=None, no_hash_check=False, no_verify=False, allow_empty=False, all=False) -> int:
    if out is None and not dry_run:
        raise UsageError("graft transfer needs --out OUT.safetensors (or --dry-run to only report).")
    folder = out is not None and (out.endswith(("/", os.sep)) or Path(out).is_dir())
    if out is not None and not folder and Path(out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out {out}: the extension {Path(out).suffix or '(none)'!r} names no weights format; "
                         f"expected {', '.join(OUTPUT_SUFFIXES)}, or DIR/ for a transformers model's folder.")
    shape = _input_shape(input_shape)
    if (verify or source_model is not None) and dtype not in (None, "float32"):
        raise UsageError(f"--verify runs both models on one float32 input, so it cannot check a --dtype {dtype} "
                         "output; nothing was done. Run with --verify and without --dtype first, then again with "
                         "--dtype.")
    for output in (out, report):
        if output is not None:
            refuse_same_path(output, source, rules, plan)
    src = load(source, key=key, verify_hash=hash_check(no_hash_check, no_verify))
    reviewed = Plan.read(plan) if plan is not None else None
    write_now = out if not (dry_run or verify or folder) else None  # with --verify, only once verified
    metadata = {"torchgraft.source": str(source), "torchgraft.model": model}
    with ProgressBars() as bars:
        result = transfer(src, build=model, model_kwargs=model_kwargs, out=write_now,
                          plan=reviewed, rules=rules, strict=strict, allow_new=allow_new,
                          source_classes=_classes(source_classes), target_classes=_classes(target_classes),
                          dtype=dtype, source_model=source_model or "auto", source_model_kwargs=source_model_kwargs,
                          input_shape=shape, allow_empty=allow_empty,
                          metadata=metadata, progress=bars.bar("placing tensors"),
                          write_progress=bars.bar(f"writing {Path(out).name}") if write_now else None)
        if verify and result.verified is not True:
            why = "the matched modules diverge" if result.verified is False else next(
                (n for n in result.notes if n.startswith(("no source model", "not verified", "source model"))),
                "no source model")
            raise GraftError(f"--verify: the transfer was not verified ({why}); nothing was written. Pass "
                             "--source-model SPEC, the model the checkpoint was saved from.")
        if out is not None and not dry_run and write_now is None:  # verified, or a folder: written now
            if not allow_empty:
                check_loads_something(result.entries, result.source, result.target)
            if folder:
                save_pretrained_folder(result.model, out)
            else:
                save_state(result.model, out, metadata=written_settings(result, metadata),
                           progress=bars.bar(f"writing {Path(out).name}"), release_pages=True)
    for note in result.notes:
        log.debug("%s: %s", model, note)
    if not dry_run and report is not None:
        with atomic_write(report, "w") as f:
            jsonlib.dump(result.to_dict(), f, indent=2)
    if json:
        print_json(result.to_dict())
    else:
        render(result, every=all)
        if result.verification is not None:
            color = "green" if result.verified else "red"
            console.print(f"[{color}]verify:[/] {result.verification.summary()}")
        if out is not None and not dry_run:
            console.print(f"wrote [bold]{out}[/]" + (f" and [bold]{report}[/]" if report else ""))
    return 0


def _source_text(source: str | list[str] | None) -> str:
    return source if isinstance(source, str) else "+".join(source or [])


_COLORS = {"loaded": "green", "adapted": "cyan", "new": "yellow", "load": "green", "adapt": "cyan"}
_ORDER = {"adapted": 0, "adapt": 0, "new": 1, "loaded": 2, "load": 2}  # what needs a look first
ROWS_PER_GROUP = 8


def _rows(report: Report | Plan, every: bool) -> list[tuple[str, str, str, str, str] | str]:
    """Table rows (target, status, method, source, note), grouped by status and method with layer indices
    collapsed, at most ROWS_PER_GROUP per group unless `every` (then one row per tensor); a str is an
    "... and N more" line."""
    is_plan = isinstance(report, Plan)
    groups: dict[tuple, list] = {}
    for e in report.steps if is_plan else report.entries:
        groups.setdefault((e.action if is_plan else e.status, e.method, e.adapter), []).append(e)
    rows: list[tuple[str, str, str, str, str] | str] = []
    for (status, method, adapter), entries in sorted(groups.items(), key=lambda kv: _ORDER[kv[0][0]]):
        targets = [(e.target, [i]) for i, e in enumerate(entries)] if every else collapse_indices(
            [e.target for e in entries])
        for label, members in targets if every else targets[:ROWS_PER_GROUP]:
            sources = collapse_indices([x for x in (_source_text(entries[i].source) for i in members) if x])
            source = sources[0][0] if len(sources) == 1 else f"{len(sources)} groups" if sources else ""
            count = f" x{len(members)}" if len(members) > 1 else ""
            rows.append((label + count, status, method + (f" ({adapter})" if adapter else ""), source,
                         _common_note([entries[i].note for i in members])))
        if not every and len(targets) > ROWS_PER_GROUP:
            rows.append(f"... and {len(targets) - ROWS_PER_GROUP} more {status} rows")
    return rows


def _common_note(notes: list[str]) -> str:
    """The note of a collapsed row: the one note, or the words all its tensors' notes begin with."""
    if len(set(notes)) == 1:
        return notes[0]
    prefix = os.path.commonprefix(notes)
    prefix = prefix[:prefix.rfind(" ")] if " " in prefix else ""
    return f"{prefix.rstrip(' (;,')} ... (each tensor's note: --all)" if len(prefix) > 20 else ""


def render(report: Report | Plan, *, every: bool = False,
           more: str = "--all lists them; --report FILE writes JSON",
           out: Console | None = None) -> None:
    """A Report's entries (loaded, adapted, new) or a Plan's steps (load, adapt, new) as a table fitted to the
    terminal, then counts; warnings go to stderr. Names are never split: when the columns do not fit, notes and
    then sources move to their own indented line beneath their row."""
    out = out or console
    width = out.width
    rows = _rows(report, every)
    table = [r for r in rows if not isinstance(r, str)]
    head = ("target", "action" if isinstance(report, Plan) else "status", "method", "source", "note")
    w = [max([len(head[i])] + [len(r[i]) for r in table]) for i in range(5)]
    gap = "  "
    notes_inline = sum(w) + 4 * len(gap) <= width
    source_inline = sum(w[:4]) + 3 * len(gap) <= width
    shown = 5 if notes_inline else 4 if source_inline else 3

    def line(cells: tuple[str, ...], status: str = "") -> str:
        parts = [escape(c.ljust(w[i])) for i, c in enumerate(cells[:shown])]
        if status:
            parts[1] = f"[{_COLORS[status]}]{parts[1]}[/]"
        return gap.join(parts).rstrip()

    out.print(f"[bold]{line(head)}[/]", soft_wrap=True)
    for r in rows:
        if isinstance(r, str):
            out.print(f"[dim]{r} ({more})[/]", soft_wrap=True)
            continue
        out.print(line(r, r[1]), soft_wrap=True)
        below = ([f"from {r[3]}"] if shown < 4 and r[3] else []) + ([r[4]] if shown < 5 and r[4] else [])
        for text in below:
            for piece in textwrap.wrap(text, max(20, width - 4), break_long_words=False, break_on_hyphens=False):
                out.print(f"    [dim]{escape(piece)}[/]", soft_wrap=True)
    out.print(_counts(report))  # wrapped at words: it names no tensor
    for w_text in report.warnings:
        err_console.print(f"[bold red]warning:[/] {w_text}", soft_wrap=True)


def _counts(report: Report | Plan) -> str:
    c = report.counts()
    if isinstance(report, Plan):
        loaded, adapted, c_loaded, c_adapted = "to load", "to adapt", c["load"], c["adapt"]
    else:
        loaded, adapted, c_loaded, c_adapted = "loaded", "adapted", c["loaded"], c["adapted"]
    return (f"[green]{c_loaded} {loaded}[/], [cyan]{c_adapted} {adapted}[/], [yellow]{c['new']} new[/], "
            f"{c['unused_source']} source tensors unused; {report.loaded_fraction:.1%} of the target's values come "
            "from the source")


def render_summary(report: Report, more: str) -> None:
    """Three lines for `graft finetune`: the counts, what stays new or is adapted, and how to see every tensor."""
    console.print(f"weights: {_counts(report)}", soft_wrap=True)
    changed = [e for e in report.entries if e.status != "loaded" and not e.benign]
    if changed:
        labels = collapse_indices([e.target for e in changed])
        shown = ", ".join(f"{label} ({changed[members[0]].status})" for label, members in labels[:3])
        console.print(f"  {shown}{' ...' if len(labels) > 3 else ''}", soft_wrap=True)
    console.print(f"  [dim]{more} shows every tensor[/]", soft_wrap=True)
    for w in report.warnings:
        err_console.print(f"[bold red]warning:[/] {w}", soft_wrap=True)
