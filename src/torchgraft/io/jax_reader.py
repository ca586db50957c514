"""JAX weights: NumPy `.npz` exports (big_vision, vit_jax) and Flax `.msgpack` files, as PyTorch names and layout.

Both hold a Flax parameter tree: `Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`. Each path becomes a
module path and a PyTorch local name, and each kernel records the layout adapter (`torchgraft.layout`) that
turns Flax's layout into PyTorch's:

    kernel (in, out)                         weight, `dense_kernel`
    kernel (*K, in, out)                     weight, `channels_last_kernel` (a conv)
    kernel (D, H, hd) / (H, hd, D)           weight, `flax_heads` (attention query/key/value, out)
    bias (H, hd)                             bias, `flax_heads`
    scale / embedding                        weight
    mean / var (batch_stats)                 running_mean / running_var

`FLAX_NAMES` is the documented table of names the ViT exports use for what PyTorch ViTs keep at the model's
root (`cls`, `pos_embedding`), and `FLAX_SCANNED` the scanned stacks big_vision saves with the blocks on a
leading axis (`Transformer/encoderblock/...`), read as one block each. `.npz` members are read when touched;
no pickled object in an `.npz` is ever loaded (`allow_pickle=False`). A `.msgpack` file is decoded with
msgpack and Flax's array extension only.
"""

from __future__ import annotations

import functools
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from torchgraft.errors import CheckpointError
from torchgraft.io.frameworks import ForeignTensor, foreign_source, need, torch_dtype_name
from torchgraft.io.read import Source
from torchgraft.layout import flax_heads

__all__ = ["read_npz", "read_msgpack", "FLAX_NAMES", "FLAX_SCANNED", "flax_entries"]

#: Leading parts of a path that wrap the parameters (an optimizer target, a `params` collection); removed.
FLAX_WRAPPERS = ("opt/target/", "params/", "target/")
#: Paths of the ViT exports (vit_jax, big_vision) whose PyTorch counterparts sit at the model's root, where a
#: PyTorch ViT keeps its class token and position embedding, and the order the exports run their top level.
FLAX_NAMES = {"cls": "cls_token", "Transformer/posembed_input/pos_embedding": "pos_embed",
              "pos_embedding": "pos_embed"}
#: Scope (its last name, counter left out) -> the order its named children run in.
FLAX_ORDER = {"": ("embedding", "cls", "pos_embedding", "Transformer", "MAPHead", "pre_logits", "head"),
              "Transformer": ("posembed_input", "encoderblock", "encoder_norm"),
              "MultiHeadDotProductAttention": ("query", "key", "value", "out"),
              # a block: vit_jax numbers its children with one counter, big_vision with one per type
              "encoderblock": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1",
                               "LayerNorm_1", "LayerNorm_2", "MlpBlock_0", "MlpBlock_3")}
#: Scopes stored scanned: every array under them has the blocks on its first axis.
FLAX_SCANNED = ("Transformer/encoderblock",)
_ATTENTION_IN = ("query", "key", "value")
_SUFFIX = re.compile(r"^(.*?)_(\d+)$")


def _local(leaf: str, parent: str, ndim: int) -> tuple[str, str | None, dict[str, Any]]:
    """(PyTorch local name, layout adapter, its arguments) of one Flax leaf."""
    if leaf == "kernel":
        if ndim == 3 and parent in _ATTENTION_IN:
            return "weight", "flax_heads", {"kind": "in"}
        if ndim == 3 and parent == "out":
            return "weight", "flax_heads", {"kind": "out"}
        if ndim == 2:
            return "weight", "dense_kernel", {}
        if ndim >= 3:
            return "weight", "channels_last_kernel", {"kind": "conv"}
        return "weight", None, {}
    if leaf == "bias" and ndim == 2 and parent in _ATTENTION_IN:
        return "bias", "flax_heads", {"kind": "in"}
    return {"scale": "weight", "embedding": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf), \
        None, {}


