"""Atomic outputs: write to a temporary file beside the target, fsync, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import torch

from torchgraft.errors import GraftError

__all__ = ["atomic_write", "save_safetensors", "refuse_same_path"]


def refuse_same_path(output: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None) -> None:
    """An output that would overwrite one of the inputs is refused before anything is read or written."""
    out = Path(output).resolve()
    for item in inputs:
        if item is not None and Path(item).exists() and Path(item).resolve() == out:
            raise GraftError(f"{output}: the output path is also an input; choose another --out so the input is kept.")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it is fsynced and renamed over `path`, else removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically; shared or non-contiguous tensors are copied as needed."""
    from safetensors.torch import save

    data = {k: v.detach().to("cpu").contiguous().clone() if _shares(v) else v.detach().to("cpu").contiguous()
            for k, v in tensors.items()}
    blob = save(data, metadata=metadata)
    with atomic_write(path) as f:
        f.write(blob)


def _shares(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()
