"""The fine-tuning panel: `graft finetune` with its defaults against the seeds' 40-line loop, row by row, same run.

Run:  .venv/bin/python benchmarks/bench_finetune_panel.py [--rows NAME,NAME...] [--seeds 3] [--out results.jsonl]
      .venv/bin/python benchmarks/bench_finetune_panel.py --table results.jsonl     # the README's table

Every row runs the seeds' loop and then `graft finetune` (defaults, `--image-size 64`), each its own process,
timed whole (imports included), 2 threads each; one row at a time; results appended to --out as they finish.
With --seeds N the two alternate N times, run i seeding both sides with i (the seeds' loop's `torch.manual_seed`,
graft's `--seed`): each side's accuracy is the mean of its N runs (every run's is kept too) and its seconds the
median. Both sides are seeded, but a seed's accuracy moves from one CPU or install to another by more than most
rows' margins (a few-shot loop from a random head amplifies float rounding), so one seed is not a measurement;
and on a 2-core machine a 20-second run varies by a few seconds from one run to the next.

The seeds' loop (seed 002's recipe): the pretrained model, a new head for the classes, Adam 1e-3 on every
parameter, batch 32, the images decoded once into in-memory tensors (resized to 64 px, ImageNet-normalised), no
augmentation; it validates once, after its last epoch, and that accuracy is its score. graft's score is the
validation accuracy of the model it kept (model.safetensors).

Data (real images only, written as image folders; the validation set is the same for every train size):
- digits8:  scikit-learn's 1,797 handwritten digit scans as their native 8x8 PNG files (80/20 stratified split);
- digits64: the same scans written at 64 px;
- photos:   13 of scikit-image's real photographs (`skimage.data`: astronaut, coffee, chelsea, rocket, hubble,
            immunohistochemistry, retina, brick, grass, gravel, camera, moon, coins), one class each: 60 random
            square crops per photograph for training from its left 60%, 20 for validation from its right 40%
            (disjoint regions), each crop 20-45% of the photo's shorter side, saved at 96 px.
Train sizes: all, or 20/10/5 images per class. Models: `torchvision:mobilenet_v2` with torchvision's real
ImageNet file, and `timm:mobilenetv2_100` receiving that same file through `graft transfer` (both sides).
Processes: 1, or `torchrun --nproc_per_node=2` for graft (the seeds' loop has no multi-process form; its row
is the 1-process loop).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

SEEDS_LOOP = r'''
import json, sys, time
start = time.perf_counter()
import numpy as np, torch
from PIL import Image
from pathlib import Path
data, model_spec, weights = sys.argv[1:4]
epochs, size, seed = (int(a) for a in sys.argv[4:7])
torch.manual_seed(seed)
torch.set_num_threads(2)
classes = sorted(p.name for p in Path(data, "train").iterdir() if p.is_dir())
def tensors(split):
    xs, ys = [], []
    for y, name in enumerate(classes):
        for p in sorted(Path(data, split, name).iterdir()):
            img = Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
            xs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
            ys.append(y)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (torch.stack(xs) - mean) / std, torch.tensor(ys)
xtr, ytr = tensors("train")
xva, yva = tensors("val")
if model_spec == "torchvision":
    import torchvision
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights))
    model.classifier[1] = torch.nn.Linear(1280, len(classes))
else:
    import timm
    from safetensors.torch import load_file
    model = timm.create_model("mobilenetv2_100", num_classes=len(classes))
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("classifier.")}
    model.load_state_dict(state, strict=False)
opt = torch.optim.Adam(model.parameters(), 1e-3)
for epoch in range(epochs):
    model.train()
    perm = torch.randperm(len(ytr))
    for i in range(0, len(ytr), 32):
        idx = perm[i:i + 32]
        if len(idx) < 2:
            continue
        loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
model.eval()
with torch.no_grad():
    pred = torch.cat([model(xva[i:i + 256]).argmax(1) for i in range(0, len(yva), 256)])
print(json.dumps({"val_acc": float((pred == yva).float().mean()), "inner_seconds": time.perf_counter() - start}))
'''

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "brick",
          "grass", "gravel", "camera", "moon", "coins")


def write_photos(root: Path, train_per_class: int | None, seed: int = 0) -> Path:
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = random.Random(seed)
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        image = Image.fromarray(image[..., :3].astype(np.uint8))
        w, h = image.size
        for split, count, (left, right) in (("train", 60, (0.0, 0.6)), ("val", 20, (0.6, 1.0))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            crops = []
            for i in range(count):
                side = int(min(w, h) * rng.uniform(0.2, 0.45))
                side = min(side, int(w * (right - left)))
                x = rng.randint(int(w * left), int(w * right) - side)
                y = rng.randint(0, h - side)
                crops.append(image.crop((x, y, x + side, y + side)).resize((96, 96), Image.BILINEAR))
            if split == "train" and train_per_class is not None:
                crops = crops[:train_per_class]
            for i, crop in enumerate(crops):
                crop.save(folder / f"{i:03d}.png")
    return root


def write_data(kind: str, per_class: int | None, root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    from torchgraft.train.digits import write_digits

    if kind == "digits8":
        return write_digits(root, size=8, train_per_class=per_class)
    if kind == "digits64":
        return write_digits(root, size=64, train_per_class=per_class)
    return write_photos(root, per_class)


#: (name, data, images per class (None: all), epochs, model, processes)
PANEL = [
    ("d8-all-e1", "digits8", None, 1, "torchvision", 1),
    ("d8-all-e3", "digits8", None, 3, "torchvision", 1),
    ("d8-all-e10", "digits8", None, 10, "torchvision", 1),
    ("d8-20-e10", "digits8", 20, 10, "torchvision", 1),
    ("d8-10-e3", "digits8", 10, 3, "torchvision", 1),
    ("d8-10-e10", "digits8", 10, 10, "torchvision", 1),
    ("d8-5-e10", "digits8", 5, 10, "torchvision", 1),
    ("d64-all-e3", "digits64", None, 3, "torchvision", 1),
    ("d64-10-e10", "digits64", 10, 10, "torchvision", 1),
    ("d8-all-e3-timm", "digits8", None, 3, "timm", 1),
    ("d8-10-e10-timm", "digits8", 10, 10, "timm", 1),
    ("d8-all-e3-2proc", "digits8", None, 3, "torchvision", 2),
    ("photos-all-e3", "photos", None, 3, "torchvision", 1),
    ("photos-10-e10", "photos", 10, 10, "torchvision", 1),
    ("photos-5-e3-timm", "photos", 5, 3, "timm", 1),
]


def timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc


def kept_row(out: Path) -> dict:
    """The metrics row of the epoch graft kept in run folder `out`: the best validation accuracy, the lower
    validation loss breaking ties."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max((r for r in rows if r["val_acc"] is not None), key=lambda r: (r["val_acc"], -r["val_loss"]))


