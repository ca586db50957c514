"""`graft finetune --time-budget MINUTES`: how close a run's wall time comes to the minutes it was given.

Run:  .venv/bin/python benchmarks/bench_time_budget.py [--minutes 0.5,1,2] [--data digits8,photos]

Each run is `graft finetune` with its defaults and `--time-budget M` on one of the fine-tuning panel's data sets
(`bench_finetune_panel.write_data`: all 1,437 digit scans as 8 px files, or all 780 photograph crops),
torchvision's real ImageNet MobileNetV2, `--image-size 64`, its own process, 2 threads. The budget counts from
when the run starts (after Python has imported torch and graft): each row gives the process's wall time, the
run's own (the imports' seconds removed: a `python -c "import torchgraft.cli, torchvision"` timed in the same
session), the budget in training steps (the probe and validations are paid from it), the steps trained, and
the kept model's validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", default="0.5,1,2")
    parser.add_argument("--data", default="digits8,photos")
    args = parser.parse_args()
    from bench_finetune_panel import kept_row, timed, write_data
    from torchgraft.cli.demo import find_mobilenet_v2

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", COLUMNS="160")
    imports = min(timed([PY, "-c", "import torchgraft.cli, torchgraft.train.loop, torchvision"], env)[0]
                  for _ in range(2))
    print(f"imports: {imports:.1f} s\n")
    print("| data | budget | process wall time | without the imports | of the budget | budget in steps / trained "
          "| kept val acc |")
    print("|---|---:|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in args.data.split(","):
            data = write_data(kind, None, tmp / kind)
            for minutes in (float(m) for m in args.minutes.split(",")):
                out = tmp / f"{kind}-{minutes:g}"
                seconds, _ = timed([PY, "-m", "torchgraft.cli", "finetune", "--model", "torchvision:mobilenet_v2",
                                    "--weights", str(find_mobilenet_v2()), "--data", str(data), "--out", str(out),
                                    "--image-size", "64", "--time-budget", f"{minutes:g}"], env)
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
                planned = json.loads((out / "time_budget.json").read_text())["steps"]
                trained = sum(r["steps"] for r in rows if r["epoch"] >= 1)
                kept = kept_row(out)
                run = seconds - imports
                print(f"| {kind} | {minutes:g} min | {seconds:.1f} s | {run:.1f} s | {run / (60 * minutes):.2f} | "
                      f"{planned:.0f} / {trained} | {kept['val_acc']:.3f} (epoch {kept['epoch']}) |", flush=True)


if __name__ == "__main__":
    main()
