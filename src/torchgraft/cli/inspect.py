"""`graft inspect`: what a checkpoint holds (tensors, format, wrapper, module classes) or what a model is made of,
and what a freezing policy would leave trainable."""

from __future__ import annotations

from rich.table import Table

from torchgraft.cli.common import (JSON_OBJECT, add_freeze_arguments, add_hash_check_argument, apply_freeze_arguments, console,
                                   hash_check, human, print_json, render_trainable)
from torchgraft.errors import UsageError
from torchgraft.freeze import trainable_summary
from torchgraft.io.read import Source, load
from torchgraft.numeric import scan
from torchgraft.specs import build_model
from torchgraft.summary import collapse_indices, describe_model, describe_source, group_by_prefix

DESCRIPTION = """Show what a checkpoint holds, or what a model is made of.

Reads any checkpoint safely (no code from the file runs): torch zip and legacy files, whole-model pickles,
TorchScript, safetensors (and shards), Hugging Face folders, training checkpoints, torch.distributed.checkpoint
folders, and other frameworks' files (Keras .keras/.weights.h5/.h5, ONNX .onnx, NumPy .npz, Flax .msgpack),
shown under PyTorch names and layout (--all lists each tensor's name in the file). With --model, --freeze and
--unfreeze show what a freezing policy leaves trainable (patterns are globs over parameter and module names;
BatchNorm layers whose parameters are all frozen stay in eval mode).

Examples:
  graft inspect resnet50-0676ba61.pth
  graft inspect model.safetensors --json
  graft inspect last.ckpt --key ema
  graft inspect model.keras --all
  graft inspect --model torchvision:resnet18
  graft inspect --model timm:vit_tiny_patch16_224 --model-kwargs '{"num_classes": 10}'
  graft inspect --model torchvision:resnet18 --freeze 'layer[1-3]'
  graft inspect --model torchvision:mobilenet_v2 --freeze --unfreeze 'features.1[5-8]' 'classifier.*' --train-bn
"""


def parser():
    from torchgraft.cli import new_parser

    p = new_parser(DESCRIPTION)
    p.add_argument("source", nargs="?", default=None, help="checkpoint file or folder")
    p.add_argument("--model", default=None, metavar="SPEC", help="inspect a model spec instead of a checkpoint")
    p.add_argument("--model-kwargs", default=None, type=JSON_OBJECT, metavar="JSON", help="JSON object passed to the model factory")
    p.add_argument("--key", default=None, help="take the weights from this entry of a training checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--all", action="store_true", help="list every tensor instead of collapsing layer indices")
    add_hash_check_argument(p)
    add_freeze_arguments(p)
    return p


def run(source: str | None, model: str | None, model_kwargs: str | None, key: str | None, json: bool,
        all: bool, no_hash_check: bool = False, no_verify: bool = False, freeze: list[str] | None = None,
        unfreeze: list[str] | None = None, train_bn: bool = False) -> int:
    if (source is None) == (model is None):
        raise UsageError("graft inspect takes a checkpoint path or --model SPEC (exactly one); "
                         "e.g. `graft inspect weights.pth` or `graft inspect --model torchvision:resnet18`.")
    if source is not None and (freeze is not None or unfreeze is not None or train_bn):
        raise UsageError("--freeze, --unfreeze and --train-bn apply to a model, not a checkpoint file (it has no "
                         f"trainable flags); e.g. `graft inspect --model SPEC --freeze ...`. {source} was not read.")
    if model is not None:
        built = build_model(model, model_kwargs)
        policy = apply_freeze_arguments(built, freeze=freeze, unfreeze=unfreeze, train_bn=train_bn)
        report = describe_model(built, model)
        trainable = trainable_summary(built)
        if json:
            print_json({**report, "trainable": trainable.to_dict()})
        elif policy:
            _render_header(report)
            render_trainable(trainable)
        else:
            _render_model(report)
        return 0
    src = load(source, key=key, verify_hash=hash_check(no_hash_check, no_verify))
    numeric = scan(src.tensors, list(src.info), release_pages=True)
    if json:
        print_json({**describe_source(src), "numeric": numeric})
    else:
        _render_source(src, every_tensor=all, numeric=numeric)
    return 0