def run_row(row, weights: dict[str, Path], tmp: Path, seeds: int = 1) -> dict:
    """The seeds' loop and graft, alternating, seed i for both on run i; each side's mean accuracy and median
    seconds, and every run's."""
    name, kind, per_class, epochs, model, procs = row
    data = write_data(kind, per_class, tmp / name / "data")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", COLUMNS="160")
    spec = "torchvision:mobilenet_v2" if model == "torchvision" else "timm:mobilenetv2_100"
    runs = {"seeds_accs": [], "graft_accs": [], "seeds_all_s": [], "graft_all_s": [], "kept": [], "recipe": []}
    for seed in range(seeds):
        seeds_s, proc = timed([PY, "-c", SEEDS_LOOP, str(data), model, str(weights[model]), str(epochs), "64",
                               str(seed)], env)
        runs["seeds_accs"].append(json.loads(proc.stdout.strip().splitlines()[-1])["val_acc"])
        out = tmp / name / f"run{seed}"
        args = ["finetune", "--model", spec, "--weights", str(weights["torchvision"]), "--data", str(data),
                "--out", str(out), "--epochs", str(epochs), "--image-size", "64", "--seed", str(seed)]
        graft_env = env
        if procs == 1:
            cmd = [PY, "-m", "torchgraft.cli", *args]
        else:
            cmd = [str(Path(PY).parent / "torchrun"), "--standalone", f"--nproc_per_node={procs}", "-m",
                   "torchgraft.cli", *args]
            graft_env = dict(env, OMP_NUM_THREADS=str(max(1, 2 // procs)))
        graft_s, proc = timed(cmd, graft_env)
        runs["graft_accs"].append(kept_row(out)["val_acc"])
        runs["seeds_all_s"].append(round(seeds_s, 1))
        runs["graft_all_s"].append(round(graft_s, 1))
        runs["kept"].append(next(line for line in proc.stdout.splitlines() if line.startswith("kept ")))
        runs["recipe"].append(next((line for line in proc.stdout.splitlines() if line.startswith("recipe: ")), ""))
    return {"row": name, "data": kind, "per_class": per_class, "epochs": epochs, "model": spec, "processes": procs,
            "seeds_acc": statistics.mean(runs["seeds_accs"]), "seeds_s": statistics.median(runs["seeds_all_s"]),
            "graft_acc": statistics.mean(runs["graft_accs"]), "graft_s": statistics.median(runs["graft_all_s"]),
            "seeds": seeds, **runs}


def spread(accs: list[float]) -> str:
    return f"{min(accs):.3f}-{max(accs):.3f}" if len(accs) > 1 else "one seed"


def table(path: Path) -> str:
    lines = ["| row | data | train images | epochs | model | processes | seeds' loop: mean (range), s | "
             "`graft finetune`: mean (range), s | graft ahead | time ratio | seeds |",
             "|---|---|---|---:|---|---:|---|---|---:|---:|---:|"]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        size = "all" if r["per_class"] is None else f"{r['per_class']}/class"
        ahead = 100 * (r["graft_acc"] - r["seeds_acc"])
        lines.append(f"| {r['row']} | {r['data']} | {size} | {r['epochs']} | `{r['model']}` | {r['processes']} | "
                     f"{r['seeds_acc']:.3f} ({spread(r['seeds_accs'])}), {r['seeds_s']:.1f} s | "
                     f"{r['graft_acc']:.3f} ({spread(r['graft_accs'])}), {r['graft_s']:.1f} s | "
                     f"{ahead:+.1f} pt | {r['graft_s'] / r['seeds_s']:.2f} | {r['seeds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(r[0] for r in PANEL))
    parser.add_argument("--out", default="panel.jsonl")
    parser.add_argument("--seeds", type=int, default=3, help="run each side with seeds 0..N-1, alternating; "
                        "report each side's mean accuracy and median seconds")
    parser.add_argument("--table", default=None, metavar="RESULTS", help="print the markdown table of RESULTS")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    sys.path.insert(0, str(ROOT / "src"))
    from torchgraft.cli.demo import find_mobilenet_v2

    wanted = args.rows.split(",")
    unknown = sorted(set(wanted) - {r[0] for r in PANEL})
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; expected among {[r[0] for r in PANEL]}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = {"torchvision": find_mobilenet_v2(), "timm": tmp / "timm.safetensors"}
        if any(r[4] == "timm" for r in PANEL if r[0] in wanted):
            subprocess.run([PY, "-m", "torchgraft.cli", "transfer", str(weights["torchvision"]), "--model",
                            "timm:mobilenetv2_100", "--out", str(weights["timm"])], check=True, capture_output=True,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"))
        for row in sorted((r for r in PANEL if r[0] in wanted), key=lambda r: wanted.index(r[0])):
            result = run_row(row, weights, tmp, args.seeds)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{result['row']}: seeds' loop {result['seeds_accs']} in {result['seeds_all_s']} s; graft "
                  f"{result['graft_accs']} in {result['graft_all_s']} s", flush=True)


if __name__ == "__main__":
    main()
