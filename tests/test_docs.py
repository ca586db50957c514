"""The documentation stays true: docs/cli.md is what `graft --help` prints, and the docs' links resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_help() -> None:
    fresh = _gen_cli().render()
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == fresh, "docs/cli.md is out of date: run `python docs/gen_cli.py`"


def test_guide_adapter_table_is_the_registry() -> None:
    from torchgraft.adapt import ADAPTERS, docs_table

    guide = (ROOT / "docs" / "guide.md").read_text()
    assert guide == _gen_cli().render_guide(), "docs/guide.md's adapter table is out of date: run docs/gen_cli.py"
    assert docs_table() in guide and all(f"| `{name}` |" in guide for name in ADAPTERS)


def test_cli_reference_covers_every_command() -> None:
    from torchgraft.cli import _subcommands

    text = (ROOT / "docs" / "cli.md").read_text()
    for name in _subcommands():
        assert f"## graft {name}\n" in text


def test_relative_links_resolve() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
