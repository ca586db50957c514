"""`graft finetune`, `graft evaluate`, `graft predict`: a whole fine-tune in one command, and using its result."""

from __future__ import annotations

import argparse
import ast
import inspect as pyinspect
import json
import os
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from jsonargparse import ActionConfigFile
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from torchgraft.cli.common import JSON_OBJECT, Parsed, console, print_json
from torchgraft.errors import GraftError, UsageError
from torchgraft.train.config import FinetuneConfig

FINETUNE_DESCRIPTION = """Fine-tune a pretrained model on an image folder, in one command.

The classifier is resized to the folder's classes through the transfer engine (its report is shown), inputs are
sized and normalised from the model's metadata, and every image is checked, decoded and resized once into memory.
The recipe comes from the data and the budget (--epochs: what a plain loop spends in that many epochs): a linear
probe first (the frozen backbone's features computed once, a classifier fitted to convergence, its L2 chosen on
held-out training images), then everything fine-tunes from the probed head with the rest of the budget (LP-FT)
when at least half an epoch and 20 steps are left. Crops suit the images' native size; flips are decided by the probe.
AdamW, warmup in steps and cosine decay, label smoothing; mixed precision and channels_last on CUDA. The kept
model has the highest validation accuracy, ties broken by the lower validation loss; the summary says which.

DATA is DIR/train/<class>/* and DIR/val/<class>/*, or DIR/<class>/* split with --val-split.
OUT receives model.safetensors (best on validation), last.ckpt, metrics.jsonl, config.yaml, classes.txt,
split.json (the images that trained and validated), curves.png and confusion.png. `--resume OUT` continues an
interrupted run with its saved configuration.

Several processes: torchrun --nproc_per_node=2 $(command -v graft) finetune ... (--batch-size is the global batch)

Examples:
  graft finetune --model torchvision:mobilenet_v2 --weights mobilenet_v2-b0353104.pth --data pets/ --out runs/pets
  graft finetune --model timm:resnet50 --weights resnet50.safetensors --data cells/ --out runs/cells \\
      --epochs 10 --image-size 160 --unfreeze-at 2:layer4.* 4:*
  graft finetune --config finetune.yaml
  graft finetune --resume runs/pets
"""


def _field_docs() -> dict[str, str]:
    """The docstring under each FinetuneConfig field, read from its source: one text for code, help and docs."""
    tree = ast.parse(pyinspect.getsource(FinetuneConfig))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _lr_mult(value) -> dict[str, float]:
    """One --lr-mult value: PATTERN=FACTOR (`'layer4.*=0.5'`) or a JSON object (`'{"layer4.*": 0.5}'`), as a dict.
    A dict is checked and returned as it is (jsonargparse may apply the type again to a parsed value)."""
    given = value
    if isinstance(value, str) and not value.lstrip().startswith("{"):
        pattern, sep, factor = value.rpartition("=")
        value = {pattern: factor} if sep and pattern else None
    elif isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise GraftError(f"--lr-mult {given!r}: expected PATTERN=FACTOR such as 'layer4.*=0.5', or a JSON object such "
                         "as '{\"layer4.*\": 0.5}'.")
    out = {}
    for pattern, factor in value.items():
        try:
            out[str(pattern)] = float(factor)
        except (TypeError, ValueError):
            raise GraftError(f"--lr-mult {pattern}={factor}: the factor must be a number, such as 0.5.") from None
        if not out[str(pattern)] > 0:
            raise GraftError(f"--lr-mult {pattern}={factor}: the factor must be positive, such as 0.5.")
    return out


