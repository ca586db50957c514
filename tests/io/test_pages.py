"""Memory-mapped checkpoints: safetensors tensors are views of a private map; pages are handed back on request."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch
import torch
from torch import nn

import torchgraft
from torchgraft.io.pages import PAGE, FileMaps
from torchgraft.numeric import scan
from torchgraft.match.plan import plan
from torchgraft.transfer import apply






def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def test_safetensors_tensors_are_views_of_one_private_map(tmp_path):
    state = {"a": torch.randn(64, 64), "b": torch.arange(10), "c": torch.randn(3).bfloat16()}
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, path)
    source = torchgraft.load(path)
    a = source["a"]
    assert source["a"].data_ptr() == a.data_ptr()  # the same bytes each time: nothing was copied
    assert source["b"].data_ptr() - a.data_ptr() == _offset(path, "b") - _offset(path, "a")  # one map
    assert all(torch.equal(source[k], v) and source[k].dtype == v.dtype for k, v in state.items())
    before = path.read_bytes()
    a.add_(1)  # copy-on-write: the file never changes
    assert path.read_bytes() == before
    assert torch.equal(safetensors.torch.load_file(path)["a"], state["a"])


def _offset(path, key: str) -> int:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])[key]["data_offsets"][0]


def test_shards_each_have_their_own_map(tmp_path):
    parts = [{"x.weight": torch.randn(8, 8)}, {"y.weight": torch.randn(8, 8), "y.bias": torch.randn(8)}]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        safetensors.torch.save_file(part, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = torchgraft.load(tmp_path)
    for part in parts:
        for k, v in part.items():
            assert torch.equal(source[k], v)
    with FileMaps() as maps:
        if maps:
            spans = {k: maps.span(source[k]) for k in weight_map}
            assert all(spans.values())
            assert maps.file_range(spans["y.bias"])[1] == 8 + int.from_bytes(
                (tmp_path / weight_map["y.bias"]).read_bytes()[:8], "little") + _offset(
                tmp_path / weight_map["y.bias"], "y.bias")


def test_misaligned_data_is_copied_and_read_right(tmp_path):
    """A hand-made file whose float32 data starts 2 bytes into the data section (safetensors never writes this)."""
    values = [1.5, -2.0, 3.25]
    header = json.dumps({"pad": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                         "w": {"dtype": "F32", "shape": [3], "data_offsets": [2, 14]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\1\2" + struct.pack("<3f", *values))
    source = torchgraft.load(path)
    assert torch.equal(source["w"], torch.tensor(values)) and source["w"].data_ptr() % 4 == 0
    assert torch.equal(source["pad"], torch.tensor([1, 2], dtype=torch.uint8))


@pytest.mark.pagemap
def test_released_pages_leave_memory_and_read_back_from_the_file(tmp_path):
    value = torch.randn(64 << 20 >> 2)  # 64 MiB
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file({"v": value}, path)
    source = torchgraft.load(path)
    mapped = source["v"]
    base = _rss()
    assert float(mapped.sum()) == pytest.approx(float(value.sum()), rel=1e-4)  # touch every page
    assert _rss() - base > 48 << 20
    touched = _rss()
    with FileMaps() as maps:
        released = maps.release(mapped)
    assert released > 60 << 20
    assert touched - _rss() > 48 << 20
    assert torch.equal(mapped, value)  # read again from the file


@pytest.mark.pagemap
def test_file_range_only_for_bytes_that_still_equal_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(4 * PAGE), "b": torch.zeros(4 * PAGE)}, path)
    source = torchgraft.load(path)
    a, b = source["a"], source["b"]
    float(a.sum())  # read: still the file's pages
    b[PAGE] = 1.0  # written: a private copy of one page
    with FileMaps() as maps:
        assert maps.file_range(maps.span(a)) is not None
        assert maps.file_range(maps.span(b)) is None
        assert maps.span(torch.zeros(10)) is None  # ordinary memory is never touched
        # releasing a changed page drops the change: that is why releasing is opt-in
        maps.release(b)
    assert float(b.sum()) == 0.0


@pytest.mark.pagemap
def test_torch_zip_files_are_mapped_privately_too(tmp_path):
    state = {"w": torch.randn(256, 256)}
    torch.save(state, tmp_path / "w.pth")
    source = torchgraft.load(tmp_path / "w.pth")
    with FileMaps() as maps:
        span = maps.span(source["w"])
        assert span is not None
        fd, offset = maps.file_range(span)
        assert os.pread(fd, 16, offset) == state["w"].numpy().tobytes()[:16]


def test_nothing_is_found_or_released_without_madvise(monkeypatch):  # as outside Linux
    monkeypatch.setattr("torchgraft.io.pages._madvise", lambda: None)
    maps = FileMaps()
    assert not maps and maps.span(torch.zeros(3)) is None and maps.release(torch.zeros(3)) == 0


@pytest.mark.pagemap
def test_a_numeric_scan_hands_back_what_it_read(tmp_path):
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file({"a": torch.randn(32 << 20 >> 2), "b": torch.randn(32 << 20 >> 2)}, path)
    source = torchgraft.load(path)
    base = _rss()
    assert scan(source.tensors, release_pages=True) == []
    assert _rss() - base < 16 << 20  # about one tensor at most, not the file
    assert scan(source.tensors) == []  # without release_pages the pages stay
    assert _rss() - base > 48 << 20


@pytest.mark.pagemap
def test_apply_into_a_meta_model_keeps_about_one_tensor_resident(tmp_path):
    layers = [nn.Linear(1024, 1024, bias=False) for _ in range(4)]  # 4 MiB each
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(nn.Sequential(*layers).state_dict(), path)
    source = torchgraft.load(path)
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(4)], nn.Linear(1024, 10))
    decided = plan(source, model)
    base = _rss()
    report = apply(decided, source, model, release_pages=True)
    assert _rss() - base < 6 << 20  # the new head and about one tensor; the 16 MiB of weights were read
    assert all(torch.equal(model[i].weight, layers[i].weight) for i in range(4))  # read again from the file
    assert report.numeric == [] and not model[4].weight.is_meta
