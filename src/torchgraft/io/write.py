"""Atomic outputs: write to a temporary file beside the target, fsync, then rename over it; safetensors written
tensor by tensor."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import torch

from torchgraft.errors import GraftError
from torchgraft.io.pages import FileMaps

__all__ = ["atomic_write", "save_pretrained_folder", "save_safetensors", "safetensors_header", "refuse_same_path"]


def refuse_same_path(output: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None) -> None:
    """An output that would overwrite one of the inputs is refused before anything is read or written."""
    out = Path(output).resolve()
    for item in inputs:
        if item is not None and Path(item).exists() and Path(item).resolve() == out:
            raise GraftError(f"{output}: the output path is also an input; choose another --out so the input is kept.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it is fsynced and renamed over `path`, else removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the permissions open() would give
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_pretrained_folder(model, path: str | os.PathLike[str]) -> None:
    """A transformers model as a `save_pretrained` folder (config.json + model.safetensors) that `from_pretrained`
    loads, written atomically: into a temporary folder beside `path`, then renamed (over an empty folder only)."""
    target = Path(path)
    if not callable(getattr(model, "save_pretrained", None)) or getattr(model, "config", None) is None:
        raise GraftError(f"{path}: an output folder is a save_pretrained folder, for a transformers model; "
                         f"{type(model).__name__} is not one. Nothing was written. Name a file instead, e.g. "
                         "--out model.safetensors.")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise GraftError(f"{path}: already exists and is not an empty folder; expected a new folder for the model. "
                         "Nothing was written. Choose another --out.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: safetensors dtype codes, in the order safetensors itself lays tensors out (larger elements first, which keeps
#: every tensor aligned to its element size); ties are broken by name.
_ST_CODES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
             torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
             torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
_ST_RANK = {dtype: rank for rank, dtype in enumerate(_ST_CODES)}
_CHUNK = 64 << 20  # bytes per write call: progress moves at least this often


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None, *, progress: Callable[[int, int], None] | None = None,
                     release_pages: bool = False) -> None:
    """Write tensors as safetensors, atomically, one tensor at a time: never the whole file in memory.

    The header is computed from shapes and dtypes and written first, then each tensor's bytes straight from its
    memory (a non-contiguous or non-CPU tensor is copied alone). The file is byte for byte what
    `safetensors.torch.save` writes (which orders metadata keys at random; here they are sorted), so
    `safetensors.torch.load_file` reads it. Tensors may share memory (tied weights): each name gets its own bytes.
    A tensor that is an unchanged view of a memory-mapped checkpoint (safetensors, torch zip) is copied file to
    file by the kernel (`copy_file_range`, on Linux), without reading it into memory.

    Args:
        progress: called as `progress(bytes_written, total_bytes)` as the data is written.
        release_pages: hand back the memory pages of tensors that are views of a memory-mapped checkpoint once
            their bytes are written (`torchgraft.io.pages`), so a model loaded from one is written with about one
            copy of the weights in memory. Only for tensors not used afterwards: an in-place change made to such
            a tensor since it was read is dropped from memory (the file written has it).
    """
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise GraftError(f"{path}: tensor name {name!r} cannot be saved; safetensors expects string names "
                             "other than '__metadata__'. Nothing was written.")
        if value.dtype not in _ST_CODES:
            raise GraftError(f"{path}: tensor {name!r} has dtype {value.dtype}, which safetensors cannot store; "
                             f"expected one of {', '.join(str(d).removeprefix('torch.') for d in _ST_CODES)}. "
                             "Nothing was written.")
        if value.layout != torch.strided:
            raise GraftError(f"{path}: tensor {name!r} is {value.layout}; safetensors stores dense tensors only. "
                             "Call .to_dense() first. Nothing was written.")
        items.append((name, value.detach()))
    items.sort(key=lambda kv: (-_ST_RANK[kv[1].dtype], kv[0]))
    header = safetensors_header(items, metadata)
    total = sum(v.numel() * v.element_size() for _, v in items)
    done = 0
    with FileMaps() as maps, atomic_write(path) as f, _Writeback(f) as writeback:
        release = _release_schedule(items, maps) if release_pages and maps else {}
        f.write(header)
        for i, (_, value) in enumerate(items):
            for written in _write_tensor(f, value, maps):
                writeback.start(len(header) + done, written)
                done += written
                if progress is not None:
                    progress(done, total)
            for span in release.get(i, ()):
                maps.release_span(span)
    if progress is not None and total == 0:
        progress(0, 0)


def safetensors_header(items: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `items` in this order, padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise GraftError(f"safetensors metadata must map strings to strings; got {str(metadata)[:80]}.")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, value in items:
        size = value.numel() * value.element_size()
        header[name] = {"dtype": _ST_CODES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_tensor(f: IO[bytes], value: torch.Tensor, maps: FileMaps) -> Iterator[int]:
    """Write a tensor's bytes in chunks, yielding each chunk's size."""
    if value.numel() == 0:
        return
    copied = 0
    span = maps.span(value)
    where = maps.file_range(span) if span is not None else None
    if where is not None:
        copied = yield from _copy_from_file(f, *where, span[1] - span[0])
    flat = value.to("cpu").contiguous().reshape(-1)
    data = memoryview(flat.view(torch.uint8).numpy())
    for start in range(copied, len(data), _CHUNK):
        chunk = data[start:start + _CHUNK]
        f.write(chunk)
        yield len(chunk)


def _copy_from_file(f: IO[bytes], fd: int, offset: int, size: int) -> Iterator[int]:
    """Copy `size` bytes at `offset` of file `fd` to the end of `f` in the kernel; returns how many were copied
    (fewer, even 0, where the file systems cannot do it: the caller writes the rest)."""
    if not hasattr(os, "copy_file_range"):
        return 0
    f.flush()
    position = f.tell()
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(fd, f.fileno(), min(size - done, _CHUNK), offset + done, position + done)
            if n <= 0:
                break
            done += n
            yield n
    except OSError:  # EXDEV, EOPNOTSUPP, ENOSYS...: write from memory instead
        pass
    f.seek(position + done)
    return done


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class _Writeback:
    """Asks the kernel to start writing each written range to disk (Linux `sync_file_range`), from a background
    thread, so the disk works while the next tensors are copied and the final fsync has little left to wait for.
    Durability still comes from that fsync; this only moves the wait off the copying thread."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._pool = ThreadPoolExecutor(max_workers=1) if _SYNC_FILE_RANGE is not None else None

    def start(self, offset: int, length: int) -> None:
        if self._pool is None or length < (1 << 20):
            return
        self._f.flush()
        self._pool.submit(_SYNC_FILE_RANGE, self._f.fileno(), offset, length, _SYNC_FILE_RANGE_WRITE)

    def __enter__(self) -> _Writeback:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _release_schedule(items: Sequence[tuple[str, torch.Tensor]], maps: FileMaps) -> dict[int, list]:
    """When to hand back each memory-mapped tensor's pages: after the last tensor overlapping it is written."""
    spans = [(span, i) for i, (_, value) in enumerate(items) if (span := maps.span(value)) is not None]
    spans.sort()
    schedule: dict[int, list] = {}
    cluster: list[tuple[tuple[int, int], int]] = []  # spans that overlap one another (tied weights), by start
    cluster_end = 0
    for span, i in [*spans, ((1 << 64, 1 << 64), -1)]:
        if cluster and span[0] >= cluster_end:
            last = max(k for _, k in cluster)
            schedule.setdefault(last, []).extend(s for s, _ in cluster)
            cluster = []
        cluster.append((span, i))
        cluster_end = max(cluster_end, span[1]) if len(cluster) > 1 else span[1]
    return schedule
