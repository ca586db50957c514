"""Checkpoints as memory maps: tensors that are views of a file, and handing their pages back once used.

A checkpoint file is mapped copy-on-write (private): a tensor read from it costs no memory until its bytes are
touched, and writing to it never changes the file. Once the bytes of such a tensor have been used (written to
an output file, cast to another dtype), `FileMaps.release` hands its pages back to the kernel
(`madvise(MADV_DONTNEED)`): the process's resident memory drops by that much, and the values are read from the
file again if the tensor is touched later. That is why releasing is always opt-in: an in-place change made to
a released tensor since it was read is dropped.

`torch.load(..., mmap=True)` maps torch zip files the same way (privately), so their tensors are released
the same way. `FileMaps` also tells a writer when a tensor's bytes still equal the file's, so they can be
copied file to file. Both need Linux (`/proc/self/maps`, `/proc/self/pagemap`, `madvise`); elsewhere they do
nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["MappedFile", "FileMaps"]

PAGE = mmap.PAGESIZE


class MappedFile:
    """One file mapped copy-on-write; `tensor()` gives views of its bytes (a copy only where misaligned)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def __len__(self) -> int:
        return len(self._map)

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """The `nbytes` at `offset` as a tensor of `dtype` and `shape`; the caller checked that they fit."""
        if nbytes == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        itemsize = dtype.itemsize
        if offset % itemsize:
            # The map starts on a page, so only a misaligned offset in the file misaligns the data: copy it.
            raw = torch.frombuffer(self._map, dtype=torch.uint8, offset=offset, count=nbytes).clone()
            return raw.view(dtype).reshape(tuple(shape))
        flat = torch.frombuffer(self._map, dtype=dtype, offset=offset, count=nbytes // itemsize)
        return flat.reshape(tuple(shape))


def _madvise() -> Callable[[int, int, int], int] | None:
    if not hasattr(mmap, "MADV_DONTNEED") or not os.path.exists("/proc/self/maps"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@dataclass(frozen=True)
class _Map:
    start: int
    end: int
    offset: int  # of `start` in the file
    device: int
    inode: int
    path: str


def _private_file_maps() -> list[_Map]:
    """This process's private (copy-on-write) mappings of regular files, sorted by address."""
    maps: list[_Map] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) < 6 or parts[1][3:4] != "p" or parts[4] == "0" or not parts[5].startswith("/") \
                        or parts[5].startswith("/dev/"):  # a private map of /dev/zero is anonymous memory
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                maps.append(_Map(start, end, int(parts[2], 16), os.makedev(major, minor), int(parts[4]), parts[5]))
    except (OSError, ValueError):
        return []
    maps.sort(key=lambda m: m.start)
    return maps


class FileMaps:
    """The private maps of files in this process (memory-mapped checkpoints), read once when created.

    For a tensor whose bytes lie in one of them it says where in which file they come from and whether they
    still equal the file (no page written since it was mapped: `/proc/self/pagemap`), so a writer can copy
    them file to file (`copy_file_range`) without touching memory; and it hands their pages back. Create it
    after the checkpoint is read, use it while the tensors are alive, then `close()` it. Tensors anywhere else
    (ordinary memory) are never touched. Outside Linux it finds nothing and does nothing.
    """

    def __init__(self) -> None:
        self._madvise = _madvise()
        self._maps = _private_file_maps() if self._madvise is not None else []
        self._starts = [m.start for m in self._maps]
        self._files: dict[str, int | None] = {}
        self._pagemap: int | None = None
        self.released = 0  # bytes handed back so far

    def __bool__(self) -> bool:
        return bool(self._maps)

    def __enter__(self) -> FileMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in [*self._files.values(), self._pagemap]:
            if fd is not None:
                os.close(fd)
        self._files, self._pagemap = {}, None

    def _find(self, start: int, end: int) -> _Map | None:
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or end > self._maps[i].end:
            return None
        return self._maps[i]

    def span(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """The address range of a contiguous CPU tensor's bytes when they lie in a mapped file, else None."""
        if not self._maps or tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
            return None
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        return (start, end) if self._find(start, end) is not None else None

    def file_range(self, span: tuple[int, int]) -> tuple[int, int] | None:
        """(open file descriptor, offset) holding the bytes of `span` when no page of it was written since the
        file was mapped; None when they may differ from the file or the file cannot be opened."""
        m = self._find(*span)
        if m is None or not self._clean(*span):
            return None
        if m.path not in self._files:
            self._files[m.path] = _open_same(m)
        fd = self._files[m.path]
        return (fd, m.offset + span[0] - m.start) if fd is not None else None

    def _clean(self, start: int, end: int) -> bool:
        """Every page of [start, end) is either not in memory or the file's own page (not a private copy)."""
        try:
            if self._pagemap is None:
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
            first, last = start // PAGE, (end - 1) // PAGE
            raw = os.pread(self._pagemap, (last - first + 1) * 8, first * 8)
        except OSError:
            return False
        if len(raw) != (last - first + 1) * 8:
            return False
        flags = np.frombuffer(raw, dtype="<u8") >> np.uint64(61)  # bit 63 present, 62 swapped, 61 file page
        present, swapped, file_page = flags >> np.uint64(2), (flags >> np.uint64(1)) & np.uint64(1), \
            flags & np.uint64(1)
        return not bool(np.any((swapped == 1) | ((present == 1) & (file_page == 0))))

    def release(self, tensor: torch.Tensor) -> int:
        """Hand back the whole pages that `tensor` alone covers; returns the bytes handed back (0 if none)."""
        span = self.span(tensor)
        return self.release_span(span) if span is not None else 0

    def release_span(self, span: tuple[int, int]) -> int:
        start = -(-span[0] // PAGE) * PAGE  # pages partly shared with a neighbouring tensor are kept
        end = span[1] // PAGE * PAGE
        if end <= start or self._madvise is None:
            return 0
        if self._madvise(start, end - start, mmap.MADV_DONTNEED) != 0:
            return 0
        self.released += end - start
        return end - start


def _open_same(m: _Map) -> int | None:
    """The mapped file, opened again, if the path still names that very file."""
    try:
        fd = os.open(m.path, os.O_RDONLY)
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (m.device, m.inode):
        os.close(fd)
        return None
    return fd
