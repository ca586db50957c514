"""Read any checkpoint people actually have, safely: what is in it, in what format, wrapped how.

`load(path)` returns a `Source`: the ordered tensors (read lazily where the format allows), their shapes and
dtypes, the format, what wrapper was unwrapped, and metadata. No code from a file ever runs:
- torch files go through `torch.load(weights_only=True)` first, memory-mapped when they are zip files;
- what that refuses (whole-model pickles, training checkpoints with other objects) goes through torchgraft's
  restricted unpickler, which rebuilds tensors and containers and refuses any call (`io.unpickle`);
- TorchScript archives are read with that unpickler too, never compiled;
- safetensors are read through their header and a private (copy-on-write) memory map, shard by shard: their
  tensors are views of the file, read only when touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchgraft.errors import CheckpointError, IntegrityError
from torchgraft.io.pages import MappedFile
from torchgraft.io.unpickle import Placeholder, unpickle_legacy, unpickle_zip

__all__ = ["Source", "TensorInfo", "load", "WRAPPER_KEYS", "WRAPPER_PREFIXES"]

#: Keys under which training checkpoints keep the weights, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params",
                "ema", "model_ema", "state_dict_ema", "ema_state_dict")
#: Prefixes that wrappers add to every key: DistributedDataParallel / DataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_ZIP_MAGIC = b"PK\x03\x04"
#: Deeper module trees are refused as malformed (no real model nests this deep; it keeps recursion bounded).
MAX_MODULE_DEPTH = 200
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Source:
    """Tensors read from a checkpoint, in the file's order, with what is known about where they came from."""

    path: str
    format: str
    tensors: Mapping[str, torch.Tensor]
    info: dict[str, TensorInfo]
    wrapper: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, str] | None = None  # module name -> class, for whole-model pickles and TorchScript
    # Another framework's file (`torchgraft.io.frameworks`): each tensor's name in the file, the layout adapter
    # (and its arguments) that laid it out as PyTorch holds it, attributes its target modules should take, a
    # way to run it, and what its exporter may have folded.
    origins: dict[str, str] = field(default_factory=dict)
    layouts: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    module_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    runner: Any = None
    folded_bn: bool = False
    foldable_bias: dict[str, str] = field(default_factory=dict)
    # Data flow between its modules when the file describes the graph (a Keras config), as `match.trace` records
    # it for a PyTorch model: producer -> consumers, and the edges that pass only through an addition.
    flow: dict[str, set[str]] | None = None
    joined: set[tuple[str, str]] = field(default_factory=set)
    # False when the file's order is not the model's execution order (a Keras .weights.h5 without its config):
    # matching then trusts no alignment by position. `notes`: what the reader could not know, for the report.
    order_known: bool = True
    notes: list[str] = field(default_factory=list)

    def keys(self) -> list[str]:
        return list(self.info)

    def __len__(self) -> int:
        return len(self.info)

    def __contains__(self, key: object) -> bool:
        return key in self.info

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.info.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, read into memory (or memory-mapped where the format allows)."""
        return {k: self.tensors[k] for k in self.info}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], name: str = "state_dict") -> Source:
        """A state dict already in memory (`model.state_dict()`, a dict built by hand) as a Source, in its order.

        Wrapper prefixes (`module.`, `_orig_mod.`) are removed and reported as for files; anything that is not a
        tensor is refused."""
        bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)),
                   None)
        if bad is not None:
            raise CheckpointError(f"{name}: entry {bad[0]!r} is {type(bad[1]).__name__}; expected a state dict of "
                                  "tensor names to tensors. Pass model.state_dict(), or its 'state_dict' entry.")
        tensors, stripped = strip_wrapper_prefixes(dict(state))
        return cls(path=name, format="state_dict", tensors=tensors, info=_info_of(tensors),
                   wrapper=" > ".join(stripped) or None)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _info_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(tuple(v.shape), _dtype_name(v.dtype)) for k, v in tensors.items()}


# ---- entry point ------------------------------------------------------------------------------------------


def load(path: str | os.PathLike[str], *, key: str | None = None, verify_hash: bool = True) -> Source:
    """Read a checkpoint file or folder safely.

    Args:
        path: a `.pth/.pt/.bin/.ckpt` file (zip or legacy), a TorchScript archive, a `.safetensors` file, a
            `*.index.json` of shards, a Hugging Face model folder, a `torch.distributed.checkpoint` folder, or
            another framework's file: Keras `.keras`/`.weights.h5`/`.h5`, ONNX `.onnx`, NumPy `.npz`
            (big_vision), Flax `.msgpack` (`torchgraft.io.frameworks`).
        key: take the weights from this entry of a training checkpoint (e.g. `"ema"`) instead of the first of
            `WRAPPER_KEYS` found.
        verify_hash: check a file named `name-<hex>.ext` against the sha256 prefix in its name, like torch.hub.
    """
    try:
        return _load(path, key=key, verify_hash=verify_hash)
    except RecursionError:
        raise CheckpointError(
            f"{path}: the file nests containers too deeply to read; expected a checkpoint. It is corrupt or hostile."
        ) from None


def _load(path: str | os.PathLike[str], *, key: str | None, verify_hash: bool) -> Source:
    p = Path(path)
    shown = str(path)
    if not p.exists():
        raise CheckpointError(f"{shown}: no such file or folder; expected a checkpoint path. Check the path.")
    if p.is_dir():
        return _load_directory(p, key=key, verify_hash=verify_hash)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{shown}: the file is empty; expected a checkpoint. Re-download or re-save it.")
    if verify_hash:
        _check_hash_in_name(p)
    if p.name.endswith(".index.json"):
        return _load_index(p)
    with open(p, "rb") as f:
        head = f.read(16)
    foreign = _foreign_reader(p, head)
    if foreign is not None:
        return foreign(p)
    if head.startswith(_ZIP_MAGIC):
        return _load_torch_zip(p, key)
    if _looks_like_safetensors(head, p):
        return _load_safetensors(p)
    if head[:1] == b"\x80":  # a pickle protocol marker: the legacy torch format
        return _load_torch_legacy(p, key)
    raise CheckpointError(
        f"{shown}: unrecognised file format (starts with {head[:8]!r}); expected a torch file (.pth/.pt/.bin/"
        ".ckpt), a TorchScript archive, safetensors, a Hugging Face model folder, or another framework's file "
        "(.keras, .h5, .onnx, .npz, .msgpack)."
    )


_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _foreign_reader(p: Path, head: bytes):
    """The reader of another framework's file (`torchgraft.io.*_reader`), imported only when one is named: by
    content where the format has a signature (HDF5), else by extension."""
    suffix = p.suffix.lower()
    if suffix == ".keras":
        from torchgraft.io.keras_reader import read_keras
        return read_keras
    if head.startswith(_HDF5_MAGIC) or suffix in (".h5", ".hdf5"):
        from torchgraft.io.keras_reader import read_h5
        return read_h5
    if suffix == ".onnx":
        from torchgraft.io.onnx_reader import read_onnx
        return read_onnx
    if suffix == ".npz":
        from torchgraft.io.jax_reader import read_npz
        return read_npz
    if suffix == ".msgpack":
        from torchgraft.io.jax_reader import read_msgpack
        return read_msgpack
    return None


def _check_hash_in_name(p: Path) -> None:
    m = _HASH_IN_NAME.search(p.name)
    if not m or m.group(1).isdigit():  # all digits reads as a date or a counter, not a hash
        return
    prefix = m.group(1)
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise IntegrityError(
            f"{p}: sha256 starts {digest.hexdigest()[:len(prefix)]}, but the name promises {prefix}; the file is "
            "corrupt or was renamed. Re-download it, or pass --no-verify (verify_hash=False) if the name is wrong."
        )


# ---- torch pickles ----------------------------------------------------------------------------------------


def _first_bad_member(zf: zipfile.ZipFile) -> str | None:
    """`zf.testzip()` on two threads: the name of a member whose CRC fails, or None. Reading a member to its end
    checks its CRC; zlib computes it without the GIL, so two big members are checked at once."""

    def bad(info: zipfile.ZipInfo) -> bool:
        try:
            with zf.open(info) as member:
                while member.read(1 << 24):
                    pass
        except zipfile.BadZipFile:
            return True
        return False

    members = sorted(zf.infolist(), key=lambda info: -info.file_size)  # the biggest first: the threads finish together
    with ThreadPoolExecutor(max_workers=2) as pool:
        for info, failed in zip(members, pool.map(bad, members)):
            if failed:
                return info.filename
    return None


def _load_torch_zip(p: Path, key: str | None) -> Source:
    scripted: Any = None
    is_script = False
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            if not any(n.endswith("/data.pkl") for n in names):
                raise CheckpointError(f"{p}: a zip file without data.pkl; expected a torch checkpoint (torch.save).")
            bad = _first_bad_member(zf)
            if bad is not None:
                raise CheckpointError(f"{p}: member {bad} fails its CRC check; the file is corrupt. Re-download it.")
            if any(n.endswith("/constants.pkl") for n in names):
                is_script = True
                scripted = unpickle_zip(str(p), zf)
    except CheckpointError:
        raise
    except _ZIP_ERRORS as exc:  # a damaged local header, directory entry or member (zipfile raises all of these)
        raise CheckpointError(
            f"{p}: the zip archive is corrupt or truncated ({type(exc).__name__}: {_first_line(exc)}); expected a "
            "torch checkpoint. Re-download or re-save it."
        ) from None
    if is_script:
        return _from_object(p, "torchscript", scripted, key, metadata={"torchscript": True})
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        # weights_only refused a global: read it again with the restricted unpickler, which names it.
        with zipfile.ZipFile(p) as zf:
            obj = unpickle_zip(str(p), zf)
    except Exception as exc:
        raise CheckpointError(
            f"{p}: torch could not read the file ({type(exc).__name__}: {_first_line(exc)}); expected a torch "
            "checkpoint. Re-download or re-save it."
        ) from None
    return _from_object(p, "torch-zip", obj, key)


def _load_torch_legacy(p: Path, key: str | None) -> Source:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        # Refused or unreadable: torchgraft's reader either reads it (whole models) or says precisely why not.
        with open(p, "rb") as f:
            obj = unpickle_legacy(str(p), f)
    return _from_object(p, "torch-legacy", obj, key)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ---- unwrapping what a pickle held ------------------------------------------------------------------------


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _is_module(obj: Any) -> bool:
    return isinstance(obj, Placeholder) and "_modules" in obj.attributes


def _module_state(obj: Placeholder) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state_dict and module classes of a placeholder nn.Module tree, in `state_dict()` order."""
    tensors: dict[str, torch.Tensor] = {}
    classes: dict[str, str] = {}
    seen: set[int] = set()

    def walk(module: Placeholder, prefix: str, depth: int = 0) -> None:
        if id(module) in seen:
            return
        if depth > MAX_MODULE_DEPTH:
            raise ValueError(f"modules nested more than {MAX_MODULE_DEPTH} deep (at {prefix[:60]}...)")
        seen.add(id(module))
        classes[prefix.rstrip(".")] = module.class_name
        attrs = module.attributes
        if "_modules" not in attrs:  # a TorchScript object: attributes hold tensors and submodules directly
            for name, value in attrs.items():
                if isinstance(value, torch.Tensor):
                    tensors[prefix + name] = value
                elif isinstance(value, Placeholder):
                    walk(value, f"{prefix}{name}.", depth + 1)
            return
        for name, value in (attrs.get("_parameters") or {}).items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
        skip = attrs.get("_non_persistent_buffers_set") or set()
        for name, value in (attrs.get("_buffers") or {}).items():
            if isinstance(value, torch.Tensor) and name not in skip:
                tensors[prefix + name] = value
        for name, child in (attrs.get("_modules") or {}).items():
            if isinstance(child, Placeholder):
                walk(child, f"{prefix}{name}.", depth + 1)

    walk(obj, "")
    return tensors, classes


