"""`torchgraft.load` never runs code from a file, and bad input is always one `GraftError` naming the path.

Hostile pickles carry real payloads (each one is shown to fire under plain `pickle.loads`); the test then checks
that loading the file refuses the call, names the global, and that the payload's side effect never happened.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pathlib
import pickle
import pickletools
import random
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

import torchgraft
from torchgraft import CheckpointError, GraftError, UnsafePickleError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)).state_dict()


# ---- payloads: each pickles as a call that would leave `marker` behind ------------------------------------


class SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class PopenCall(SystemCall):
    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


class EvalCall(SystemCall):
    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


class ExecCall(SystemCall):
    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _GetAttr:
    """Pickles as `getattr(target, name)`; an outer payload then calls the result."""

    def __init__(self, target, name: str) -> None:
        self.target, self.name = target, name

    def __call__(self, *args):  # pickle only checks that a reduce function is callable
        raise AssertionError("never called while pickling")

    def __reduce__(self):
        return (getattr, (self.target, self.name))


class _ImportOs:
    def __reduce__(self):
        return (builtins.__import__, ("os",))


class GetattrMethodCall(SystemCall):
    """getattr(pathlib.PosixPath, "touch")(PosixPath(marker))"""

    def __reduce__(self):
        return (_GetAttr(pathlib.PosixPath, "touch"), (pathlib.PosixPath(self.marker),))


class GetattrImportCall(SystemCall):
    """getattr(__import__("os"), "system")("touch marker")"""

    def __reduce__(self):
        return (_GetAttr(_ImportOs(), "system"), (f"touch {self.marker}",))


PAYLOADS = {
    "os.system": (SystemCall, "posix.system"),  # os.system pickles under its real module, posix
    "subprocess.Popen": (PopenCall, "subprocess.Popen"),
    "eval": (EvalCall, "builtins.eval"),
    "exec": (ExecCall, "builtins.exec"),
    "getattr(PosixPath).touch": (GetattrMethodCall, "builtins.getattr"),
    "getattr(__import__(os)).system": (GetattrImportCall, "builtins.__import__"),
}


def _fired(marker: Path, result=None) -> bool:
    if isinstance(result, subprocess.Popen):
        result.wait(timeout=30)
    return marker.exists()


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_payloads_are_live(tmp_path, payload):
    """Control: plain pickle runs every payload, so the refusals below are refusals of working exploits."""
    marker = tmp_path / "pwned"
    result = pickle.loads(pickle.dumps(PAYLOADS[payload][0](marker), protocol=2))
    assert _fired(marker, result)


def _carry(kind: str, payload, path: Path) -> None:
    state = tiny_state()
    if kind == "torch-zip":
        torch.save({"state_dict": state, "extra": payload}, path)
    elif kind == "torch-legacy":
        torch.save({"state_dict": state, "extra": payload}, path, _use_new_zipfile_serialization=False)
    elif kind == "plain-pickle":
        with open(path, "wb") as f:
            pickle.dump({"epoch": 1, "extra": payload}, f)
    elif kind == "nested-list-dict":
        torch.save({"state_dict": state, "history": [{"epoch": 1}, {"epoch": 2, "callback": payload}]}, path)
    elif kind == "whole-model":
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
        model[1].hook = payload
        torch.save(model, path, _use_new_zipfile_serialization=False)
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize("carrier", ["torch-zip", "torch-legacy", "plain-pickle", "nested-list-dict", "whole-model"])
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_hostile_pickle_is_refused(tmp_path, payload, carrier):
    make, global_name = PAYLOADS[payload]
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _carry(carrier, make(marker), path)
    assert not marker.exists()

    with pytest.raises(UnsafePickleError, match=re.escape(f"{path}: the pickle asks to call `{global_name}`")) as exc:
        torchgraft.load(path)
    assert exc.value.global_name == global_name
    assert "nothing was run" in str(exc.value)
    assert not _fired(marker)


@pytest.mark.parametrize("slot", ["magic number", "protocol", "system info", "object", "storage keys"])
def test_payload_in_every_pickle_of_a_legacy_file(tmp_path, slot):
    """A legacy file is five pickles in a row; a payload in any of them is refused."""
    marker = tmp_path / "pwned"
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [0x1950A86A20F9469CFC6C, 1001, sys_info, {"epoch": 1}, []]
    slots = ["magic number", "protocol", "system info", "object", "storage keys"]
    parts[slots.index(slot)] = SystemCall(marker)
    path = tmp_path / "evil-legacy.pth"
    path.write_bytes(b"".join(pickle.dumps(part, protocol=2) for part in parts))
    with pytest.raises(UnsafePickleError, match=r"evil-legacy\.pth: the pickle asks to call `posix\.system`") as exc:
        torchgraft.load(path)
    assert exc.value.global_name == "posix.system"
    assert not marker.exists()


def test_plainly_pickled_tensors_are_not_unpacked(tmp_path):
    """pickle.dump of tensors routes them through torch.storage._load_from_bytes, itself a full torch.load."""
    marker = tmp_path / "pwned"
    path = tmp_path / "plain.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.zeros(2), "extra": SystemCall(marker)}, f)
    with pytest.raises(UnsafePickleError, match=r"plain\.pth: the pickle asks to call `torch\.storage\._load_from_bytes`"):
        torchgraft.load(path)
    assert not marker.exists()


def test_harmless_builtins_in_a_protocol_2_checkpoint_are_data(tmp_path):
    """torch.save writes protocol 2, which names builtins `__builtin__.*`: frozenset/slice/complex are still data."""
    path = tmp_path / "ckpt.pth"
    config = {"classes": frozenset({"cat", "dog"}), "crop": slice(0, 224), "phase": complex(1, 2)}
    for legacy in (False, True):
        torch.save({"state_dict": tiny_state(), "config": config, "tags": {"a", "b"}}, path,
                   _use_new_zipfile_serialization=not legacy)
        source = torchgraft.load(path)
        assert source.keys() == list(tiny_state())
        assert source.metadata["checkpoint"] == {"config": "<dict of 3>", "tags": "<set>"}


# ---- objects whose class would run code on being rebuilt ---------------------------------------------------

_TRICKS = '''
class Trick:
    """Runs code when unpickled, through __setstate__ (BUILD), not through a call."""

    def __init__(self, marker):
        self.marker = marker

    def __setstate__(self, state):
        open(state["marker"], "w").close()
        self.__dict__.update(state)


class TrickDict(dict):
    def __setitem__(self, key, value):
        if key == "marker":
            open(value, "w").close()
        super().__setitem__(key, value)


class TrickList(list):
    def append(self, value):
        open(value, "w").close()
        super().append(value)

    def extend(self, values):
        for value in values:
            self.append(value)
'''


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("importable", [False, True], ids=["class-gone", "class-importable"])
def test_setstate_and_container_tricks_load_as_inert_placeholders(tmp_path, throwaway, legacy, importable):
    tricks_module = throwaway.load("tg_tricks", _TRICKS)
    name = tricks_module.__name__
    marker = tmp_path / "pwned"
    trick_dict = tricks_module.TrickDict()
    dict.__setitem__(trick_dict, "marker", str(marker))
    trick_list = tricks_module.TrickList()
    list.append(trick_list, str(marker))
    path = tmp_path / "tricky.pth"
    torch.save({"state_dict": tiny_state(), "trick": tricks_module.Trick(str(marker)), "d": trick_dict,
                "l": trick_list}, path, _use_new_zipfile_serialization=not legacy)
    if not importable:
        throwaway.forget()

    source = torchgraft.load(path)
    assert not marker.exists()
    assert source.keys() == list(tiny_state())
    assert source.metadata["checkpoint"] == {"trick": f"<{name}.Trick>", "d": f"<{name}.TrickDict>",
                                             "l": f"<{name}.TrickList>"}
    if importable:  # control: an ordinary full unpickle does run the trick
        torch.load(path, weights_only=False)
        assert marker.exists()


# ---- bad input: always a GraftError that names the path ---------------------------------------------------


def _raises(path: Path, pattern: str, **kwargs) -> GraftError:
    """load(path) raises a CheckpointError naming the path, whose text (the folder above left out) matches."""
    with pytest.raises(GraftError) as exc:
        torchgraft.load(path, **kwargs)
    message = str(exc.value)
    assert str(path) in message
    assert isinstance(exc.value, CheckpointError)
    # pytest's folder names repeat the test's name ("...truncated..."): match only what the reader wrote
    shown = message.replace(str(path.parent), "<dir>")
    assert re.search(pattern, shown), f"{pattern!r} not in {shown!r}"
    return exc.value


def test_missing_empty_and_folders(tmp_path):
    _raises(tmp_path / "nope.pth", r"nope\.pth: no such file or folder")
    (tmp_path / "empty.pth").write_bytes(b"")
    _raises(tmp_path / "empty.pth", r"empty\.pth: the file is empty")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _raises(tmp_path / "empty.safetensors", r"the file is empty")
    (tmp_path / "bare").mkdir()
    _raises(tmp_path / "bare", r"bare: a folder without model\.safetensors .*\(found \[\]\)")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    _raises(tmp_path / "cfg", r"a folder without .*found \['config\.json'\]")


@pytest.fixture(scope="module")
def real_files(tmp_path_factory, mobilenet_v2_path) -> dict[str, Path]:
    """The real MobileNetV2 weights in all three formats: legacy (the torchvision file itself), zip, safetensors."""
    folder = tmp_path_factory.mktemp("real")
    state = torch.load(mobilenet_v2_path, map_location="cpu", weights_only=True)
    torch.save(state, folder / "mobilenet_v2.pth")
    safetensors.torch.save_file(state, folder / "mobilenet_v2.safetensors")
    return {"legacy": Path(mobilenet_v2_path), "zip": folder / "mobilenet_v2.pth",
            "safetensors": folder / "mobilenet_v2.safetensors"}


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_truncated_real_files(tmp_path, real_files, fmt):
    data = real_files[fmt].read_bytes()
    n = len(data)
    for cut in (10, 100, 5000, n // 3, n // 2, n - 1000, n - 1):
        path = tmp_path / f"cut{cut}{real_files[fmt].suffix}"
        path.write_bytes(data[:cut])
        _raises(path, r"truncated|corrupt")
    tiny = tmp_path / f"tiny{real_files[fmt].suffix}"
    tiny.write_bytes(data[:1])
    _raises(tiny, r".")


def test_random_bytes(tmp_path):
    rng = random.Random(1234)
    noise = bytes(rng.getrandbits(8) for _ in range(4096))
    cases = {
        "noise.pth": (noise, r"noise\.pth: unrecognised file format"),
        "noise.safetensors": (b"\x07" + noise, r"noise\.safetensors: safetensors header claims"),
        "zip-noise.pth": (b"PK\x03\x04" + noise, r"zip archive is corrupt or truncated"),
        "pickle-noise.pth": (b"\x80\x02" + noise, r"pickle-noise\.pth: "),
        "text.pt": (b"not a checkpoint\n" * 20, r"unrecognised file format \(starts with b'not a ch'\)"),
    }
    for name, (data, pattern) in cases.items():
        (tmp_path / name).write_bytes(data)
        _raises(tmp_path / name, pattern)


def _member_offset(data: bytes, member: zipfile.ZipInfo) -> int:
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    return member.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_bit_flips_in_zip_members(tmp_path, kind):
    path = tmp_path / "good.pt"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    if kind == "state_dict":
        torch.save(model.state_dict(), path)
    else:
        torch.jit.script(model).save(str(path))
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        members = [m for m in zf.infolist() if m.compress_size > 0]
    assert any(m.filename.endswith("data.pkl") for m in members)
    for member in members:  # every member, TorchScript code and constants included
        size = member.compress_size
        # zipfile stops reading a deflated member once it has its uncompressed size, so the stream's last bytes
        # (end-of-block code, padding) can change unseen; stored members are checked to their last byte
        stored = member.compress_type == zipfile.ZIP_STORED
        for where in (0, size // 4, size // 2, size - 1) if stored else (0, size // 4, size // 2):
            flipped = bytearray(data)
            flipped[_member_offset(data, member) + where] ^= 0x10
            bad = tmp_path / "flipped.pt"
            bad.write_bytes(bytes(flipped))
            _raises(bad, rf"flipped\.pt: (member {re.escape(member.filename)} fails its CRC check|the zip archive "
                         r"is corrupt)")


def _every_byte_flipped(tmp_path: Path, good: Path, step: int = 1) -> int:
    """Flip each byte in turn: the result either loads or raises a GraftError naming the path, nothing else."""
    data = good.read_bytes()
    bad = tmp_path / f"fuzz{good.suffix}"
    refused = 0
    for i in range(0, len(data), step):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        try:
            source = torchgraft.load(bad)
            for key in source.keys():
                source[key]
        except GraftError as exc:
            assert str(bad) in str(exc), (i, str(exc))
            refused += 1
    return refused


@pytest.mark.parametrize("fmt", ["legacy", "legacy-whole-model", "safetensors"])
def test_every_single_byte_corruption_is_a_graft_error(tmp_path, fmt):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    good = tmp_path / ("good.safetensors" if fmt == "safetensors" else "good.pth")
    if fmt == "safetensors":
        safetensors.torch.save_file(model.state_dict(), good)
    else:
        torch.save(model if fmt == "legacy-whole-model" else model.state_dict(), good,
                   _use_new_zipfile_serialization=False)
    step = 13 if fmt == "legacy-whole-model" else 1  # a module pickle is ~20 kB: every 13th byte (a prime) will do
    refused = _every_byte_flipped(tmp_path, good, step)
    assert refused > len(good.read_bytes()) // step // 3  # most flips in headers and pickles are caught


def test_legacy_storage_size_larger_than_the_file(tmp_path):
    """A corrupt element count must not make the reader allocate what the count claims."""
    path = tmp_path / "old.pth"
    torch.save(tiny_state(), path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    f = io.BytesIO(bytes(data))
    for _ in range(5):  # magic, protocol, system info, object, storage keys
        for _op in pickletools.genops(f):
            pass
    count_at = f.tell()
    count = struct.unpack("<q", data[count_at : count_at + 8])[0]
    assert count in {t.numel() for t in tiny_state().values()}  # the element count of the first storage
    data[count_at : count_at + 8] = struct.pack("<q", 1 << 36)  # 256 GiB of float32
    path.write_bytes(bytes(data))
    _raises(path, r"old\.pth: the file ends inside storage '\d+'; it is truncated")
    data[count_at : count_at + 8] = struct.pack("<q", -5)
    path.write_bytes(bytes(data))
    _raises(path, r"old\.pth: storage '\d+' claims -5 elements; the file is corrupt")


# ---- corrupt safetensors headers ---------------------------------------------------------------------------


def _safetensors(path: Path, header, data: bytes = b"\0" * 24, *, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

BAD_HEADERS = {
    "bad-json": (dict(header=b'{"w": {"dtype": "F32", '), r"header is not valid JSON"),
    "not-utf8": (dict(header=b'{"\xff\xfe": 1}'), r"header is not valid JSON"),
    "length-past-end": (dict(header={"w": _F32x2}, length=10**6), r"header claims 1000000 bytes but the file has"),
    "length-huge": (dict(header={"w": _F32x2}, length=2**63), r"header claims \d+ bytes"),
    "offsets-past-end": (dict(header={"w": {**_F32x2, "data_offsets": [0, 999]}}), r"'w' is malformed or points past"),
    "offsets-reversed": (dict(header={"w": {**_F32x2, "data_offsets": [8, 0]}}), r"'w' is malformed or points past"),
    "offsets-negative": (dict(header={"w": {**_F32x2, "data_offsets": [-8, 0]}}), r"'w' is malformed"),
    "shape-not-ints": (dict(header={"w": {**_F32x2, "shape": ["2"]}}), r"'w' is malformed"),
    "shape-negative": (dict(header={"w": {**_F32x2, "shape": [-2]}}), r"'w' is malformed"),
    "shape-vs-bytes": (dict(header={"w": {**_F32x2, "shape": [3, 3]}}), r"'w' has shape \[3, 3\] of float32 but 8 "
                                                                          r"bytes of data"),
    "unknown-dtype": (dict(header={"w": {**_F32x2, "dtype": "F99"}}), r"'w' has unknown dtype 'F99'"),
    "entry-not-object": (dict(header={"w": [1, 2]}), r"'w' is malformed"),
    "header-is-list": (dict(header=b"[1, 2, 3]"), r"header is a list, expected a JSON object"),
    "metadata-not-strings": (dict(header={"__metadata__": {"epoch": 3}, "w": _F32x2}), r"__metadata__ is"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_corrupt_safetensors_header(tmp_path, case):
    kwargs, pattern = BAD_HEADERS[case]
    path = _safetensors(tmp_path / "bad.safetensors", **kwargs)
    _raises(path, r"bad\.safetensors: .*" + pattern)


def test_valid_handmade_safetensors_header_loads(tmp_path):
    """The corrupt cases above differ from this one file in one field each."""
    data = struct.pack("<2f", 1.5, -2.0)
    path = _safetensors(tmp_path / "ok.safetensors", {"__metadata__": {"format": "pt"}, "w": _F32x2}, data)
    source = torchgraft.load(path)
    assert source.info["w"].shape == (2,) and torch.equal(source["w"], torch.tensor([1.5, -2.0]))


# ---- shard indexes, zips that are not torch files, pickles that are not weights ---------------------------


def test_bad_shard_indexes(tmp_path):
    state = tiny_state()
    safetensors.torch.save_file(state, tmp_path / "model-00001-of-00001.safetensors")
    index = tmp_path / "model.safetensors.index.json"

    index.write_text("{not json")
    _raises(index, r"model\.safetensors\.index\.json: not a shard index")
    index.write_text(json.dumps({"metadata": {}}))
    _raises(index, r"not a shard index; expected JSON with a \"weight_map\"")
    index.write_text(json.dumps({"weight_map": dict.fromkeys(state, "model-00002-of-00002.safetensors")}))
    _raises(index, r"shard 'model-00002-of-00002\.safetensors' is missing next to the index")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    shutil.copy(tmp_path / "model-00001-of-00001.safetensors", outside)
    try:
        index.write_text(json.dumps({"weight_map": dict.fromkeys(state, f"../{outside.name}")}))
        _raises(index, r"shard '\.\./.*' is missing next to the index")
    finally:
        outside.unlink()
    index.write_text(json.dumps({"weight_map": {**dict.fromkeys(state, "model-00001-of-00001.safetensors"),
                                                "extra.weight": "model-00001-of-00001.safetensors"}}))
    _raises(index, r"1 tensors in the index are in no shard \(first: extra\.weight\)")
    _raises(tmp_path, r"model\.safetensors\.index\.json: 1 tensors in the index")  # the same through the folder


@pytest.mark.parametrize("index, found", [
    ([1, 2], r"found a JSON list\."),
    ({"weight_map": ["model-00001-of-00001.safetensors"]}, r"found a \"weight_map\" that is a list\."),
    ({"weight_map": "model-00001-of-00001.safetensors"}, r"found a \"weight_map\" that is a string\."),
    ({"weight_map": None}, r"found a \"weight_map\" that is a null\."),
    ({"weight_map": {"0.weight": 7}}, r"found '0\.weight' -> a number where a shard file name belongs\."),
    ({"weight_map": {"0.weight": ["a.safetensors"]}}, r"found '0\.weight' -> a list where a shard file name"),
], ids=["list", "map-list", "map-string", "map-null", "shard-number", "shard-list"])
def test_shard_index_of_the_wrong_shape(tmp_path, index, found):
    safetensors.torch.save_file(tiny_state(), tmp_path / "model-00001-of-00001.safetensors")
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    error = _raises(path, r"not a shard index; expected JSON with a \"weight_map\" of tensor name -> shard file, "
                    + found)
    assert "Nothing was loaded; pass a shard file itself" in str(error)


def test_shard_index_checks_hold_under_python_O(tmp_path):
    """The checks are real checks, not asserts: `python -O` (which drops asserts) reports the same error."""
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["model-00001-of-00001.safetensors"]}))
    code = ("import sys, torchgraft\n"
            "try:\n    torchgraft.load(sys.argv[1])\n"
            "except torchgraft.CheckpointError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-O", "-c", code, str(index)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not a shard index" in proc.stdout and "that is a list" in proc.stdout, proc.stdout


def test_files_that_hold_no_weights(tmp_path):
    with zipfile.ZipFile(tmp_path / "archive.pth", "w") as zf:
        zf.writestr("readme.txt", "hello")
    _raises(tmp_path / "archive.pth", r"archive\.pth: a zip file without data\.pkl")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    _raises(tmp_path / "tensor.pth", r"tensor\.pth: the file holds a single tensor")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    _raises(tmp_path / "list.pth", r"list\.pth: the file holds a list, not weights")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    _raises(tmp_path / "meta.pth", r"meta\.pth: found a dict with keys \['epoch', 'lr'\] but no weights")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, tmp_path / "ckpt.pth")
    _raises(tmp_path / "ckpt.pth", r"ckpt\.pth: no entry 'ema'", key="ema")
    torch.save({"state_dict": {"lr": 0.1}, "w": {"x": 1}}, tmp_path / "nested.pth")
    _raises(tmp_path / "nested.pth", r"nested\.pth: the weights entry holds no tensors", key="w")
