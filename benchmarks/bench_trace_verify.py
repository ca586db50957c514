"""What tracing and verification add to a transfer (issue: <= 1 s for a ResNet-50 on this machine).

Run: .venv/bin/python benchmarks/bench_trace_verify.py [--repeat 3]

torchvision's ResNet-50 (random weights, saved as a .pth file) into Hugging Face's `ResNetForImageClassification`
(other names throughout, so structure matching does the work), in one process, each way measured against the
baseline in the same run (best of `--repeat`):
- baseline: `tg.transfer(file, model, source_model=None, trace=False)` — names and registration order only;
- traced: the same with the target traced on the meta device (`trace=True`);
- traced + source model + verify: `source_model=` given, so both are traced and run once on one input to
  verify by function (the report's `verified`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import transformers

import torchgraft as tg


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    source = torchvision.models.resnet50()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.pth"
        torch.save(source.state_dict(), path)
        target = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000)).eval()
        base, r0 = best_of(lambda: tg.transfer(path, target, source_model=None, trace=False), args.repeat)
        traced, r1 = best_of(lambda: tg.transfer(path, target, source_model=None, trace=True), args.repeat)
        full, r2 = best_of(lambda: tg.transfer(path, target, source_model=torchvision.models.resnet50()),
                           args.repeat)
    print(f"{'run':<40} {'seconds':>8} {'added':>8}  loaded")
    for name, t, r in (("names only (trace=False)", base, r0), ("target traced", traced, r1),
                       ("both traced + verified", full, r2)):
        loaded = sum(e.status != "new" for e in r.entries)
        print(f"{name:<40} {t:>8.3f} {t - base:>8.3f}  {loaded}/{len(r.entries)}")
    print(f"verified: {r2.verified} ({r2.verification.summary() if r2.verification else ''})")


if __name__ == "__main__":
    main()
