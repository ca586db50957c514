"""Pieces the subcommands share: opening a checkpoint-or-model argument, printing JSON, the rich console."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

from torchgraft.io.read import Source, load
from torchgraft.specs import build_model, is_model_spec
from torchgraft.summary import source_from_model

# Piped output gets 120 columns rather than rich's 80, so report tables stay readable in logs.
console = Console(highlight=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)


def open_source(text: str, *, model_kwargs: str | None = None, verify: bool = True, key: str | None = None) -> Source:
    """A checkpoint path, or a model spec (its freshly built state_dict)."""
    if is_model_spec(text):
        return source_from_model(build_model(text, model_kwargs), text)
    return load(text, key=key, verify_hash=verify)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def human(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
