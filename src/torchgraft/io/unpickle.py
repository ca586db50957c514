"""A restricted unpickler for torch files that `torch.load(weights_only=True)` refuses.

It rebuilds tensors and containers only. Any other class a pickle names becomes an inert placeholder
(`Placeholder`) that records the class name and the state the pickle gives it; no code from the file runs:
- creating an object the way `pickle` does for plain classes (`NEWOBJ`, `copyreg._reconstructor`) makes a
  placeholder without importing or calling anything;
- calling a global (`REDUCE`, the way `__reduce__` payloads run `os.system` and friends) is allowed only for the
  short list of data constructors below; anything else raises `UnsafePickleError` naming the global.

This is what lets torchgraft read `torch.save(model)` files without the model's class being importable,
TorchScript archives without compiling their code, and old (pre-1.6) files, all without `weights_only=False`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from typing import IO, Any, Callable

import torch

from torchgraft.errors import CheckpointError, UnsafePickleError

__all__ = ["Placeholder", "unpickle_zip", "unpickle_legacy"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_MANGLE = re.compile(r"\.___torch_mangle_\d+(?=\.|$)")
_MAX_PICKLES_BEFORE_DATA = 3  # legacy files: magic number, protocol version, system info


class _Refused(Exception):
    def __init__(self, global_name: str) -> None:
        super().__init__(global_name)
        self.global_name = global_name


class Placeholder:
    """An object of a class the reader did not import: its class name and the state the pickle gave it."""

    _tg_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        obj = object.__new__(cls)
        obj.__dict__.update(_tg_state=None, _tg_items={}, _tg_list=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Only a REDUCE (a call) reaches __init__; object creation through NEWOBJ does not.
        raise _Refused(self._tg_global)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_tg_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._tg_items[key] = value

    def append(self, value: Any) -> None:
        self._tg_list.append(value)

    def extend(self, values: Any) -> None:
        self._tg_list.extend(values)

    @property
    def class_name(self) -> str:
        return self._tg_global

    @property
    def attributes(self) -> dict[str, Any]:
        """The object's attribute dict, as its pickle gave it (empty when the state is not a dict)."""
        state = self._tg_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = state[0]  # (dict, slots) form
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<{self._tg_global}>"


_placeholder_classes: dict[str, type[Placeholder]] = {}


def _placeholder_class(global_name: str) -> type[Placeholder]:
    cls = _placeholder_classes.get(global_name)
    if cls is None:
        cls = type(global_name.rsplit(".", 1)[-1], (Placeholder,), {"_tg_global": global_name})
        _placeholder_classes[global_name] = cls
    return cls


# ---- the data constructors a pickle may call -------------------------------------------------------------


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # Backward hooks and metadata from a file are dropped: they could only hold placeholders or callables.
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, collections.OrderedDict())


def _rebuild_tensor(storage, offset, size, stride):
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):  # a legacy file's tensor, rebuilt once its bytes are read
        return data
    return torch.nn.Parameter(data, requires_grad)


def _rebuild_from_type_v2(func, new_type, args, state):
    tensor = func(*args)
    if new_type is torch.nn.Parameter and isinstance(tensor, torch.Tensor):
        return torch.nn.Parameter(tensor)
    return tensor


def _rebuild_meta_tensor(dtype, size, stride, requires_grad):
    return torch.empty_strided(size, stride, dtype=dtype, device="meta")


def _reconstructor(cls, base, state):
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        return cls.__new__(cls)
    raise _Refused(f"copyreg._reconstructor({getattr(cls, '__qualname__', cls)!r})")


def _identity(value, *_ignored):
    return value


def _safe_callables() -> dict[str, Any]:
    safe: dict[str, Any] = {
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_tensor,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.Tensor": torch.Tensor,
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.slice": slice,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "builtins.object": object,
        "copyreg._reconstructor": _reconstructor,
        "__builtin__.set": set,
    }
    # TorchScript archives wrap plain lists and tag types with these; each returns its data unchanged.
    for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "build_genericlist"):
        safe[f"torch.jit._pickle.{name}"] = _identity
    safe["torch.jit._pickle.restore_type_tag"] = _identity
    try:  # numpy arrays and scalars appear in training checkpoints (metrics, RNG state)
        import numpy as np

        for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
            safe[f"{prefix}._reconstruct"] = np.core.multiarray._reconstruct
            safe[f"{prefix}.scalar"] = np.core.multiarray.scalar
        safe["numpy.ndarray"] = np.ndarray
        safe["numpy.dtype"] = np.dtype
    except (ImportError, AttributeError):  # pragma: no cover - numpy is a dependency
        pass
    return safe


