"""How long `plan` (torchgraft.match.plan) takes as models grow (issue: planning two 5,000-module models <= 2 s).

Run: .venv/bin/python benchmarks/bench_plan.py [--png plan_time.png]

Models are transformer-like stacks built on the meta device (no memory, no initialisation); each block has
4 Linear layers and 2 LayerNorms, so 6 modules a block. The source is a checkpoint description (names and
shapes only — planning never reads values) of the same stack under other names, so every tensor goes
through structure matching; `exact` uses the same names; `insert` adds one block in the middle of the target.
Every plan traces the target first (one forward pass on the meta device, `torchgraft.match.trace`); the
"trace" column is that pass alone. Times are the best of 3 runs, in seconds, on one process.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from torchgraft.io.read import Source, TensorInfo
from torchgraft.match.plan import plan


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        q = self.qkv(self.norm1(x))[..., : x.shape[-1]]
        x = x + self.proj(q)
        return x + self.fc2(self.fc1(self.norm2(x)))


class Stack(nn.Module):
    def __init__(self, blocks: int, width: int = 64, insert: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(16, width)
        n = blocks + (1 if insert else 0)
        self.blocks = nn.ModuleList(Block(width) for _ in range(n))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def source_of(model: nn.Module, rename: bool) -> Source:
    info = {}
    for key, t in model.state_dict().items():
        if rename:
            key = (key.replace("blocks.", "encoder.layers.").replace("qkv", "attn_in").replace("proj", "attn_out")
                   .replace("norm", "ln").replace("fc", "mlp").replace("stem", "embed").replace("head", "cls"))
        info[key] = TensorInfo(tuple(t.shape), "float32")
    return Source("synthetic", "memory", {}, info)


def best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--png", default=None, help="also save a plot of time against modules")
    args = parser.parse_args()
    rows = []
    from torchgraft.match.trace import execution_order

    print(f"{'modules':>8} {'trace s':>8} {'exact s':>9} {'renamed s':>10} {'insert s':>9}  loaded(renamed)")
    for blocks in (16, 40, 80, 160, 400, 833):
        with torch.device("meta"):
            target = Stack(blocks)
            inserted = Stack(blocks, insert=True)
        modules = sum(1 for _ in target.modules())
        src_same = source_of(target, rename=False)
        src_renamed = source_of(target, rename=True)
        t_trace = best_of(lambda: execution_order(target))
        assert execution_order(target).ok
        t_exact = best_of(lambda: plan(src_same, target))
        report = plan(src_renamed, target)
        t_renamed = best_of(lambda: plan(src_renamed, target))
        t_insert = best_of(lambda: plan(src_renamed, inserted))
        loaded = report.counts()["load"]
        rows.append((modules, t_exact, t_renamed, t_insert))
        print(f"{modules:>8} {t_trace:>8.3f} {t_exact:>9.3f} {t_renamed:>10.3f} {t_insert:>9.3f}  "
              f"{loaded}/{len(report.steps)}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for i, label in enumerate(("same names", "other names (structure)", "other names + inserted block"), 1):
            ax.plot([r[0] for r in rows], [r[i] for r in rows], marker="o", label=label)
        ax.set_xlabel("modules per model")
        ax.set_ylabel("plan time (s)")
        ax.set_title("torchgraft plan time vs model size")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"plot written to {args.png}")


if __name__ == "__main__":
    main()
