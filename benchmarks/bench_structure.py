"""Time `torchgraft.match.structure.align` on synthetic models of 100 to 5,000 modules.

    .venv/bin/python benchmarks/bench_structure.py [--repeat 3]

Each model is a stem, blocks of 6 groups (norm, qkv, proj, norm, fc1, fc2) over four widths, and a head, so
most signatures repeat and only the stem and head are unique: the alignment rests on the region aligner.
Cases (target against a source of N groups):

- same:      the same structure under other names (one region, identical signature sequences);
- insert:    one block inserted in the second width (a region that differs by 6 groups);
- remove:    one block removed from the second width;
- distinct:  every group has its own shapes (all unique-signature matches, target order shuffled in 4 chunks);
- reversed:  the four widths in reverse order (regions too far apart to align: the budget fallback).

Prints the best of `--repeat` runs, in milliseconds, on one core.
"""

from __future__ import annotations

import argparse
import gc
import time

from torchgraft.match.structure import Group, align

SIZES = (100, 250, 500, 1000, 2000, 5000)


def block(name: str, w: int) -> list[Group]:
    return [
        Group(f"{name}.norm1", (("weight", (w,)), ("bias", (w,)))),
        Group(f"{name}.attn.qkv", (("weight", (3 * w, w)), ("bias", (3 * w,)))),
        Group(f"{name}.attn.proj", (("weight", (w, w)), ("bias", (w,)))),
        Group(f"{name}.norm2", (("weight", (w,)), ("bias", (w,)))),
        Group(f"{name}.mlp.fc1", (("weight", (4 * w, w)), ("bias", (4 * w,)))),
        Group(f"{name}.mlp.fc2", (("weight", (w, 4 * w)), ("bias", (w,)))),
    ]


def model(size: int, prefix: str = "", insert: bool = False, remove: bool = False, reverse: bool = False):
    blocks = (size - 2) // 6
    widths = [64 * (1 + 4 * b // blocks) for b in range(blocks)]
    if reverse:
        widths = widths[::-1]
    groups = [Group(f"{prefix}stem", (("weight", (64, 3, 16, 16)),))]
    middle = blocks * 3 // 8
    for b, w in enumerate(widths):
        if remove and b == middle:
            continue
        groups += block(f"{prefix}blocks.{b}", w)
        if insert and b == middle:
            groups += block(f"{prefix}extra", w)
    return groups + [Group(f"{prefix}head", (("weight", (10, 256)), ("bias", (10,))))]


def distinct(size: int, prefix: str = "", shuffle: bool = False) -> list[Group]:
    groups = [Group(f"{prefix}g{i}", (("weight", (i + 1, 3)),)) for i in range(size)]
    if shuffle:
        q = size // 4
        groups = groups[2 * q:3 * q] + groups[:q] + groups[3 * q:] + groups[q:2 * q]
    return groups


CASES = {
    "same": lambda n: (model(n), model(n, "net.")),
    "insert": lambda n: (model(n), model(n, insert=True)),
    "remove": lambda n: (model(n), model(n, remove=True)),
    "distinct": lambda n: (distinct(n), distinct(n, "net.", shuffle=True)),
    "reversed": lambda n: (model(n), model(n, reverse=True)),
}


def best_ms(source: list[Group], target: list[Group], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        align(source, target)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'modules':>8} " + " ".join(f"{name:>10}" for name in CASES) + "   (ms, best of {})".format(args.repeat))
    for size in SIZES:
        cells = [best_ms(*make(size), args.repeat) for make in CASES.values()]
        print(f"{size:>8} " + " ".join(f"{ms:>10.1f}" for ms in cells))


if __name__ == "__main__":
    main()
