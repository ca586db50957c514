"""`torch.distributed.checkpoint` (DCP) folders, read in one process without a process group.

A DCP folder holds `.metadata` (a pickle of dataclasses: each tensor's full size, dtype and chunks, and where
each chunk's bytes are) and one `__<rank>_<n>.distcp` file per writer. `.metadata` goes through torchgraft's
restricted unpickler (`io.unpickle.unpickle_dcp_metadata`); each chunk is read with `torch.load(weights_only=True)`
(or as raw bytes, for checkpoints saved without `torch.save` framing) when its tensor is first touched, and the
chunks of a sharded tensor are put together in its full shape. The state dict's top-level entries are the
training checkpoint's (`{"model": ..., "optim": ...}`): the model's is taken as for a torch file
(`WRAPPER_KEYS`, or `key=`)."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from torchgraft.errors import CheckpointError
from torchgraft.io.read import WRAPPER_KEYS, Source, TensorInfo
from torchgraft.io.unpickle import Placeholder, unpickle_dcp_metadata

__all__ = ["read_dcp"]

_ZIP_MAGIC = b"PK\x03\x04"


def _attrs(obj: Any, what: str, path: Path) -> dict[str, Any]:
    if not isinstance(obj, Placeholder):
        raise CheckpointError(f"{path}: .metadata holds {type(obj).__name__} where {what} belongs; expected "
                              "torch.distributed.checkpoint metadata. The folder is corrupt.")
    return obj.attributes


class _Chunk:
    def __init__(self, file: Path, offset: int, length: int, offsets: tuple[int, ...], sizes: tuple[int, ...]):
        self.file, self.offset, self.length, self.offsets, self.sizes = file, offset, length, offsets, sizes


class _Tensors(Mapping[str, torch.Tensor]):
    """Each tensor put together from its chunks when touched."""

    def __init__(self, folder: Path, chunks: dict[str, list[_Chunk]], info: dict[str, TensorInfo],
                 fqns: dict[str, str]) -> None:
        self._folder, self._chunks, self._info, self._fqns = folder, chunks, info, fqns

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self._info[key]
        dtype = getattr(torch, info.dtype)
        out = torch.empty(info.shape, dtype=dtype)
        covered = 0
        for c in self._chunks[key]:
            part = self._read(c, dtype, self._fqns[key])
            where = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))
            out[where] = part.reshape(c.sizes)
            covered += part.numel()
        if covered != out.numel():
            raise CheckpointError(f"{self._folder}: the chunks of {self._fqns[key]} cover {covered} of its "
                                  f"{out.numel()} values; expected all of them. A writer's .distcp file is missing.")
        return out

    def _read(self, c: _Chunk, dtype: torch.dtype, fqn: str) -> torch.Tensor:
        try:
            with open(c.file, "rb") as f:
                f.seek(c.offset)
                data = f.read(c.length)
        except OSError as exc:
            raise CheckpointError(f"{c.file}: cannot read {fqn} ({exc.strerror}); expected the .distcp file "
                                  ".metadata names. Copy the whole checkpoint folder.") from None
        if len(data) != c.length:
            raise CheckpointError(f"{c.file}: {fqn} needs {c.length} bytes at {c.offset}, the file has "
                                  f"{len(data)}; expected a complete file. It is truncated; copy it again.")
        if data.startswith(_ZIP_MAGIC):
            try:
                value = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception as exc:  # a damaged chunk can fail in many ways inside torch.load
                raise CheckpointError(f"{c.file}: the bytes of {fqn} do not load ({type(exc).__name__}); "
                                      "expected a torch.save'd tensor. The file is corrupt.") from None
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{c.file}: {fqn} holds {type(value).__name__}; expected a tensor.")
            return value
        return torch.frombuffer(bytearray(data), dtype=dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)


def read_dcp(folder: str | Path, key: str | None = None) -> Source:
    """The tensors of a DCP folder, lazily; the model's entry of a training checkpoint, as for a torch file."""
    p = Path(folder)
    try:
        with open(p / ".metadata", "rb") as f:
            meta = _attrs(unpickle_dcp_metadata(str(p / ".metadata"), f), "Metadata", p)
    except OSError as exc:
        raise CheckpointError(f"{p / '.metadata'}: cannot read it ({exc.strerror}).") from None
    tensors_meta = meta.get("state_dict_metadata")
    storage = meta.get("storage_data")
    if not isinstance(tensors_meta, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{p}: .metadata has no state_dict_metadata/storage_data; expected metadata written "
                              "by torch.distributed.checkpoint.save. The folder is corrupt.")
    places: dict[tuple[str, tuple[int, ...]], _Chunk] = {}
    for index, where in storage.items():
        ia, wa = _attrs(index, "MetadataIndex", p), _attrs(where, "_StorageInfo", p)
        if wa.get("transform_descriptors"):
            raise CheckpointError(f"{p}: {ia.get('fqn')} is stored through {wa['transform_descriptors']}; "
                                  "expected plain chunks. Save the checkpoint without storage transforms.")
        places[(str(ia.get("fqn")), tuple(ia.get("offset") or ()))] = _Chunk(
            p / str(wa.get("relative_path")), int(wa.get("offset", 0)), int(wa.get("length", 0)), (), ())
    info: dict[str, TensorInfo] = {}
    chunks: dict[str, list[_Chunk]] = {}
    others = []
    for fqn, tm in tensors_meta.items():
        if not isinstance(tm, Placeholder) or not tm.class_name.endswith("TensorStorageMetadata"):
            others.append(fqn)  # bytes: the step counter, RNG states, objects; never unpickled
            continue
        a = tm.attributes
        props = a.get("properties")
        state = props._tg_state if isinstance(props, Placeholder) else None
        dtype = state[0] if isinstance(state, tuple) and state else None
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{p}: .metadata gives {fqn} no dtype; expected TensorProperties. The folder "
                                  "is corrupt.")
        parts = []
        for c in a.get("chunks") or []:
            ca = _attrs(c, "ChunkStorageMetadata", p)
            offsets, sizes = tuple(ca.get("offsets") or ()), tuple(ca.get("sizes") or ())
            place = places.get((fqn, offsets))
            if place is None:
                raise CheckpointError(f"{p}: .metadata names a chunk of {fqn} at {list(offsets)} but not where it "
                                      "is stored; expected both. The folder is corrupt.")
            parts.append(_Chunk(place.file, place.offset, place.length, offsets, sizes))
        info[fqn] = TensorInfo(tuple(int(d) for d in a.get("size") or ()), str(dtype).removeprefix("torch."))
        chunks[fqn] = parts
    if not info:
        raise CheckpointError(f"{p}: the DCP checkpoint holds no tensors (only {others[:3]}); expected model "
                              "weights.")
    # planner_data keeps how the saved state dict nested: ("model", "conv1.weight") for {"model": {...}}
    nesting = meta.get("planner_data") if isinstance(meta.get("planner_data"), dict) else {}
    tops = {path[0] for fqn, path in nesting.items() if fqn in info and isinstance(path, tuple) and len(path) > 1}
    if key is not None and key not in tops:
        raise CheckpointError(f"{p}: no entry {key!r} in the checkpoint (it has {sorted(tops)[:8] or 'none'}); "
                              "expected one of them as --key.")
    wanted = key if key is not None else next((k for k in WRAPPER_KEYS if k in tops), None)
    prefix = f"{wanted}." if wanted else ""
    order = [fqn for fqn in nesting if fqn in info] + [fqn for fqn in info if fqn not in nesting]
    kept = {fqn[len(prefix):]: fqn for fqn in order if fqn.startswith(prefix)}  # the saved state dict's order
    return Source(str(p), "dcp", _Tensors(p, {k: chunks[f] for k, f in kept.items()},
                                          {k: info[f] for k, f in kept.items()}, kept),
                  {k: info[f] for k, f in kept.items()}, wrapper=wanted,
                  metadata={"dcp_version": meta.get("version"), "not_tensors": others,
                            "files": sorted(x.name for x in p.glob("*.distcp"))})
