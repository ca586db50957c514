"""Resume state: written atomically each epoch, read back with `weights_only=True`."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchgraft.errors import CheckpointError
from torchgraft.io.write import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states as plain data (tensors and lists only)."""
    np_state = np.random.get_state()
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Temp file, fsync, rename: a run killed mid-write leaves the previous checkpoint whole."""
    with atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from; expected last.ckpt in the run folder "
                              "(the run may have stopped before finishing its first epoch). Start it again.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: the resume checkpoint is unreadable ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); expected a last.ckpt written by graft finetune."
                              ) from None