def _describe(value: Any) -> Any:
    """A JSON-friendly summary of a checkpoint entry that is not the weights."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}" if value.numel() != 1 or value.is_meta else value.item()
    if isinstance(value, Placeholder):
        return f"<{value.class_name}>"
    if isinstance(value, Mapping):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, (list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    return f"<{type(value).__name__}>"


def _from_object(p: Path, fmt: str, obj: Any, key: str | None, metadata: dict[str, Any] | None = None) -> Source:
    steps: list[str] = []
    metadata = dict(metadata or {})
    modules: dict[str, str] | None = None

    if isinstance(obj, Placeholder) and not _is_module(obj) and fmt != "torchscript":
        raise CheckpointError(
            f"{p}: the file holds a `{obj.class_name}` object, not weights or a model; expected a state_dict, a "
            "training checkpoint or a whole model."
        )
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        candidates = [k for k in WRAPPER_KEYS if k in obj and (_is_tensor_dict(obj[k]) or _is_module(obj[k]))]
        if key is not None:
            if key not in obj:
                raise CheckpointError(
                    f"{p}: no entry {key!r}; the checkpoint has {sorted(map(str, obj))[:12]}. Pick one of those."
                )
            chosen = key
        elif candidates:
            chosen = candidates[0]
        else:
            raise CheckpointError(
                f"{p}: found a dict with keys {sorted(map(str, obj))[:12]} but no weights under "
                f"{', '.join(WRAPPER_KEYS[:5])}...; expected a state_dict or a training checkpoint. "
                "Name the entry with --key."
            )
        if "pytorch-lightning_version" in obj:
            steps.append("lightning")
            metadata["lightning_version"] = obj["pytorch-lightning_version"]
        steps.append(f"[{chosen!r}]")
        metadata["checkpoint"] = {str(k): _describe(v) for k, v in obj.items() if k != chosen}
        others = [k for k in candidates if k != chosen]
        if others:
            metadata["other_weights"] = others
        obj = obj[chosen]
    if _is_module(obj) or (fmt == "torchscript" and isinstance(obj, Placeholder)):
        root_class = obj.class_name
        try:
            tensors, modules = _module_state(obj)
        except (TypeError, AttributeError, ValueError) as exc:  # names or attribute dicts a damaged pickle garbled
            raise CheckpointError(
                f"{p}: the pickled `{root_class}` is malformed ({type(exc).__name__}: {_first_line(exc)}); the file "
                "is corrupt. Re-download or re-save it."
            ) from None
        steps.append(f"whole model <{root_class}>" if fmt != "torchscript" else f"scripted <{root_class}>")
    elif isinstance(obj, torch.Tensor):
        raise CheckpointError(f"{p}: the file holds a single tensor, not named weights; expected a state_dict.")
    elif _is_tensor_dict(obj):
        tensors = dict(obj)
    elif isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        dropped = [str(k) for k in obj if k not in tensors]
        if not tensors:
            raise CheckpointError(f"{p}: the weights entry holds no tensors; expected a state_dict.")
        metadata["non_tensor_entries"] = dropped[:20]
    else:
        raise CheckpointError(
            f"{p}: the file holds a {type(obj).__name__}, not weights; expected a state_dict, a training "
            "checkpoint or a whole model."
        )
    tensors, prefixes = strip_wrapper_prefixes(tensors)
    steps.extend(prefixes)
    if modules is not None and prefixes:
        modules = {_strip_all(k, prefixes): v for k, v in modules.items()}
    return Source(
        path=str(p), format=fmt, tensors=tensors, info=_info_of(tensors),
        wrapper=" > ".join(steps) or None, metadata=metadata, modules=modules,
    )


def _strip_all(name: str, prefixes: list[str]) -> str:
    for prefix in prefixes:
        name = name[len(prefix):] if name.startswith(prefix) else ("" if name == prefix[:-1] else name)
    return name


def strip_wrapper_prefixes(tensors: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Remove `module.` / `_orig_mod.` when every key carries it (DDP, DataParallel, torch.compile)."""
    removed: list[str] = []
    while tensors:
        prefix = next((x for x in WRAPPER_PREFIXES if all(k.startswith(x) for k in tensors)), None)
        if prefix is None:
            break
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
        removed.append(prefix)
    return tensors, removed