def finetune_parser():
    from torchgraft.cli import new_parser

    p = new_parser(FINETUNE_DESCRIPTION)
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its saved configuration (--epochs N runs it longer)")
    p.add_argument("--verbose", action="store_true", help="show the transfer's table of every tensor, not a summary")
    docs = _field_docs()
    hints = typing.get_type_hints(FinetuneConfig)
    # Every flag defaults to None, "not given", so that --resume knows what the user asked to change; the help
    # shows FinetuneConfig's default, which a flag not given takes.
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "") + _shown_default(f.name)
        hint = hints[f.name]
        if hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "model_kwargs":
            p.add_argument(flag, type=JSON_OBJECT, default=None, metavar="JSON", help=help_text)
        elif f.name == "lr_mult":
            p.add_argument(flag, type=Parsed("PATTERN=FACTOR", _lr_mult), nargs="*", default=None,
                           metavar="PATTERN=X", help=help_text)
        elif typing.get_origin(hint) is list:
            p.add_argument(flag, nargs="*", default=None, metavar=_METAVARS.get(f.name, "PATTERN"), help=help_text)
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            metavar = _METAVARS.get(f.name) or ("N" if base is int else "X" if base is float else f.name.upper())
            p.add_argument(flag, type=base, default=None, metavar=metavar, help=help_text)
    return p


_METAVARS = {"model": "SPEC", "weights": "FILE", "data": "DIR", "out": "RUN_DIR", "unfreeze_at": "EPOCH:PATTERN",
             "time_budget": "MINUTES"}


def _default(name: str):
    f = FinetuneConfig.__dataclass_fields__[name]
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def _shown_default(name: str) -> str:
    """` (default: 5)`, `(default: on)`; nothing for a default that is unset or whose meaning the help says."""
    value = _default(name)
    if name in ("model", "weights", "data", "out"):
        return " (required, unless --resume or --config gives it)"
    if value in (None, "", [], {}, False):
        return ""
    return f" (default: {'on' if value is True else value})"


