"""Property-based fuzzing of every reader, from real files: torch zip, legacy pickle, safetensors (bytes and header
JSON), shard index files and a TorchScript archive. Every case either loads (and every tensor can be read) or
raises a `torchgraft.GraftError` — never another exception, within bounded time.

Inputs that once crashed a reader are kept in `tests/io/corpus/` and replayed by `test_corpus_regressions`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from torchgraft import GraftError, load
from torchgraft.numeric import check_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CORPUS = Path(__file__).parent / "corpus"
# TORCHGRAFT_FUZZ_EXAMPLES=1000 for a long hunt; the default keeps the whole file to a few seconds.
FUZZ = settings(max_examples=int(os.environ.get("TORCHGRAFT_FUZZ_EXAMPLES", "30")), deadline=5000, derandomize=os.environ.get("TORCHGRAFT_FUZZ_EXAMPLES") is None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def tiny_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4, 2))


@pytest.fixture(scope="module")
def real_files(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of real files torch, safetensors and TorchScript write for a tiny model."""
    folder = tmp_path_factory.mktemp("real")
    module = tiny_module()
    state = module.state_dict()
    torch.save(state, folder / "zip.pt")
    torch.save(state, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    torch.jit.script(module.eval()).save(str(folder / "script.pt"))
    return {name: (folder / name).read_bytes() for name in ("zip.pt", "legacy.pth", "model.safetensors",
                                                             "script.pt")}


def outcome(path: Path) -> str:
    """Load `path` and read every tensor: "ok", or "error" for a GraftError. Anything else propagates."""
    try:
        source = load(path, verify_hash=False)
        for key in source.info:
            tensor = source[key]
            check_tensor(key, tensor)
            assert tuple(tensor.shape) == source.info[key].shape
        return "ok"
    except GraftError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), str(exc)
        return "error"


def write(folder: str, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(data)
    return path


# A mutation: ("flip", position, bit) | ("set", position, byte) | ("cut", position) | ("insert", position, bytes)
# | ("delete", position, length); positions are fractions of the file's length so every region gets hit.
_fraction = st.floats(0, 1, allow_nan=False)
mutation = st.one_of(
    st.tuples(st.just("flip"), _fraction, st.integers(0, 7)),
    st.tuples(st.just("set"), _fraction, st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01, ord("{"), ord("]")])),
    st.tuples(st.just("cut"), _fraction),
    st.tuples(st.just("insert"), _fraction, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _fraction, st.integers(1, 64)),
)


def mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op in ops:
        if not out:
            break
        i = min(int(op[1] * len(out)), len(out) - 1)
        if op[0] == "flip":
            out[i] ^= 1 << op[2]
        elif op[0] == "set":
            out[i] = op[2]
        elif op[0] == "cut":
            del out[i:]
        elif op[0] == "insert":
            out[i:i] = op[2]
        else:
            del out[i:i + op[2]]
    return bytes(out)


@pytest.mark.parametrize("name", ["zip.pt", "legacy.pth", "model.safetensors", "script.pt"])
@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_real_files(real_files, name, ops):
    with tempfile.TemporaryDirectory() as folder:
        outcome(write(folder, name, mutate(real_files[name], ops)))


