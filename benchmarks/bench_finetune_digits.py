"""Fine-tuning on real digit scans: `graft finetune` against the seeds' plain loop, measured in the same run.

Run: .venv/bin/python benchmarks/bench_finetune_digits.py [--only full,fewshot] [--json results.json]

The panel (`bench_finetune_panel.py`) measures graft's defaults on more data, sizes, budgets and models; this
script keeps the two older rows (64 px files, `--no-hflip`).

Data: scikit-learn's 1,797 handwritten 8x8 digit scans, upscaled to 64 px and written as an image folder
(stratified 80/20 split, seed 0). Weights: torchvision's real ImageNet MobileNetV2 file.

- full:    3 epochs. The seeds' loop: pretrained MobileNetV2, new 10-class head, Adam 1e-3 on every parameter,
           batch 32, in-memory tensors, no augmentation. Against `graft finetune --epochs 3 --image-size 64
           --no-hflip` (its defaults otherwise: two phases, AdamW, cosine with warmup, label smoothing, image
           files decoded and augmented every epoch by 2 loader workers).
- fewshot: 10 training images per class (same validation set). The seeds' loop for 30 epochs (accuracy after
           10, 20 and 30) against `graft finetune` with its defaults for 30 epochs (the default recipe).

Each configuration runs in its own process (`graft` through the CLI), one at a time, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS_LOOP = r'''
import json, sys, time
import numpy as np, torch, torchvision
from PIL import Image
from torchgraft.train.data import list_images
from pathlib import Path
torch.manual_seed(0)
torch.set_num_threads(2)
data, weights, epochs, report_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
start = time.perf_counter()
def tensors(folder):
    _, samples = list_images(Path(folder))
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                     for p, _ in samples])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor([y for _, y in samples])
xtr, ytr = tensors(f"{data}/train")
xva, yva = tensors(f"{data}/val")
model = torchvision.models.mobilenet_v2()
model.load_state_dict(torch.load(weights))
model.classifier[1] = torch.nn.Linear(1280, 10)
opt = torch.optim.Adam(model.parameters(), 1e-3)
accs = {}
for epoch in range(epochs):
    model.train()
    perm = torch.randperm(len(ytr))
    for i in range(0, len(ytr), 32):
        idx = perm[i:i + 32]
        loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if epoch + 1 in report_at:
        model.eval()
        with torch.no_grad():
            accs[epoch + 1] = float((torch.cat([model(xva[i:i + 256]).argmax(1) for i in range(0, len(yva), 256)])
                                     == yva).float().mean())
print(json.dumps({"seconds": time.perf_counter() - start, "val_acc": accs}))
'''


def graft_finetune(weights: Path, data: Path, out: Path, *extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torchgraft.cli", "finetune", "--model", "torchvision:mobilenet_v2",
                           "--weights", str(weights), "--data", str(data), "--out", str(out), "--image-size", "64",
                           "--no-hflip", *extra], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"graft finetune failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "rows": rows, "best_val_acc": max(r["val_acc"] for r in rows)}


def seeds_loop(weights: Path, data: Path, epochs: int, report_at: list[int]) -> dict:
    """The whole process is timed, imports included, as for `graft finetune`."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SEEDS_LOOP, str(data), str(weights), str(epochs),
                           json.dumps(report_at)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"seeds' loop failed:\n{proc.stderr[-2000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="full,fewshot")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from torchgraft.cli.demo import find_mobilenet_v2
    from torchgraft.train.digits import write_digits

    weights = find_mobilenet_v2()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_digits(tmp / "digits", size=64)
        parts = args.only.split(",")
        if "full" in parts:
            seeds = seeds_loop(weights, data, 3, [1, 2, 3])
            ours = graft_finetune(weights, data, tmp / "full", "--epochs", "3")
            results["full"] = {"seeds": seeds, "graft": ours}
            print(f"full, 3 epochs: seeds' loop {seeds['seconds']:.1f} s, val acc {seeds['val_acc']}; "
                  f"graft finetune {ours['seconds']:.1f} s, val acc by epoch "
                  f"{[round(r['val_acc'], 4) for r in ours['rows']]}", flush=True)
        if "fewshot" in parts:
            few = write_digits(tmp / "few", size=64, train_per_class=10)
            seeds = seeds_loop(weights, few, 30, [10, 20, 30])
            ours = graft_finetune(weights, few, tmp / "few_run", "--epochs", "30")
            results["fewshot"] = {"seeds": seeds, "graft": ours}
            print(f"few-shot (10 per class): seeds' loop, 30 epochs, {seeds['seconds']:.1f} s, val acc "
                  f"{seeds['val_acc']}; graft finetune, 30 epochs, {ours['seconds']:.1f} s, best val acc "
                  f"{ours['best_val_acc']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