def _render_source(src: Source, every_tensor: bool, numeric: list[dict] | None = None) -> None:
    console.print(f"[bold]{src.path}[/]")
    console.print(f"format [cyan]{src.format}[/]   wrapper [cyan]{src.wrapper or '-'}[/]   "
                  f"tensors [bold]{len(src)}[/]   parameters [bold]{src.num_params:,}[/] ({human(src.num_params)})")
    table = Table(show_edge=False, pad_edge=False)
    foreign = every_tensor and bool(src.origins)
    for col, just in (("key", "left"), ("shape", "left"), ("dtype", "left"), ("parameters", "right"),
                      *((("in the file", "left"),) if foreign else ())):
        table.add_column(col, justify=just)
    if every_tensor:
        last_prefix = None
        for k, t in src.info.items():
            prefix = k.split(".", 1)[0]
            if last_prefix is not None and prefix != last_prefix:
                table.add_section()
            last_prefix = prefix
            layout = src.layouts.get(k, (None,))[0]
            where = [f"{src.origins.get(k, k)}" + (f" ({layout})" if layout else "")] if foreign else []
            table.add_row(k, str(list(t.shape)), t.dtype, f"{t.numel:,}", *where)
    else:
        infos = list(src.info.values())
        for label, members in collapse_indices(list(src.info)):
            group = [infos[i] for i in members]
            shapes = {tuple(t.shape) for t in group}
            shape = str(list(group[0].shape)) if len(shapes) == 1 else f"{len(shapes)} shapes"
            dtypes = "/".join(sorted({t.dtype for t in group}))
            count = f"  [dim]x{len(group)}[/]" if len(group) > 1 else ""
            table.add_row(label + count, shape, dtypes, f"{sum(t.numel for t in group):,}")
    console.print(table)
    groups = Table(title="by module", show_edge=False, pad_edge=False)
    groups.add_column("prefix")
    groups.add_column("tensors", justify="right")
    groups.add_column("parameters", justify="right")
    for g in group_by_prefix(src.info):
        groups.add_row(g["prefix"], str(g["tensors"]), f"{g['params']:,}")
    groups.add_section()
    groups.add_row("[bold]total[/]", str(len(src)), f"{src.num_params:,}")
    console.print(groups)
    if src.modules:
        classes: dict[str, int] = {}
        for cls in src.modules.values():
            classes[cls] = classes.get(cls, 0) + 1
        console.print(f"module classes (whole model; not imported): root [cyan]{src.modules.get('', '?')}[/]")
        for cls, n in sorted(classes.items(), key=lambda kv: -kv[1]):
            console.print(f"  {n:4d} x {cls}")
    words = {"nan": "NaN values", "inf": "infinite values", "all_zero": "all zero"}
    for p in numeric or []:
        amount = f"{p['count']:,} " if p["problem"] != "all_zero" else f"{p['count']:,} values, "
        console.print(f"[yellow]numeric: {p['key']}: {amount}{words[p['problem']]}[/]", soft_wrap=True)
    other = src.metadata.get("other_weights")
    if other:
        console.print(f"[yellow]also holds weights under {other}; choose them with --key[/]")


def _render_header(report: dict) -> None:
    console.print(f"[bold]{report['spec']}[/]  ({report['class']})")
    console.print(f"parameters [bold]{report['num_params']:,}[/]   trainable [green]{report['trainable_params']:,}[/]"
                  f"   frozen [blue]{report['frozen_params']:,}[/]   buffers {report['num_buffers']}   "
                  f"state_dict tensors {report['num_tensors']}")


def _render_model(report: dict) -> None:
    _render_header(report)
    table = Table(show_edge=False, pad_edge=False)
    for col, just in (("module", "left"), ("type", "left"), ("parameters", "right"), ("trainable", "right")):
        table.add_column(col, justify=just)
    modules = report["modules"]
    # Parameters count a module's submodules too (a container's total). Rows collapse layer indices among modules
    # of one type only (`Type|` keeps types apart); a trailing dot lets the last component count as an index.
    for label, members in collapse_indices([f"{m['type']}|{m['name'] or '(root)'}." for m in modules]):
        group = [modules[i] for i in members]
        count = f"  [dim]x{len(group)}[/]" if len(group) > 1 else ""
        table.add_row(label.partition("|")[2][:-1] + count, group[0]["type"],
                      f"{sum(g['total_params'] for g in group):,}", f"{sum(g['total_trainable'] for g in group):,}")
    console.print(table)
