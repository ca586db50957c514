"""A digits linear probe on torchvision's ImageNet MobileNetV2: the seeds' frozen backbone vs `torchgraft.freeze`.

Run: .venv/bin/python benchmarks/bench_freeze_digits.py [--epochs 3] [--threads 2] [--seed 0] [--repeats 2]

Data: scikit-learn's `load_digits` (1,797 real 8x8 grayscale scans of handwritten digits), upsampled to 64x64,
replicated to 3 channels and normalised with ImageNet's mean and std; a stratified 80/20 split (1,437 / 360)
with a fixed seed; in-memory tensors. Model: torchvision's MobileNetV2 with the real ImageNet weights
(`mobilenet_v2-b0353104.pth`, found as `graft demo` finds it), a new 10-class head, the backbone frozen.
Training: Adam 1e-3 on the head, batch 32, the same seed, shuffling and head initialisation for both recipes.

    seeds       `requires_grad = False` on model.features, then model.train(): the 52 BatchNorm layers of the
                "frozen" backbone normalise with batch statistics and keep moving their running statistics
    torchgraft  `torchgraft.freeze(model.features)`: the same flags, and the BatchNorm layers held in eval

Validation accuracy is measured in model.eval() after each epoch; time is the wall time of training and
validation together, the best of --repeats runs made in alternation (accuracies are identical across repeats;
the script checks); `cpu s` is the process's CPU time, less sensitive to other load on a shared machine.
`BN drift` is the largest change of any backbone running_mean after training.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import torchgraft
from torchgraft.cli.demo import find_mobilenet_v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def digits(seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and validation images (N, 3, size, size) and labels, stratified 80/20."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    images = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    labels = torch.tensor(data.target)
    train_idx, val_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2,
                                          stratify=labels.numpy(), random_state=seed)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def pretrained_mobilenet(weights: dict[str, torch.Tensor], seed: int) -> nn.Module:
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(weights)
    torch.manual_seed(seed)
    model.classifier[1] = nn.Linear(model.last_channel, 10)
    return model


def freeze_like_the_seeds(model: nn.Module) -> None:
    for p in model.features.parameters():
        p.requires_grad = False


def freeze_with_torchgraft(model: nn.Module) -> None:
    torchgraft.freeze(model.features)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


def run(recipe, weights, data, epochs: int, seed: int) -> dict:
    x_train, y_train, x_val, y_val = data
    model = pretrained_mobilenet(weights, seed)
    recipe(model)
    stats_before = [m.running_mean.clone() for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    shuffle = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    accs = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=shuffle)
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
        accs.append(accuracy(model, x_val, y_val))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    stats_after = [m.running_mean for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    drift = max((a - b).abs().max().item() for a, b in zip(stats_after, stats_before))
    return {"accs": accs, "seconds": seconds, "cpu": cpu, "drift": drift}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each recipe, alternating; best time kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = find_mobilenet_v2()
    weights = torchgraft.load(path).state_dict()
    data = digits(args.seed)
    print(f"{path.name}; digits {len(data[1])} train / {len(data[3])} val at 64x64; Adam 1e-3, batch 32, "
          f"{args.epochs} epochs, seed {args.seed}, {args.threads} threads")
    recipes = {"seeds (requires_grad=False, BN trains)": freeze_like_the_seeds,
               "torchgraft.freeze (BN held in eval)": freeze_with_torchgraft}
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, recipe in recipes.items():
            r = run(recipe, weights, data, args.epochs, args.seed)
            if name in results:
                assert r["accs"] == results[name]["accs"], "a repeat gave other accuracies"
                r["seconds"] = min(r["seconds"], results[name]["seconds"])
                r["cpu"] = min(r["cpu"], results[name]["cpu"])
            results[name] = r
    width = max(map(len, results))
    header = "".join(f"  epoch {e + 1:>2}" for e in range(args.epochs))
    print(f"{'recipe':<{width}}{header}  {'wall s':>7}  {'cpu s':>7}  {'BN drift':>8}")
    for name, r in results.items():
        cells = "".join(f"  {a:>8.1%}" for a in r["accs"])
        print(f"{name:<{width}}{cells}  {r['seconds']:>7.1f}  {r['cpu']:>7.1f}  {r['drift']:>8.3f}")


if __name__ == "__main__":
    main()
