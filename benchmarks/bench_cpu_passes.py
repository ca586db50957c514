"""On the CPU, a step in smaller passes: `data.CPU_PIXELS_PER_PASS` against one pass per batch, same run.

Run:  .venv/bin/python benchmarks/bench_cpu_passes.py [--sizes 64,128,224] [--skip-runs]

Two parts, each its own process per measurement, 2 threads:

- **step**: one training step of 32 images (BatchNorm held in eval, as after graft's probe; AdamW) as one pass
  and in passes of 16, 8 and 4 with their gradients summed, for torchvision's MobileNetV2 and ResNet-18 and
  timm's EfficientNet-B0 (random weights: the cost does not depend on them); median of 3 rounds of 3 steps.
- **run**: `finetune()` with its defaults (the library call behind `graft finetune`) on the panel's photographs
  (13 classes, 780 training and 260 validation crops), `--epochs 2`, at 128 and 224 px, with the pass size of
  the rule and with one pass per batch (the limit raised so that every batch fits: what graft did before);
  whole-process seconds, the probe's and training's images/s, and the kept model's validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

STEP = r'''
import json, statistics, sys, time, torch, torchvision, timm
torch.set_num_threads(2)
name, size = sys.argv[1], int(sys.argv[2])
model = {"mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
         "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
         "efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=10)}[name]()
model.train()
for m in model.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        m.eval(); m.weight.requires_grad_(False); m.bias.requires_grad_(False)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-5)
x, y = torch.randn(32, 3, size, size), torch.randint(0, 10, (32,))
def step(passes):
    opt.zero_grad()
    for i in range(0, 32, passes):
        (torch.nn.functional.cross_entropy(model(x[i:i + passes]), y[i:i + passes], reduction="sum") / 32).backward()
    opt.step()
times = {p: [] for p in (32, 16, 8, 4)}
for p in times:
    step(p)
for _ in range(3):
    for p in times:
        start = time.perf_counter()
        for _ in range(3):
            step(p)
        times[p].append((time.perf_counter() - start) / 3)
print(json.dumps({str(p): round(statistics.median(t) * 1000) for p, t in times.items()}))
'''

RUN = r'''
import json, sys, time
start = time.perf_counter()
import torch
torch.set_num_threads(2)
import torchgraft.train.data as data
from torchgraft.train.config import FinetuneConfig
from torchgraft.train.loop import finetune
photos, weights, out, size, one_pass = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
if one_pass:
    data.CPU_PIXELS_PER_PASS = 10 ** 12
result = finetune(FinetuneConfig(model="torchvision:mobilenet_v2", weights=weights, data=photos, out=out, epochs=2,
                                 image_size=size))
rows = {r["epoch"]: r for r in result.rows}
print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "probe_images_per_s": rows[0]["images_per_s"],
                  "train_images_per_s": result.images_per_s and round(result.images_per_s, 1),
                  "val_acc": round(result.best_val_acc, 4), "kept_epoch": result.best_epoch}))
'''


def _json(cmd: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--skip-runs", action="store_true", help="the step part only")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_finetune_panel import write_photos
    from torchgraft.cli.demo import find_mobilenet_v2
    from torchgraft.train.data import pass_size
    import torch

    print("| model | px | step of 32, one pass | passes of 16 | of 8 | of 4 | the rule's pass |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("mobilenet_v2", "resnet18", "efficientnet_b0"):
        for size in sizes:
            ms = _json([PY, "-c", STEP, name, str(size)])
            rule = pass_size(torch.device("cpu"), size, 32)
            print(f"| {name} | {size} | {ms['32']} ms | {ms['16']} ms | {ms['8']} ms | {ms['4']} ms | {rule} |",
                  flush=True)
    if args.skip_runs:
        return
    print("\n| px | passes | whole run | probe images/s | training images/s | kept val acc (epoch) |")
    print("|---:|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_photos(Path(tmp) / "photos", None)
        for size in [s for s in sizes if s >= 128]:
            for one_pass in (True, False):
                out = Path(tmp) / f"run{size}-{one_pass}"
                r = _json([PY, "-c", RUN, str(photos), str(find_mobilenet_v2()), str(out), str(size),
                           "1" if one_pass else "0"])
                label = "one per batch" if one_pass else f"the rule ({pass_size(torch.device('cpu'), size, 32)})"
                print(f"| {size} | {label} | {r['seconds']} s | {r['probe_images_per_s']} | "
                      f"{r['train_images_per_s']} | {r['val_acc']:.3f} ({r['kept_epoch']}) |", flush=True)


if __name__ == "__main__":
    main()