_SAFE = _safe_callables()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], persistent_load: Callable[[Any], Any]) -> None:
        super().__init__(file, encoding="latin1")
        self._persistent = persistent_load
        # Like pickle's fix_imports: protocols 0-2 (torch.save uses 2) name builtins `__builtin__.*`,
        # subprocess `commands.*`, copyreg `copy_reg.*`; read them as the Python 3 names they stand for.
        self._py2_names = _protocol(file) < 3

        self._file = file

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent(pid)

    def check_memo(self) -> None:
        """Refuse memo indices no pickler writes before the C unpickler sizes its memo table to them.

        `LONG_BINPUT 4294967295` in a 100-byte pickle makes `_pickle.Unpickler` allocate a memo table of 2**32
        entries (tens of GB, seconds of zeroing); a real pickler numbers its memo entries 0, 1, 2, ... so an
        index is never above the count of opcodes before it. The scan stops at the pickle's end (or where it
        is damaged; the unpickler then reports that) and the file position is put back.
        """
        f = self._file
        try:
            start = f.tell()
        except (OSError, AttributeError):
            return
        try:
            for n, (opcode, arg, _) in enumerate(pickletools.genops(f)):
                if opcode.name in _MEMO_OPCODES and isinstance(arg, int) and arg > n:
                    raise _BadMemo(f"{opcode.name} {arg} at opcode {n}")
        except _BadMemo:
            raise
        except Exception:  # damaged: the unpickler itself says how
            pass
        finally:
            f.seek(start)

    def find_class(self, module: str, name: str) -> Any:
        if self._py2_names:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        global_name = f"{module}.{name}"
        if global_name in _SAFE:
            return _SAFE[global_name]
        if module == "torch" and "." not in name:
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
            if name.endswith("Storage") and isinstance(value, type):
                return value  # only its dtype is read, in persistent_load
        if module.startswith("__torch__."):  # TorchScript class names, without the `___torch_mangle_N` parts
            global_name = _TORCH_MANGLE.sub("", module[len("__torch__.") :]) + "." + name
        return _placeholder_class(global_name)


def _protocol(file: IO[bytes]) -> int:
    """The pickle protocol of the pickle starting at the file's position (0 when there is no PROTO opcode)."""
    try:
        pos = file.tell()
        head = file.read(2)
        file.seek(pos)
    except (OSError, AttributeError, ValueError):
        return 2
    return head[1] if len(head) == 2 and head[0] == 0x80 else 0


