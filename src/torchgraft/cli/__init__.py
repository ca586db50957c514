"""The `graft` command line: one module per subcommand; the only code in torchgraft that prints."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from jsonargparse import ArgumentParser, DefaultHelpFormatter

from torchgraft import __version__
from torchgraft.errors import GraftError

__all__ = ["main", "build_parser"]


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of the examples in each description."""


def _subcommands() -> dict[str, tuple[Callable[[], ArgumentParser], Callable[..., int], str]]:
    from torchgraft.cli import demo, diff, finetune, inspect, transfer

    return {
        "inspect": (inspect.parser, inspect.run, "show what a checkpoint or a model holds"),
        "diff": (diff.parser, diff.run, "compare the tensors of two checkpoints or models"),
        "plan": (transfer.plan_parser, transfer.run_plan, "propose which source tensor each model tensor takes"),
        "transfer": (transfer.transfer_parser, transfer.run_transfer,
                     "load what fits from a checkpoint into a model, with a per-tensor report"),
        "finetune": (finetune.finetune_parser, finetune.run_finetune, "fine-tune a pretrained model on an image folder"),
        "evaluate": (finetune.evaluate_parser, finetune.run_evaluate, "accuracy and confusion of a fine-tuned model"),
        "predict": (finetune.predict_parser, finetune.run_predict, "top-k classes of images"),
        "demo": (demo.parser, demo.run, "a tour on torchvision's real MobileNetV2 weights, offline"),
    }


def new_parser(description: str) -> ArgumentParser:
    """A subcommand parser with the shared formatter (descriptions keep their example blocks)."""
    return ArgumentParser(description=description, formatter_class=_HelpFormatter)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="graft",
        description="torchgraft: put pretrained weights to work in a model that is not quite the one they were "
        "trained for.\n\nAdd --debug to any command to see the traceback of an error.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"torchgraft {__version__}")
    sub = parser.add_subcommands(dest="command")
    for name, (make, _, help_text) in _subcommands().items():
        sub.add_subcommand(name, make(), help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns = parser.parse_args(args)  # usage errors exit 2 here, as argparse does
    _, run, _ = _subcommands()[ns.command]
    try:
        return run(**vars(ns[ns.command]))
    except GraftError as exc:
        if debug:
            raise
        print("error: " + " ".join(str(exc).split("\n")), file=sys.stderr)  # always one line
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: still one line, with the way to the traceback
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc}; rerun with --debug for the traceback and report "
              "it with that output.", file=sys.stderr)
        return 1
