"""Peak memory and wall time of a big transfer, against the seeds' recipe and a bare load, in the same run.

Run: .venv/bin/python benchmarks/bench_transfer_memory.py [--repeat 3] [--layers 24] [--width 4096]

It builds `bench_model.py` (24 x Linear(4096, 4096) + a 1000-class head: 406.8M parameters, 1.63 GB in
float32) on the meta device, fills it tensor by tensor with random values and saves it as safetensors and as a
torch zip `.pth` in a temporary folder (deleted afterwards). Then, for each source format, each of these runs
in its own process, measured with `/usr/bin/time -v` (wall time, maximum resident set size):

- recipe: the seeds' recipe: `torch.load` / `safetensors.torch.load_file`, build the target (head changed to
  10 classes) normally, `model.state_dict()`, keep the checkpoint entries whose name and shape match,
  `update`, `load_state_dict`, then `torch.save` / `save_file` the result;
- graft: `graft transfer SRC --model benchmarks/bench_model.py:build --model-kwargs '{"num_classes": 10}'
  --out OUT.safetensors`;
- bare load_file: `safetensors.torch.load_file` of the safetensors checkpoint (the same weights);
- import torch: the interpreter and `import torch` alone, the floor under every other row;
- import torch + copy: `import torch`, then a kernel copy (`copy_file_range`) of the safetensors file to the
  output and an fsync: the floor under any transfer that writes its output durably, as graft does.

Runs are interleaved and repeated (`--repeat`); the table shows medians. Files are read from a warm page cache
(they have just been written). Peak RSS is reported as a multiple of the checkpoint's size in bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "bench_model.py"
TIME = "/usr/bin/time"


# ---- the processes measured -------------------------------------------------------------------------------


def recipe(src: str, out: str, layers: int, width: int) -> None:
    """The seeds' recipe, as written in countless training scripts."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_model import build

    if src.endswith(".safetensors"):
        from safetensors.torch import load_file, save_file

        checkpoint = load_file(src)
    else:
        checkpoint = torch.load(src, map_location="cpu")
    model = build(num_classes=10, layers=layers, width=width)
    model_dict = model.state_dict()
    pretrained = {k: v for k, v in checkpoint.items() if k in model_dict and v.shape == model_dict[k].shape}
    model_dict.update(pretrained)
    model.load_state_dict(model_dict)
    if out.endswith(".safetensors"):
        save_file(model.state_dict(), out)
    else:
        torch.save(model.state_dict(), out)


def bare(src: str) -> None:
    from safetensors.torch import load_file

    tensors = load_file(src)
    assert tensors


def import_torch() -> None:
    import torch  # noqa: F401


def durable_copy(src: str, out: str) -> None:
    """`import torch`, then copy the checkpoint to `out` in the kernel and fsync it: the least any transfer that
    writes its output durably can cost on this machine."""
    import torch  # noqa: F401

    with open(src, "rb") as fin, open(out, "wb") as fout:
        size, done = os.fstat(fin.fileno()).st_size, 0
        while done < size:
            done += os.copy_file_range(fin.fileno(), fout.fileno(), size - done)
        os.fsync(fout.fileno())


# ---- the checkpoint ---------------------------------------------------------------------------------------


def make_checkpoint(folder: Path, layers: int, width: int) -> tuple[Path, Path]:
    """Save the 1000-class model as safetensors and .pth, one copy of its weights in memory at a time."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE))
    from bench_model import build

    with torch.device("meta"):
        model = build(num_classes=1000, layers=layers, width=width)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, meta in model.state_dict().items():
        value = torch.empty(meta.shape, dtype=meta.dtype)
        flat = value.view(-1)
        for start in range(0, flat.numel(), 1 << 22):  # chunks of 4M values: no full-size temporary
            chunk = flat[start:start + (1 << 22)]
            chunk.copy_(torch.randn(chunk.numel(), generator=generator) * 0.02)
        state[name] = value
    st, pth = folder / "ckpt.safetensors", folder / "ckpt.pth"
    save_file(state, st)
    torch.save(state, pth)
    return st, pth


# ---- measuring --------------------------------------------------------------------------------------------


def measure(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of `cmd`, from /usr/bin/time -v."""
    done = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True, env={**os.environ,
                                                                                   "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    hours, minutes, seconds = clock.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds), rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the raw measurements here")
    parser.add_argument("--run", nargs="+", help=argparse.SUPPRESS)  # internal: one measured process
    args = parser.parse_args()
    if args.run:
        what, *rest = args.run
        if what == "recipe":
            recipe(rest[0], rest[1], args.layers, args.width)
        elif what == "bare":
            bare(rest[0])
        elif what == "copy":
            durable_copy(rest[0], rest[1])
        else:
            import_torch()
        return
    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} is missing; install it: apt-get update && apt-get install -y time")

    folder = Path(tempfile.mkdtemp(prefix="torchgraft-bench-"))
    try:
        started = time.perf_counter()
        st, pth = make_checkpoint(folder, args.layers, args.width)
        size = st.stat().st_size
        print(f"checkpoint: {size / 1e9:.2f} GB safetensors, {pth.stat().st_size / 1e9:.2f} GB .pth "
              f"(made in {time.perf_counter() - started:.0f} s)", flush=True)
        me = [sys.executable, str(Path(__file__).resolve()), "--layers", str(args.layers), "--width",
              str(args.width), "--run"]
        kwargs = json.dumps({"num_classes": 10, "layers": args.layers, "width": args.width})
        runs: dict[tuple[str, str], list[tuple[float, int]]] = {}
        for i in range(args.repeat):
            for fmt, src in (("safetensors", st), ("pth", pth)):
                out_recipe = folder / f"recipe-out{src.suffix}"
                out_graft = folder / "graft-out.safetensors"
                cmds = {
                    "recipe": [*me, "recipe", str(src), str(out_recipe)],
                    "graft": [sys.executable, "-m", "torchgraft.cli", "transfer", str(src), "--model",
                              f"{MODEL}:build", "--model-kwargs", kwargs, "--out", str(out_graft)],
                    "bare load_file": [*me, "bare", str(st)],
                    "import torch": [*me, "import"],
                    "import torch + copy": [*me, "copy", str(st), str(out_graft)],
                }
                for name, cmd in cmds.items():
                    wall, rss = measure(cmd)
                    runs.setdefault((fmt, name), []).append((wall, rss))
                    print(f"  run {i + 1} {fmt:11} {name:15} {wall:6.2f} s  {rss / 1e9:5.2f} GB "
                          f"({rss / size:.2f}x)", flush=True)
                    for out in (out_recipe, out_graft):
                        out.unlink(missing_ok=True)
        print()
        print(f"Checkpoint: {size:,} bytes ({size / 1e9:.2f} GB); medians of {args.repeat} runs.")
        print()
        print("| source | run | wall | peak RSS | RSS / checkpoint | wall / recipe | wall / bare load_file |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for fmt in ("safetensors", "pth"):
            med = {name: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v))
                   for (f, name), v in runs.items() if f == fmt}
            for name, (wall, rss) in med.items():
                print(f"| {fmt} | {name} | {wall:.2f} s | {rss / 1e9:.2f} GB | {rss / size:.2f}x | "
                      f"{wall / med['recipe'][0]:.2f} | {wall / med['bare load_file'][0]:.2f} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"checkpoint_bytes": size, "runs": {
                f"{f}/{n}": v for (f, n), v in runs.items()}}, indent=2))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
