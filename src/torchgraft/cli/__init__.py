"""The `graft` command line: one module per subcommand; the only code in torchgraft that prints."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from torchgraft import __version__
from torchgraft.errors import GraftError, UsageError

__all__ = ["main", "build_parser"]


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of the examples in each description, with defaults as a
    user reads them: `(required)`, `(default: 5)`, `(default: on)`; nothing for an unset default (None, "", [],
    False), whose meaning the help text says."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace(" (default: %(default)s)", "")  # BooleanOptionalAction adds it
        if isinstance(action, (ActionConfigFile, argparse._HelpAction, argparse._VersionAction)):
            return text
        if action.required:
            return f"{text} (required)"
        default = action.default
        if "(default" in text or default in (None, False, "", [], {}, argparse.SUPPRESS):
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: on)"
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown})"


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
    return ArgumentParser(description=description, formatter_class=_HelpFormatter, print_config=None,
                          exit_on_error=False)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="graft",
        description="torchgraft: put pretrained weights to work in a model that is not quite the one they were "
        "trained for.\n\nAdd --debug to any command to see the traceback of an error.",
        formatter_class=_HelpFormatter,
        print_config=None,
        exit_on_error=False,  # usage errors come back as ArgumentError and are printed as one line
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
    try:
        ns = parser.parse_args(args)
        _, run, _ = _subcommands()[ns.command]
        return run(**vars(ns[ns.command]))
    except (argparse.ArgumentError, argparse.ArgumentTypeError, UsageError) as exc:  # usage errors exit 2, as argparse does
        if debug:
            raise
        _error(_usage_text(str(exc), args, shorten=not isinstance(exc, UsageError)))
        return 2
    except GraftError as exc:
        if debug:
            raise
        _error(str(exc))
        return 1
    except KeyboardInterrupt as exc:  # a subcommand that kept something says what, and how to continue
        _error(str(exc) or "interrupted; nothing was written.")
        return 130
    except Exception as exc:  # an internal error: still one line, with the way to the traceback
        if debug:
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        _error(f"unexpected {type(exc).__name__}: {first}; rerun with --debug for the traceback and report it with "
               "that output.")
        return 1


def _error(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)  # always one line


def _usage_text(message: str, args: list[str], shorten: bool = True) -> str:
    """A usage error as the flags the user typed (`transfer.model` -> `--model`, `images` -> `IMAGE`), with where
    to read more."""
    command = next((a for a in args if a in _subcommands()), None)
    if command is not None:
        names = {}
        for action in _subcommands()[command][0]()._actions:
            names[action.dest] = (action.option_strings[0] if action.option_strings
                                  else action.metavar or action.dest.upper())
        message = re.sub(rf"\b{command}\.(\w+)", lambda m: names.get(m.group(1), m.group(1)), message)
        message = re.sub(r'Parser key "(\w+)": Expected a <class \'(\w+)\'>\. Got value: (.*)',
                         lambda m: f"{names.get(m.group(1), m.group(1))}: expected {_TYPES.get(m.group(2), 'a ' + m.group(2))}, "
                         f"got {m.group(3)!r}", message)
        message = message.replace("the following arguments are required: ", "missing required ")
    message = re.sub(r"argument (--[\w-]+): \1\b", r"\1", " ".join(message.split()))
    if shorten and len(message) > 240:  # jsonargparse can list every subcommand's parse attempt; the first part says it
        message = message[:240].rsplit(" ", 1)[0] + " ..."
    see = f"graft {command} --help" if command else "graft --help"
    return f"{message.rstrip('.')}; see `{see}`."


_TYPES = {"int": "an integer", "float": "a number", "str": "text"}