# ---- safetensors ------------------------------------------------------------------------------------------


def _looks_like_safetensors(head: bytes, p: Path) -> bool:
    if len(head) < 9 or (p.suffix == ".safetensors" and head[:1] != b"\x80"):
        # by name: a truncated or damaged .safetensors gets the safetensors reader's precise error
        return p.suffix == ".safetensors"
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= n <= p.stat().st_size - 8


def _read_safetensors_header(p: Path) -> tuple[dict[str, Any], int]:
    """The checked header of a safetensors file, and where its data starts."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{p}: only {len(raw)} bytes; a safetensors file starts with an 8-byte header size.")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(
                f"{p}: safetensors header claims {n} bytes but the file has {size}; it is truncated or corrupt."
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers,
            # nesting deeper than the parser's recursion: all of them a corrupt or hostile header
            raise CheckpointError(f"{p}: safetensors header is not valid JSON ({_first_line(exc)[:120]}); the file "
                                  "is corrupt.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: safetensors header is a {type(header).__name__}, expected a JSON object.")
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise CheckpointError(
                    f"{p}: safetensors __metadata__ is {str(entry)[:80]}, expected a map of strings; the file is "
                    "corrupt."
                )
            continue
        ok = (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
              and all(type(d) is int and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("dtype"), str) and isinstance(entry.get("data_offsets"), list)
              and len(entry["data_offsets"]) == 2)
        if ok:
            start, end = entry["data_offsets"]
            ok = isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size
        if not ok:
            raise CheckpointError(
                f"{p}: safetensors entry {name!r} is malformed or points past the end of the file "
                f"({str(entry)[:80]}); the file is truncated or corrupt."
            )
    return header, 8 + n


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
              "U64": "uint64"}


class _SafetensorsTensors(Mapping[str, torch.Tensor]):
    """Tensors of one or more safetensors files: views of a private memory map of each file (shard).

    Mapping a file reads nothing: a tensor's bytes are read when they are touched, and writing to a tensor never
    changes the file (the map is copy-on-write).
    """

    def __init__(self, files: dict[str, Path], headers: dict[Path, tuple[dict[str, Any], int]]) -> None:
        self._files = files  # key -> file
        self._headers = headers  # file -> (its header, checked by _safetensors_info; where its data starts)
        self._maps: dict[Path, MappedFile] = {}
        for path in dict.fromkeys(files.values()):
            try:
                self._maps[path] = MappedFile(path)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: the file could not be memory-mapped ({_first_line(exc)}); expected "
                                      "a readable safetensors file.") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self._files[key]
        header, data_start = self._headers[path]
        entry = header[key]
        start, end = entry["data_offsets"]
        mapped = self._maps[path]
        try:
            if data_start + end > len(mapped):
                raise ValueError(f"the data ends at byte {data_start + end} but the file has {len(mapped)}")
            dtype = getattr(torch, _ST_DTYPES[entry["dtype"]])
            return mapped.tensor(data_start + start, end - start, dtype, entry["shape"])
        except (ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: tensor {key!r} could not be read ({_first_line(exc)}); the file is "
                                  "truncated or corrupt. Re-download or re-save it.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _safetensors_info(p: Path, header: dict[str, Any]) -> dict[str, TensorInfo]:
    # Keys in string order, as safetensors itself lists them: the writer's module order is not stored.
    entries = sorted((k, v) for k, v in header.items() if k != "__metadata__")
    info = {}
    for name, entry in entries:
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{p}: tensor {name!r} has unknown dtype {entry['dtype']!r}.")
        tensor_info = TensorInfo(tuple(int(d) for d in entry["shape"]), dtype)
        start, end = entry["data_offsets"]
        if tensor_info.numel * torch.empty((), dtype=getattr(torch, dtype)).element_size() != end - start:
            raise CheckpointError(
                f"{p}: tensor {name!r} has shape {list(tensor_info.shape)} of {dtype} but {end - start} bytes of "
                "data; the file is corrupt."
            )
        info[name] = tensor_info
    return info


def _load_safetensors(p: Path) -> Source:
    header, data_start = _read_safetensors_header(p)
    info = _safetensors_info(p, header)
    metadata = {"safetensors": header.get("__metadata__") or {}}
    tensors = _SafetensorsTensors({k: p for k in info}, {p: (header, data_start)})
    info, tensors, prefixes = _strip_lazy(info, tensors)
    return Source(str(p), "safetensors", tensors, info, wrapper=" > ".join(prefixes) or None, metadata=metadata)


def _strip_lazy(info: dict[str, TensorInfo], tensors: Mapping[str, torch.Tensor]):
    stripped, prefixes = strip_wrapper_prefixes(dict(info))
    if not prefixes:
        return info, tensors, []
    origin = dict(zip(stripped, info))
    return stripped, _Renamed(tensors, origin), prefixes


class _Renamed(Mapping[str, torch.Tensor]):
    def __init__(self, inner: Mapping[str, torch.Tensor], origin: dict[str, str]) -> None:
        self._inner, self._origin = inner, origin

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._inner[self._origin[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._origin)

    def __len__(self) -> int:
        return len(self._origin)


def _read_index(p: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A shard index and its weight map (tensor name -> shard file name), checked."""
    try:
        index = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError):
        raise _not_an_index(p, "text that is not readable JSON") from None
    if not isinstance(index, dict):
        raise _not_an_index(p, f"a JSON {_json_kind(index)}")
    if "weight_map" not in index:
        raise _not_an_index(p, "an object without a \"weight_map\" key")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise _not_an_index(p, f"a \"weight_map\" that is a {_json_kind(weight_map)}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise _not_an_index(p, f"{name!r} -> a {_json_kind(shard)} where a shard file name belongs")
    return index, weight_map


def _not_an_index(p: Path, found: str) -> CheckpointError:
    return CheckpointError(f"{p}: not a shard index; expected JSON with a \"weight_map\" of tensor name -> shard "
                           f"file, found {found}. Nothing was loaded; pass a shard file itself, or write the index "
                           "again (`save_pretrained` writes one).")


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _load_index(p: Path, key: str | None = None) -> Source:
    index, weight_map = _read_index(p)
    shards = {name: p.parent / name for name in dict.fromkeys(weight_map.values())}
    for name, shard in shards.items():
        if Path(name).is_absolute() or ".." in Path(name).parts or not shard.is_file():
            raise CheckpointError(f"{p}: shard {name!r} is missing next to the index; expected all shards beside it.")
    if all(name.endswith(".safetensors") for name in shards):
        info: dict[str, TensorInfo] = {}
        files: dict[str, Path] = {}
        headers: dict[Path, tuple[dict[str, Any], int]] = {}
        for shard in shards.values():
            headers[shard] = _read_safetensors_header(shard)
            shard_info = _safetensors_info(shard, headers[shard][0])
            info.update(shard_info)
            files.update({k: shard for k in shard_info})
        missing = [k for k in weight_map if k not in info]
        if missing:
            raise CheckpointError(f"{p}: {len(missing)} tensors in the index are in no shard (first: {missing[0]}).")
        ordered = {k: info[k] for k in weight_map}
        tensors = _SafetensorsTensors({k: files[k] for k in weight_map}, headers)
        ordered, tensors, prefixes = _strip_lazy(ordered, tensors)
        meta = {"index": index.get("metadata") or {}, "shards": list(shards)}
        return Source(str(p), "safetensors-sharded", tensors, ordered,
                      wrapper=" > ".join(prefixes) or None, metadata=meta)
    merged: dict[str, torch.Tensor] = {}
    for shard in shards.values():
        merged.update(load(shard, key=key).state_dict())
    tensors, prefixes = strip_wrapper_prefixes(merged)
    return Source(str(p), "torch-sharded", tensors, _info_of(tensors), wrapper=" > ".join(prefixes) or None,
                  metadata={"index": index.get("metadata") or {}, "shards": list(shards)})


def _load_directory(p: Path, *, key: str | None, verify_hash: bool) -> Source:
    if (p / ".metadata").is_file():  # a torch.distributed.checkpoint folder
        from torchgraft.io.dcp_reader import read_dcp
        return read_dcp(p, key=key)
    for name in HF_WEIGHT_FILES:
        if (p / name).is_file():
            source = load(p / name, key=key, verify_hash=verify_hash)
            break
    else:
        found = sorted(x.name for x in p.iterdir())[:10]
        raise CheckpointError(
            f"{p}: a folder without {' or '.join(HF_WEIGHT_FILES[:3])} (found {found}); expected a Hugging Face "
            "model folder. Pass the weights file itself."
        )
    config, error = folder_config(p)
    if config is not None:
        source.metadata["config"] = config
    if error is not None:
        source.metadata["config_error"] = error
    source.metadata["folder"] = str(p)
    return source


def folder_config(folder: Path) -> tuple[Any, str | None]:
    """A model folder's parsed `config.json` (None when it has none), and why it could not be read, if so."""
    config = folder / "config.json"
    if not config.is_file():
        return None, None
    try:
        return json.loads(config.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, "config.json is not valid JSON"