def _after_layout(shape: tuple[int, ...], layout: str | None, args: dict[str, Any]) -> tuple[int, ...]:
    if layout is None:
        return shape
    if layout == "dense_kernel":
        return (shape[1], shape[0])
    if layout == "channels_last_kernel":
        return (shape[-1], shape[-2], *shape[:-2])
    if layout == "flax_heads":
        return tuple(flax_heads(np.zeros(shape, np.float32), args["kind"]).shape)
    raise AssertionError(layout)


def _order(paths: list[str]) -> list[str]:
    """The file's order, unless it was sorted as strings (then `encoderblock_10` came before `encoderblock_2`,
    and `Transformer` before `embedding`): then the ViT exports' order of named scopes (`FLAX_ORDER`) and
    Flax's creation counters (`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `Dense_0`) put it back."""
    if paths != sorted(paths):
        return paths

    def base(part: str) -> tuple[str, int]:
        m = _SUFFIX.match(part)
        return (m.group(1), int(m.group(2))) if m else (part, -1)

    def part_key(scope: str, part: str) -> tuple:
        name, counter = base(part)
        known = FLAX_ORDER.get(base(scope.rpartition("/")[2])[0], ())
        rank = known.index(part) if part in known else known.index(name) if name in known else len(known)
        return (rank, counter, part)

    def key(path: str) -> tuple:
        parts = path.split("/")
        return tuple(part_key("/".join(parts[:i]), p) for i, p in enumerate(parts))

    return sorted(paths, key=key)


def flax_entries(arrays: Mapping[str, tuple[tuple[int, ...], Any, Callable[[], Any]]]) -> list[ForeignTensor]:
    """ForeignTensors of a flattened Flax tree: path -> (shape, dtype, read)."""
    stripped: dict[str, tuple[str, tuple[tuple[int, ...], Any, Callable[[], Any]]]] = {}
    for origin, value in arrays.items():
        path = origin
        for wrapper in FLAX_WRAPPERS:
            path = path.removeprefix(wrapper)
        if path.startswith("batch_stats/"):
            path = path.removeprefix("batch_stats/")
        stripped[path] = (origin, value)
    entries: list[ForeignTensor | list[list[ForeignTensor]]] = []
    stacks: dict[str, list[list[ForeignTensor]]] = {}  # a scanned scope: its blocks, in place of its first array
    for path in _order(list(stripped)):
        origin, (shape, dtype, read) = stripped[path]
        scanned = next((s for s in FLAX_SCANNED if path.startswith(s + "/")), None)
        if scanned is None or not shape:
            entries.append(_entry(path, origin, shape, dtype, read))
            continue
        if scanned not in stacks:
            stacks[scanned] = [[] for _ in range(shape[0])]
            entries.append(stacks[scanned])
        rest = path[len(scanned) + 1:]
        blocks = stacks[scanned]
        read = functools.cache(read)  # each block's slice reads the stack once
        if shape[0] != len(blocks):
            raise CheckpointError(f"{origin}: {shape[0]} blocks on its first axis, other arrays of {scanned} have "
                                  f"{len(blocks)}; expected one scanned stack. The file is inconsistent.")
        for i in range(shape[0]):
            blocks[i].append(_entry(f"{scanned}_{i}/{rest}", f"{origin}[{i}]", shape[1:], dtype,
                                    lambda read=read, i=i: np.asarray(read())[i]))
    flat: list[ForeignTensor] = []
    for item in entries:
        flat += [e for block in item for e in block] if isinstance(item, list) else [item]
    return flat


def _entry(path: str, origin: str, shape: tuple[int, ...], dtype: Any, read: Callable[[], Any]) -> ForeignTensor:
    if path in FLAX_NAMES:
        return ForeignTensor(FLAX_NAMES[path], origin, read, tuple(shape), torch_dtype_name(dtype))
    parts = path.split("/")
    parent = parts[-2] if len(parts) > 1 else ""
    local, layout, args = _local(parts[-1], parent, len(shape))
    name = ".".join([*parts[:-1], local])
    return ForeignTensor(name, origin, read, _after_layout(tuple(shape), layout, args), torch_dtype_name(dtype),
                         layout, args)


