"""Pieces the subcommands share: opening a checkpoint-or-model argument, printing JSON, the rich console, and
the freezing flags with their trainable-summary table."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from torchgraft.errors import GraftError, UsageError
from torchgraft.io.read import Source, load
from torchgraft.specs import build_model, is_model_spec, parse_kwargs
from torchgraft.summary import collapse_indices, source_from_model

# Piped output gets 120 columns rather than rich's 80, so report tables stay readable in logs.
console = Console(highlight=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)
#: Warnings go to stderr, so that stdout stays the report (and `--json` stays JSON).
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() or "COLUMNS" in os.environ
                      else 120)


class Parsed:
    """A named argument type: --help shows its name, and its GraftError becomes a usage error of the flag."""

    def __init__(self, name: str, parse) -> None:
        self.name, self.parse = name, parse

    def __call__(self, text: str):
        try:
            return self.parse(text)
        except GraftError as exc:  # argparse reports it as a usage error of this flag (exit 2)
            raise argparse.ArgumentTypeError(str(exc)) from None

    def __repr__(self) -> str:
        return self.name


#: `--model-kwargs` and its kin: checked when the command line is parsed, so bad JSON is a usage error.
JSON_OBJECT = Parsed("JSON object", parse_kwargs)


def open_source(text: str, *, model_kwargs: str | None = None, verify: bool = True, key: str | None = None) -> Source:
    """A checkpoint path, or a model spec (its freshly built state_dict)."""
    if is_model_spec(text):
        return source_from_model(build_model(text, model_kwargs), text)
    return load(text, key=key, verify_hash=verify)


def add_hash_check_argument(p) -> None:
    """--no-hash-check (and its deprecated spelling --no-verify): skip the sha256 check of hub-named files."""
    p.add_argument("--no-hash-check", dest="no_hash_check", action="store_true",
                   help="skip the sha256 check of files named name-<hash>.pth")
    p.add_argument("--no-verify", dest="no_verify", action="store_true",
                   help="deprecated spelling of --no-hash-check")


def hash_check(no_hash_check: bool, no_verify: bool) -> bool:
    """Whether to check a hub-named file's sha256; warns once for the deprecated --no-verify."""
    if no_verify:
        err_console.print("[yellow]warning:[/] --no-verify is deprecated (it reads like --verify, which compares "
                      "outputs); use --no-hash-check", soft_wrap=True)
    return not (no_hash_check or no_verify)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def human(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# ---- freezing flags (graft inspect) ------------------------------------------------------------------------


def add_freeze_arguments(parser) -> None:
    """--freeze [PATTERN ...], --unfreeze [PATTERN ...], --train-bn: a freezing policy applied to the model."""
    parser.add_argument("--freeze", nargs="*", type=str, default=None, metavar="PATTERN",
                        help="freeze parameters by glob over parameter or module names ('layer[1-3]', "
                        "'features.*'); no pattern freezes everything. Frozen BatchNorm layers stay in eval mode")
    parser.add_argument("--unfreeze", nargs="*", type=str, default=None, metavar="PATTERN",
                        help="then unfreeze these (e.g. --freeze --unfreeze 'layer4.*' 'fc.*'); no pattern "
                        "unfreezes everything")
    parser.add_argument("--train-bn", action="store_true",
                        help="with --freeze: keep normalization layers' weights and biases trainable (fastai)")


def apply_freeze_arguments(model, *, freeze: list[str] | None, unfreeze: list[str] | None,
                           train_bn: bool) -> bool:
    """Apply --freeze, then --unfreeze, to the model; True when any policy was given."""
    from torchgraft.freeze import freeze as freeze_params
    from torchgraft.freeze import unfreeze as unfreeze_params

    if train_bn and freeze is None:
        raise UsageError("--train-bn keeps normalization layers trainable while --freeze freezes the rest; it "
                         "needs --freeze (e.g. `--freeze --train-bn`). Nothing was changed.")
    if freeze is not None:
        freeze_params(model, *freeze, train_bn=train_bn)
    if unfreeze is not None:
        unfreeze_params(model, *unfreeze)
    return freeze is not None or unfreeze is not None


def render_trainable(summary) -> None:
    """The trainable summary as a table: one row per module, runs of alike siblings collapsed."""
    share = summary.trainable / summary.total if summary.total else 0.0
    held = (f"   BatchNorm held in eval [bold]{summary.held_in_eval}[/] of {summary.norm_layers}"
            if summary.norm_layers else "")
    console.print(f"trainable [green]{summary.trainable:,}[/] ({share:.1%}, {summary.trainable_tensors} tensors)   "
                  f"frozen [blue]{summary.frozen:,}[/] ({summary.frozen_tensors} tensors){held}")
    table = Table(show_edge=False, pad_edge=False)
    for col, just in (("module", "left"), ("type", "left"), ("state", "left"), ("trainable", "right"),
                      ("frozen", "right"), ("BN in eval", "right")):
        table.add_column(col, justify=just)
    colour = {"trainable": "green", "frozen": "blue", "partial": "yellow"}
    for rows in _runs(summary.modules):
        first = rows[0]
        label = collapse_indices([r.name + "." for r in rows])[0][0][:-1] if len(rows) > 1 else first.name
        indent = "  " * (first.depth - 1) if first.depth > 1 else ""
        count = f"  [dim]x{len(rows)}[/]" if len(rows) > 1 else ""
        norms = sum(r.norm_layers for r in rows)
        held = sum(r.held_in_eval for r in rows)
        table.add_row(indent + (label or "(own parameters)") + count, first.type,
                      f"[{colour[first.state]}]{first.state}[/]", f"{sum(r.trainable for r in rows):,}",
                      f"{sum(r.frozen for r in rows):,}", f"{held}/{norms}" if norms else "")
    console.print(table)


def _runs(rows: list) -> list[list]:
    """Consecutive depth-2 siblings alike in type, state and BatchNorm mode (features.{1..13}) share one row."""
    def key(row) -> tuple:
        held = "none" if not row.norm_layers else "all" if row.held_in_eval == row.norm_layers else row.held_in_eval > 0
        return row.depth, row.name.rpartition(".")[0], row.type, row.state, held

    out: list[list] = []
    for row in rows:
        if out and row.depth > 1 and key(out[-1][-1]) == key(row):
            out[-1].append(row)
        else:
            out.append([row])
    return out