class _RichReporter:
    """Progress bars per epoch with ETA and running loss/accuracy; the transfer report first."""

    def __init__(self, out: str, verbose: bool = False) -> None:
        self.out, self.verbose = out, verbose
        self.progress: Progress | None = None
        self.task = None

    def transfer(self, report) -> None:
        from torchgraft.cli.transfer import render, render_summary

        if self.verbose:
            console.rule("[bold]weights[/]")
            render(report)
        else:
            render_summary(report, more="--verbose")

    def recipe(self, text: str) -> None:
        console.print(f"recipe: {text}", soft_wrap=True)

    def resumed(self, finished: int, epochs: int) -> None:
        if finished >= epochs:
            console.print(f"{self.out} has finished its {finished} epochs; nothing to train. Run it longer with "
                          f"`graft finetune --resume {self.out} --epochs {finished + 5}`.", soft_wrap=True)
        else:
            console.print(f"resuming {self.out} from epoch {finished + 1} of {epochs} (epochs 1-{finished} kept)",
                          soft_wrap=True)

    def epoch_start(self, epoch: int, epochs: int, steps: int, phase: str) -> None:
        if epoch == 0:  # no steps to count: features, then a fit (a bar would sit at 0/1 with no loss yet)
            columns = [TextColumn("epoch 0 [dim](linear probe: the backbone's features, then a fit)[/]"),
                       TimeElapsedColumn()]
        else:
            columns = [TextColumn(f"epoch {epoch}/{epochs} [dim]({phase})[/]"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"), TimeElapsedColumn(),
                       TextColumn("eta"), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, loss=float("nan"), acc=0.0)

    def step(self, loss: float, acc: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=loss, acc=acc)

    def epoch_end(self, row: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
        if row["val_acc"] is None:
            console.print(f"  not validated this epoch  ({row['seconds']:.1f} s, {row['images_per_s']:.0f} images/s)")
        else:
            console.print(f"  val loss {row['val_loss']:.4f}  val acc [bold]{row['val_acc']:.4f}[/]  "
                          f"({row['seconds']:.1f} s, {row['images_per_s']:.0f} images/s)")
        if row.get("note"):
            console.print(f"  {row['note']}", soft_wrap=True)


#: What `--resume` may change: how long the run goes, and where it runs. Everything else is the saved run's.
RESUME_OVERRIDES = ("epochs", "workers", "device")


def run_finetune(config=None, resume=None, verbose=False, **options) -> int:
    from torchgraft.train.loop import finetune, read_config

    options.pop("__path__", None)
    given = {k: v for k, v in options.items() if v is not None}  # what the command line or --config set
    if given.get("lr_mult") is not None:
        given["lr_mult"] = {k: v for item in given["lr_mult"] for k, v in _lr_mult(item).items()}
    if resume is not None:
        cfg = _resumed_config(read_config(resume), resume, given)
    else:
        if "time_budget" in given and "epochs" in given:
            raise UsageError("--time-budget and --epochs are two budgets for one run; give one of them.")
        cfg = FinetuneConfig(**given)
        out = Path(cfg.out)
        if (out / "last.ckpt").exists():
            raise GraftError(f"{out} already holds a run (last.ckpt); continue it with `graft finetune --resume {out}` "
                             "or choose another --out.")
        for given in (cfg.weights, cfg.data):
            if Path(given).exists() and Path(given).resolve() == out.resolve():
                raise GraftError(f"--out {out} is also an input; choose another folder so the input is kept.")
        data = Path(cfg.data).resolve()
        if data in out.resolve().parents:
            raise GraftError(f"--out {out} is inside --data {cfg.data}: the run's files would be read as images of "
                             "a class in the next run; choose a folder outside the data.")
    try:
        result = finetune(cfg, _RichReporter(cfg.out, verbose), resume=resume is not None)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted(Path(cfg.out))) from None
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, the first process reports
        _summary(result)
    return 0


def _resumed_config(cfg: FinetuneConfig, resume: str, given: dict) -> FinetuneConfig:
    """The saved run's configuration, with the few flags `--resume` may change; any other flag is refused (it
    would silently not apply)."""
    refused = [f"--{k.replace('_', '-')}" for k in given if k not in RESUME_OVERRIDES]
    if refused:
        raise UsageError(f"--resume {resume} continues the run with its saved configuration, so {', '.join(refused)} "
                         f"cannot change; only {', '.join('--' + k for k in RESUME_OVERRIDES)} can. Start a new run "
                         "with --out for other settings.")
    cfg.out = str(resume)
    if "epochs" in given and cfg.time_budget is not None:
        raise UsageError(f"--epochs: {resume} was started with --time-budget {cfg.time_budget:g}, and a resume keeps "
                         "that run's plan; start a new run with --out to train longer.")
    if "epochs" in given:
        from torchgraft.train.loop import finished_epochs

        done = finished_epochs(resume)
        if given["epochs"] < done:
            raise UsageError(f"--epochs {given['epochs']}: {resume} has already finished {done} epochs; expected "
                             f"--epochs {done} or more.")
    for k, v in given.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    return cfg


def _interrupted(out: Path) -> str:
    """What an interrupted run kept, and how to continue it."""
    from torchgraft.train.loop import finished_epochs

    try:
        done = finished_epochs(out)
    except GraftError:
        done = 0
    if done:
        return (f"interrupted in epoch {done + 1}; kept epochs 1-{done} in {out} (last.ckpt, metrics.jsonl, and the "
                f"best model so far in model.safetensors); continue with `graft finetune --resume {out}`.")
    if (out / "config.yaml").exists():
        return (f"interrupted before the first epoch finished; {out} holds only the run's configuration; "
                f"`graft finetune --resume {out}` starts it again.")
    return "interrupted before the run folder was written; nothing was written."


def _summary(result) -> None:
    table = Table(title="run summary", show_edge=False, pad_edge=False)
    for col in ("epoch", "phase", "train loss", "train acc", "val loss", "val acc", "lr", "images/s", "s"):
        table.add_column(col, justify="right")

    def number(value, form: str) -> str:
        return "—" if value is None else format(value, form)

    for r in result.rows:
        mark = " *" if r["epoch"] == result.best_epoch else ""
        table.add_row(str(r["epoch"]), r["phase"], f"{r['train_loss']:.4f}", f"{r['train_acc']:.4f}",
                      number(r["val_loss"], ".4f"), number(r["val_acc"], ".4f") + mark, number(r["lr"], ".2e"),
                      number(r.get("images_per_s"), ".0f"), f"{r['seconds']:.1f}")
    console.print(table)
    from torchgraft.train.loop import FILES

    speed = f"; training ran at {result.images_per_s:.0f} images/s" if result.images_per_s else ""
    console.print(f"{result.kept} (* above){speed}", soft_wrap=True)
    console.print(f"best val acc [bold green]{result.best_val_acc:.4f}[/] at epoch {result.best_epoch}; files in "
                  f"[bold]{result.out}[/]: {', '.join(FILES)}", soft_wrap=True)


# ---- evaluate / predict -----------------------------------------------------------------------------------

EVALUATE_DESCRIPTION = """Accuracy, per-class precision and recall, and the confusion matrix of a fine-tuned model.

Without --data it scores the run's own validation images (split.json beside the weights, written by graft
finetune). --data is a folder of class subfolders, or a dataset root whose val/ is used; when it holds images
the run trained on, the run's validation split is scored instead. The output says which images were scored.
Class names come from classes.txt beside the weights (written by graft finetune) or --classes.

Examples:
  graft evaluate --model torchvision:mobilenet_v2 --weights runs/pets/model.safetensors
  graft evaluate --model torchvision:mobilenet_v2 --weights runs/pets/model.safetensors --data pets-test/
  graft evaluate --model timm:resnet50 --weights runs/cells/model.safetensors --data cells/test --json
"""

PREDICT_DESCRIPTION = """Top-k classes for images, with the class names of the run.

Examples:
  graft predict --model torchvision:mobilenet_v2 --weights runs/pets/model.safetensors cat.jpg dog.png
  graft predict --model timm:resnet50 --weights model.safetensors --classes classes.txt *.jpg --topk 3 --json
"""


def _model_args(p) -> None:
    p.add_argument("--model", required=True, metavar="SPEC", help="the model spec the weights were trained with")
    p.add_argument("--model-kwargs", default=None, type=JSON_OBJECT, metavar="JSON", help="JSON object passed to the model factory")
    p.add_argument("--weights", required=True, metavar="FILE", help="fine-tuned weights (e.g. RUN/model.safetensors)")
    p.add_argument("--classes", default=None, metavar="FILE", help="class names, one per line (default: classes.txt "
                   "beside the weights)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: from the run or the model)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--json", action="store_true", help="print JSON")


def evaluate_parser():
    from torchgraft.cli import new_parser

    p = new_parser(EVALUATE_DESCRIPTION)
    _model_args(p)
    p.add_argument("--data", default=None, metavar="DIR", help="held-out class folders, or a root whose val/ is "
                   "used (default: the run's validation split, split.json beside the weights)")
    return p


def predict_parser():
    from torchgraft.cli import new_parser

    p = new_parser(PREDICT_DESCRIPTION)
    _model_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--topk", type=int, default=5, help="how many classes to show per image")
    return p


def run_evaluate(model, model_kwargs, weights, classes, image_size, batch_size, json, data) -> int:
    from torchgraft.train.infer import evaluate

    result = evaluate(model, model_kwargs, weights, data, classes_file=classes, image_size=image_size,
                      batch_size=batch_size)
    if json:
        print_json(result)
        return 0
    console.print(f"accuracy [bold]{result['accuracy']:.4f}[/] on {result['num_samples']} images: {result['scored']}",
                  soft_wrap=True)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("class", "precision", "recall", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, m in result["per_class"].items():
        table.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", str(m["support"]))
    console.print(table)
    return 0


def run_predict(model, model_kwargs, weights, classes, image_size, batch_size, json, images, topk) -> int:
    from torchgraft.train.infer import predict

    if topk < 1:
        raise UsageError(f"--topk {topk}: expected 1 or more classes per image.")
    result = predict(model, model_kwargs, weights, images, classes_file=classes, image_size=image_size, topk=topk,
                     batch_size=batch_size)
    if json:
        print_json(result)
        return 0
    for item in result:
        best = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in item["top"])
        console.print(f"{item['image']}: {best}")
    return 0
