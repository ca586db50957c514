"""`graft diff`: which tensors two checkpoints or models share, which differ, and which differences are benign."""

from __future__ import annotations

from rich.table import Table

from torchgraft.cli.common import JSON_OBJECT, add_hash_check_argument, console, hash_check, open_source, print_json
from torchgraft.summary import Diff, collapse_indices, diff

DESCRIPTION = """Compare the tensors of two checkpoints or models, key by key.

Each side is a checkpoint path or a model spec. Notes explain differences that are known to be benign,
such as the `num_batches_tracked` buffers that old files lack, or a classifier with another class count.

Examples:
  graft diff resnet18-5c106cde.pth torchvision:resnet18
  graft diff mobilenet_v2-b0353104.pth timm:mobilenetv2_100 --json
  graft diff old.pth new.safetensors
"""


def parser():
    from torchgraft.cli import new_parser

    p = new_parser(DESCRIPTION)
    p.add_argument("a", help="checkpoint path or model spec")
    p.add_argument("b", help="checkpoint path or model spec")
    p.add_argument("--a-kwargs", default=None, type=JSON_OBJECT, metavar="JSON", help="JSON kwargs for A when it is a model spec")
    p.add_argument("--b-kwargs", default=None, type=JSON_OBJECT, metavar="JSON", help="JSON kwargs for B when it is a model spec")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_hash_check_argument(p)
    return p


def run(a: str, b: str, a_kwargs: str | None, b_kwargs: str | None, json: bool, no_hash_check: bool = False,
        no_verify: bool = False) -> int:
    check = hash_check(no_hash_check, no_verify)
    src_a = open_source(a, model_kwargs=a_kwargs, verify=check)
    src_b = open_source(b, model_kwargs=b_kwargs, verify=check)
    result = diff(src_a, src_b)
    if json:
        print_json(result.to_dict())
    else:
        render(result, a, b, len(src_a), len(src_b))
    return 0


def render(result: Diff, a: str, b: str, n_a: int, n_b: int) -> None:
    console.print(f"A [bold]{a}[/] ({n_a} tensors)   B [bold]{b}[/] ({n_b} tensors)   "
                  f"in common [bold]{result.num_common}[/]")
    for title, keys in (("only in A", result.only_in_a), ("only in B", result.only_in_b)):
        if keys:
            table = Table(title=f"{title} ({len(keys)})", show_edge=False, pad_edge=False)
            table.add_column("key")
            for label, members in collapse_indices(keys)[:40]:
                table.add_row(label + (f"  [dim]x{len(members)}[/]" if len(members) > 1 else ""))
            console.print(table)
    mismatches = [(m["key"], "shape", m["a"], m["b"]) for m in result.shape_mismatch]
    mismatches += [(m["key"], "dtype", m["a"], m["b"]) for m in result.dtype_mismatch]
    if mismatches:
        table = Table(title=f"mismatches ({len(mismatches)})", show_edge=False, pad_edge=False)
        for col in ("key", "what", "A", "B"):
            table.add_column(col)
        for key, what, va, vb in mismatches[:60]:
            table.add_row(key, what, str(va), str(vb))
        console.print(table)
    if result.identical_layout:
        console.print("[green]same keys, shapes and dtypes[/]")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