def _storage_dtype(path: str, storage_type: Any) -> torch.dtype:
    if storage_type is torch.UntypedStorage:
        return torch.uint8
    with warnings.catch_warnings():  # legacy storage classes warn that TypedStorage is deprecated
        warnings.simplefilter("ignore")
        dtype = getattr(storage_type, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    raise CheckpointError(f"{path}: storage type {storage_type!r} is not a torch storage; the file is corrupt")


def _typed_storage(data: bytes | bytearray | memoryview, dtype: torch.dtype) -> torch.storage.TypedStorage:
    if len(data) == 0:
        untyped = torch.UntypedStorage(0)
    else:
        untyped = torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage()
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


class _BadMemo(Exception):
    pass


_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _run(path: str, unpickler: pickle.Unpickler) -> Any:
    try:
        if isinstance(unpickler, _RestrictedUnpickler):
            unpickler.check_memo()
        return unpickler.load()
    except _BadMemo as exc:
        raise CheckpointError(
            f"{path}: the pickle uses memo index {exc} that no pickler writes; the file is corrupt or hostile. "
            "Re-download or re-save it."
        ) from None
    except _Refused as refused:
        raise UnsafePickleError(path, refused.global_name) from None
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(
            f"{path}: the pickle nests containers too deeply to read; expected a checkpoint of tensors. "
            "Re-save the weights with `torch.save(model.state_dict(), ...)`."
        ) from None
    except Exception as exc:  # a corrupt pickle can raise nearly anything from the C unpickler
        raise CheckpointError(
            f"{path}: the pickle inside is corrupt ({type(exc).__name__}: {' '.join(str(exc)[:200].split())}); "
            "expected a torch checkpoint. "
            "Re-download or re-save the file."
        ) from None


def _pid_text(pid: Any) -> str:
    """A short one-line description of a persistent id (it may hold anything a damaged pickle put there)."""
    def one(x: Any) -> str:
        return " ".join(repr(x)[:24].split()) if isinstance(x, (str, bytes, int, float, bool)) else type(x).__name__
    if isinstance(pid, tuple):
        return "(" + ", ".join(one(x) for x in pid[:5]) + (", ..." if len(pid) > 5 else "") + ")"
    return one(pid)


def unpickle_zip(path: str, zf: zipfile.ZipFile, pickle_name: str = "data.pkl") -> Any:
    """Unpickle `<archive>/data.pkl` of a torch zip file or TorchScript archive, tensors included."""
    names = zf.namelist()
    pkl = next((n for n in names if n.endswith("/" + pickle_name) and n.count("/") == 1), None)
    if pkl is None:
        raise CheckpointError(f"{path}: zip archive has no {pickle_name}; expected a torch or TorchScript file")
    root = pkl.rsplit("/", 1)[0]
    storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{path}: unknown persistent id {_pid_text(pid)}; expected a torch storage")
        _, storage_type, key, _location, _numel = pid[:5]
        dtype = _storage_dtype(path, storage_type)
        if key not in storages:
            try:
                data = zf.read(f"{root}/data/{key}")
            except KeyError:
                raise CheckpointError(f"{path}: storage {key!r} is missing from the archive") from None
            storages[key] = _typed_storage(data, dtype)
        return storages[key]

    with zf.open(pkl) as f:
        return _run(path, _RestrictedUnpickler(io.BytesIO(f.read()), persistent_load))


def unpickle_legacy(path: str, f: IO[bytes]) -> Any:
    """Read a pre-1.6 torch file: magic number, protocol, system info, the object, then raw storages."""

    def plain(what: str) -> Any:
        return _run(path, _RestrictedUnpickler(f, _no_persistent(path, what)))

    magic = plain("magic number")
    if magic != LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a torch file (bad magic number); expected a torch checkpoint")
    plain("protocol version")
    sys_info = plain("system info")
    little_endian = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    pending: dict[str, tuple[torch.dtype, int]] = {}
    views: list[tuple[Any, ...]] = []
    storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            return pid[1] if len(pid) > 1 else None  # ('module', class, file, source): the source is never used
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointError(f"{path}: unknown persistent id {_pid_text(pid)}; expected a torch storage")
        _, storage_type, key, _location, numel, view = pid
        dtype = _storage_dtype(path, storage_type)
        pending.setdefault(key, (dtype, int(numel)))
        holder = _LazyStorage(key, dtype)
        if view is not None:
            holder.view = view
        views.append((holder,))
        return holder

    obj = _run(path, _LegacyUnpickler(f, persistent_load))
    keys = _run(path, _RestrictedUnpickler(f, _no_persistent(path, "storage keys")))
    if not isinstance(keys, list):
        raise CheckpointError(f"{path}: legacy storage key list is corrupt; expected a list of keys")
    remaining = _bytes_left(f)
    for key in keys:
        if not isinstance(key, (str, int)) or key not in pending:
            raise CheckpointError(f"{path}: legacy storage {key!r} is not referenced; the file is corrupt")
        dtype, _ = pending[key]
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointError(f"{path}: the file ends inside storage {key!r}; it is truncated")
        (count,) = struct.unpack("<q", header)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if count < 0 or nbytes > (1 << 40):
            raise CheckpointError(f"{path}: storage {key!r} claims {count} elements; the file is corrupt")
        if remaining is not None:
            remaining -= 8
            if nbytes > remaining:  # don't allocate what a corrupt count claims: the bytes aren't there
                raise CheckpointError(f"{path}: the file ends inside storage {key!r}; it is truncated")
            remaining -= nbytes
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointError(f"{path}: the file ends inside storage {key!r}; it is truncated")
        storage = _typed_storage(data, dtype)
        if not little_endian:
            storage = _typed_storage(_byteswap(data, dtype), dtype)
        storages[key] = storage
    return _resolve_legacy(path, obj, storages)


def _bytes_left(f: IO[bytes]) -> int | None:
    try:
        pos = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(pos)
    except (OSError, AttributeError, ValueError):
        return None
    return end - pos


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else ""


def _no_persistent(path: str, what: str) -> Callable[[Any], Any]:
    def refuse(pid: Any) -> Any:
        raise CheckpointError(f"{path}: unexpected storage reference in the {what}; the file is corrupt")

    return refuse


def _byteswap(data: bytes, dtype: torch.dtype) -> bytes:
    size = torch.empty((), dtype=dtype).element_size()
    arr = bytearray(data)
    for i in range(0, len(arr), size):
        arr[i : i + size] = arr[i : i + size][::-1]
    return bytes(arr)


class _LazyStorage:
    """A legacy storage reference whose bytes come after the pickle; tensors are rebuilt once they are read."""

    def __init__(self, key: str, dtype: torch.dtype) -> None:
        self.key = key
        self.dtype = dtype
        self.view: Any = None


class _LazyTensor:
    def __init__(self, storage: _LazyStorage, offset: int, size: Any, stride: Any, requires_grad: bool) -> None:
        self.args = (storage, offset, size, stride, requires_grad)


class _LegacyUnpickler(_RestrictedUnpickler):
    """Legacy files reference storages whose bytes follow the pickle, so tensors are rebuilt afterwards."""

    def find_class(self, module: str, name: str) -> Any:
        global_name = f"{module}.{name}"
        if global_name in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
            return _lazy_rebuild
        return super().find_class(module, name)


def _lazy_rebuild(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _LazyStorage):
        raise _Refused("torch._utils._rebuild_tensor_v2 on a non-storage")
    return _LazyTensor(storage, offset, size, stride, bool(requires_grad))


def _resolve_legacy(path: str, obj: Any, storages: dict[str, torch.storage.TypedStorage]) -> Any:
    seen: dict[int, Any] = {}

    def tensor_of(lazy: _LazyTensor) -> torch.Tensor:
        storage, offset, size, stride, requires_grad = lazy.args
        base = storages.get(storage.key)
        if base is None:
            raise CheckpointError(f"{path}: storage {storage.key!r} has no data; the file is truncated")
        try:
            if storage.view is not None:
                _view_key, view_offset, view_size = storage.view
                untyped = base.untyped_storage()
                size_bytes = base.element_size()
                part = untyped[view_offset * size_bytes : (view_offset + view_size) * size_bytes]
                base = torch.storage.TypedStorage(wrap_storage=part, dtype=storage.dtype, _internal=True)
            return torch._utils._rebuild_tensor(base, offset, size, stride).requires_grad_(requires_grad)
        except Exception as exc:  # a corrupt view, offset, size, stride or requires_grad from the pickle
            raise CheckpointError(
                f"{path}: a tensor in storage {storage.key!r} does not fit its storage or is malformed "
                f"({type(exc).__name__}: {_first_line(exc)}); the file is corrupt. Re-download or re-save it."
            ) from None

    def walk(value: Any, depth: int = 0) -> Any:
        if depth > 200:
            raise CheckpointError(f"{path}: containers nest more than 200 deep; the file is not a checkpoint")
        if isinstance(value, _LazyTensor):
            return tensor_of(value)
        if id(value) in seen:
            return seen[id(value)]
        if isinstance(value, torch.nn.Parameter) or isinstance(value, torch.Tensor):
            return value
        if isinstance(value, dict):
            seen[id(value)] = value
            for k in list(value):
                value[k] = walk(value[k], depth + 1)
        elif isinstance(value, list):
            seen[id(value)] = value
            value[:] = [walk(v, depth + 1) for v in value]
        elif isinstance(value, tuple):
            return type(value)(walk(v, depth + 1) for v in value) if not hasattr(value, "_fields") else value
        elif isinstance(value, Placeholder):
            seen[id(value)] = value
            value.__dict__["_tg_state"] = walk(value._tg_state, depth + 1)
            for k in list(value._tg_items):
                value._tg_items[k] = walk(value._tg_items[k], depth + 1)
        return value

    return walk(obj)


# ---- torch.distributed.checkpoint's .metadata --------------------------------------------------------------


def _layout_named(name: Any) -> torch.layout:
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.layout):
        raise _Refused(f"torch.serialization._get_layout({name!r})")
    return value


def _enum_value(value: Any) -> Any:
    if not isinstance(value, (int, str)):
        raise _Refused(f"an enum of {type(value).__name__}")
    return value


class _MetadataUnpickler(_RestrictedUnpickler):
    """A DCP `.metadata` pickle: its dataclasses become placeholders, and besides tensor and container data it
    may name a layout by its name, an enum member by its value (`_MEM_FORMAT_ENCODING`) and a path."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout_named
        if module.startswith("torch.distributed.checkpoint.") and name == "_MEM_FORMAT_ENCODING":
            return _enum_value
        if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "Path"):
            return lambda *parts: "/".join(str(p) for p in parts)
        return super().find_class(module, name)


def unpickle_dcp_metadata(path: str, f: IO[bytes]) -> Any:
    """A `torch.distributed.checkpoint` folder's `.metadata`, read without running anything it names."""
    return _run(path, _MetadataUnpickler(f, _no_persistent(path, "DCP metadata")))