# ---- .npz -------------------------------------------------------------------------------------------------


def read_npz(path: str | Path) -> Source:
    """A NumPy `.npz` of a Flax tree (keys joined with `/`), each member read when touched."""
    p = Path(path)
    try:
        archive = np.load(p, allow_pickle=False, mmap_mode=None)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{p}: not a readable .npz ({' '.join(str(exc).split())[:120]}); expected a NumPy "
                              "archive of arrays. It is truncated or corrupt; export it again.") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{p}: a single NumPy array; expected an .npz archive of named arrays.")
    arrays = {}
    for name in archive.files:
        try:
            shape, dtype = _npy_header(archive, name)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise CheckpointError(f"{p}: member {name!r} is damaged ({' '.join(str(exc).split())[:100]}); "
                                  "expected a NumPy array. Export the file again.") from None
        arrays[name] = (shape, dtype, lambda name=name: _member(p, archive, name))
    if not arrays:
        raise CheckpointError(f"{p}: the archive holds no arrays; expected model weights.")
    return foreign_source(str(p), "npz", flax_entries(arrays), metadata={"members": len(arrays)})


def _npy_header(archive: Any, name: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.zip.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = reader(f)
    if dtype.hasobject:
        raise ValueError("it holds Python objects")
    return tuple(int(d) for d in shape), dtype


def _member(p: Path, archive: Any, name: str) -> np.ndarray:
    try:
        return archive[name]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{p}: member {name!r} does not read ({' '.join(str(exc).split())[:100]}); expected "
                              "a NumPy array. The file is truncated or corrupt.") from None


# ---- Flax .msgpack ----------------------------------------------------------------------------------------

_EXT_NDARRAY, _EXT_NPSCALAR = 1, 3  # flax.serialization's extension codes


def _decode(p: Path, msgpack: Any) -> Callable[[int, bytes], Any]:
    def ext_hook(code: int, data: bytes) -> Any:
        if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
            shape, dtype, buffer = msgpack.unpackb(data, raw=False)
            if code == _EXT_NPSCALAR:
                return np.frombuffer(buffer, dtype=np.dtype(dtype))[0]
            array = np.frombuffer(buffer, dtype=np.dtype(dtype))
            return array.reshape(shape)
        raise CheckpointError(f"{p}: a msgpack extension of type {code}; expected Flax's arrays (type 1) and "
                              "scalars (type 3).")

    return ext_hook


def _flatten(tree: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _flatten(v, f"{prefix}{k}/", out)
    elif isinstance(tree, np.ndarray) or isinstance(tree, np.generic):
        out[prefix[:-1]] = np.asarray(tree)


def read_msgpack(path: str | Path) -> Source:
    """A Flax `.msgpack` (`flax.serialization.to_bytes` of a parameter tree, `flax_model.msgpack`)."""
    p = Path(path)
    msgpack = need("msgpack", "flax", "reading a Flax .msgpack file")
    try:
        tree = msgpack.unpackb(p.read_bytes(), ext_hook=_decode(p, msgpack), raw=False, strict_map_key=False)
    except CheckpointError:
        raise
    except Exception as exc:  # msgpack raises several types for damaged data
        raise CheckpointError(f"{p}: not a readable msgpack file ({type(exc).__name__}); expected a Flax parameter "
                              "tree. It is truncated or corrupt; save it again.") from None
    arrays: dict[str, np.ndarray] = {}
    _flatten(tree, "", arrays)
    if not arrays:
        raise CheckpointError(f"{p}: the msgpack tree holds no arrays; expected a Flax parameter tree.")
    return foreign_source(str(p), "flax-msgpack",
                          flax_entries({k: (tuple(v.shape), v.dtype, lambda v=v: v) for k, v in arrays.items()}),
                          metadata={"arrays": len(arrays)})