def _rezip(data: bytes, member_suffix: str, new: bytes) -> bytes:
    """A torch zip with one member's bytes replaced, written as torch writes it (stored, not compressed)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, new if info.filename.endswith(member_suffix) else src.read(info))
    return out.getvalue()


@pytest.mark.parametrize("name", ["zip.pt", "script.pt"])
@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_pickle_inside_a_valid_zip(real_files, name, ops):
    """The zip is intact (CRCs match), only data.pkl is damaged: the unpicklers themselves are fuzzed."""
    pkl = next(n for n in zipfile.ZipFile(io.BytesIO(real_files[name])).namelist() if n.endswith("/data.pkl"))
    data = zipfile.ZipFile(io.BytesIO(real_files[name])).read(pkl)
    with tempfile.TemporaryDirectory() as folder:
        outcome(write(folder, name, _rezip(real_files[name], "/data.pkl", mutate(data, ops))))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
absurd_ints = st.sampled_from([-1, 0, 1, 2**31, 2**32 + 1, 2**53, 2**63 - 1, 2**64, 10**30])


def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(header_bytes: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header_bytes)) + header_bytes + body


@FUZZ
@given(data=st.data())
def test_safetensors_header_json(real_files, data):
    header, body = _header(real_files["model.safetensors"])
    keys = sorted(header)
    key = data.draw(st.sampled_from(keys))
    kind = data.draw(st.sampled_from(["value", "field", "shape", "offsets", "dtype", "drop_field", "extra"]))
    if kind == "value":
        header[key] = data.draw(json_values)
    elif kind == "field" and isinstance(header[key], dict):
        header[key][data.draw(st.sampled_from(["shape", "dtype", "data_offsets"]))] = data.draw(json_values)
    elif kind == "shape" and key != "__metadata__":
        header[key]["shape"] = data.draw(st.lists(absurd_ints | st.integers(-3, 10), max_size=5))
    elif kind == "offsets" and key != "__metadata__":
        header[key]["data_offsets"] = data.draw(st.lists(absurd_ints | st.integers(-3, 4096), max_size=3))
    elif kind == "dtype" and key != "__metadata__":
        header[key]["dtype"] = data.draw(st.sampled_from(["F32", "F64", "BOOL", "I8", "X", "", "F8_E4M3", "U64"]))
    elif kind == "drop_field" and isinstance(header[key], dict) and header[key]:
        header[key].pop(data.draw(st.sampled_from(sorted(header[key]))))
    else:
        header[data.draw(st.text(max_size=8))] = data.draw(json_values)
    raw = json.dumps(header, allow_nan=True).encode()
    with tempfile.TemporaryDirectory() as folder:
        outcome(write(folder, "model.safetensors", _with_header(raw, body)))


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
    b'{"w": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}',
    b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
    b'{"w": {"dtype": "F32", "shape": [true], "data_offsets": [false, true]}}',
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": 5}',
    b'{"__metadata__": {"a": {"b": 1}}}',
    b"{}",
    b"\xff\xfe{}",
], ids=["nested-lists", "nested-objects", "5000-digit-int", "huge-float", "nan", "bools", "duplicate", "meta",
        "empty", "bom"])
def test_hostile_safetensors_headers(tmp_path, raw):
    outcome(write(str(tmp_path), "model.safetensors", _with_header(raw, b"\0" * 8)))


@FUZZ
@given(data=st.data())
def test_index_files(real_files, data):
    header, _ = _header(real_files["model.safetensors"])
    names = [k for k in header if k != "__metadata__"]
    index = {"metadata": {"total_size": 1}, "weight_map": {k: "model.safetensors" for k in names}}
    kind = data.draw(st.sampled_from(["map_value", "map", "whole", "shard_name", "bytes"]))
    if kind == "map_value":
        index["weight_map"][data.draw(st.sampled_from(names))] = data.draw(json_values)
    elif kind == "map":
        index["weight_map"] = data.draw(json_values)
    elif kind == "whole":
        index = data.draw(json_values)
    elif kind == "shard_name":
        index["weight_map"][names[0]] = data.draw(st.sampled_from(
            ["../model.safetensors", "/etc/passwd", "missing.safetensors", "", ".", "model.safetensors/x",
             "zip.pt", "legacy.pth", "script.pt", "model.index.json"]))
    raw = json.dumps(index).encode()
    if kind == "bytes":
        raw = mutate(raw, data.draw(st.lists(mutation, min_size=1, max_size=3)))
    with tempfile.TemporaryDirectory() as folder:
        for name, content in real_files.items():
            write(folder, name, content)
        outcome(write(folder, "model.index.json", raw))


def _deep_pickle(n: int, kind: str) -> bytes:
    if kind == "list":
        body = b"]" * n + b"a" * (n - 1)
    elif kind == "dict":
        body = b"}" + b"K\x01}" * (n - 1) + b"s" * (n - 1)
    else:  # nn.Module placeholders nested n deep through _modules
        g = b"ctorch.nn.modules.container\nSequential\n)\x81"
        body = (g + b"}U\x08_modules}U\x010") * n + g + b"ssb" * n
    return b"\x80\x02" + body + b"."


@pytest.mark.parametrize("kind", ["list", "dict", "modules"])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_deeply_nested_pickles(tmp_path, real_files, kind, fmt):
    """100,000 nested containers (or modules) give a GraftError, never a RecursionError or a crash."""
    deep = _deep_pickle(100_000, kind)
    if fmt == "zip":
        data = _rezip(real_files["zip.pt"], "/data.pkl", deep)
    else:
        # legacy layout: magic number, protocol, sys info, then the object, then storage keys and storages
        head = (b"\x80\x02\x8a\x0alp\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.\x80\x02}q\x00(X\x10\x00\x00\x00"
                b"protocol_versionq\x01M\xe9\x03X\r\x00\x00\x00little_endianq\x02\x88X\n\x00\x00\x00type_sizes"
                b"q\x03}q\x04(X\x05\x00\x00\x00shortq\x05K\x02X\x03\x00\x00\x00intq\x06K\x04X\x04\x00\x00\x00"
                b"longq\x07K\x04uu.")
        data = head + deep + b"\x80\x02].\x00"
    assert outcome(write(str(tmp_path), f"deep.{'pt' if fmt == 'zip' else 'pth'}", data)) == "error"


def test_deep_container_beside_the_weights_still_loads(tmp_path):
    """{"state_dict": {"w": ...}, "x": [[[... 100,000 deep]]]}: the weights load, the entry is only summarised."""
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": "MARKER"}, plain)
    data = plain.read_bytes()
    pkl = next(n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith("/data.pkl"))
    body = zipfile.ZipFile(io.BytesIO(data)).read(pkl)
    marker = b"X\x06\x00\x00\x00MARKER"
    assert body.count(marker) == 1
    n = 100_000
    deep = _rezip(data, "/data.pkl", body.replace(marker, b"]" * n + b"a" * (n - 1)))
    path = write(str(tmp_path), "ckpt.pt", deep)
    assert outcome(path) == "ok"
    assert load(path).metadata["checkpoint"]["x"] == "<list of 1>"


def _corpus_cases() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.name != "README.md") if CORPUS.is_dir() else []


@pytest.mark.parametrize("case", _corpus_cases(), ids=lambda p: p.name)
def test_corpus_regressions(tmp_path, case):
    """Inputs that once crashed a reader (gzipped when large): each now ends in a GraftError."""
    name = case.name.removesuffix(".gz")
    data = gzip.decompress(case.read_bytes()) if case.name.endswith(".gz") else case.read_bytes()
    if name.endswith(".json"):  # a safetensors header: give it an 8-byte length and a little data
        path = write(str(tmp_path), name.removesuffix(".json"), _with_header(data, b"\0" * 8))
    else:
        path = write(str(tmp_path), name, data)
    assert outcome(path) == "error"
