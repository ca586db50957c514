"""The streaming safetensors writer: byte-compatible with safetensors, atomic, tensor by tensor, file to file."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import torchgraft
from torchgraft.errors import GraftError
from torchgraft.io.write import save_safetensors




def mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(5, 7, generator=g),
        "w.bf16": torch.randn(3, 9, generator=g).bfloat16(),
        "w.f16": torch.randn(11, generator=g).half(),
        "w.f64": torch.randn(2, 2, generator=g).double(),
        "ids": torch.arange(13),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "transposed": torch.randn(4, 6, generator=g).t(),  # non-contiguous
        "every_other": torch.arange(20, dtype=torch.int32)[::2],  # non-contiguous, int32
    }


def test_round_trip_of_every_kind_of_tensor(tmp_path):
    tensors = mixed()
    path = tmp_path / "m.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt"})
    loaded = safetensors.torch.load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        assert torch.equal(loaded[name], value), name
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


def test_bytes_equal_what_safetensors_writes(tmp_path):
    tensors = mixed()
    path = tmp_path / "m.safetensors"
    save_safetensors(tensors, path)
    reference = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
    assert path.read_bytes() == reference
    # with metadata the header differs only in the order safetensors gives the keys (a hash map), so compare
    # what a reader sees
    save_safetensors(tensors, path, metadata={"b": "2", "a": "1"})
    theirs = tmp_path / "theirs.safetensors"
    theirs.write_bytes(safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()},
                                              metadata={"b": "2", "a": "1"}))
    assert path.stat().st_size == theirs.stat().st_size
    ours, reference = safetensors.torch.load_file(path), safetensors.torch.load_file(theirs)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_tied_tensors_are_each_written(tmp_path):
    weight = torch.randn(4, 3)
    save_safetensors({"emb.weight": weight, "head.weight": weight, "half": weight[:2]}, tmp_path / "t.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "t.safetensors")
    assert torch.equal(loaded["emb.weight"], weight) and torch.equal(loaded["head.weight"], weight)
    assert torch.equal(loaded["half"], weight[:2])


def test_progress_reaches_the_total(tmp_path):
    tensors = mixed()
    calls: list[tuple[int, int]] = []
    save_safetensors(tensors, tmp_path / "p.safetensors", progress=lambda done, total: calls.append((done, total)))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    save_safetensors({"e": torch.zeros(0)}, tmp_path / "e.safetensors", progress=lambda *a: calls.append(a))
    assert calls == [(0, 0)]


def test_unsupported_tensors_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(GraftError, match=r"bad\.safetensors: tensor 'z' has dtype torch\.complex64, which "
                                         r"safetensors cannot store; .* Nothing was written\."):
        save_safetensors({"a": torch.zeros(2), "z": torch.zeros(2, dtype=torch.complex64)}, path)
    with pytest.raises(GraftError, match=r"tensor name '__metadata__' cannot be saved"):
        save_safetensors({"__metadata__": torch.zeros(2)}, path)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.safetensors"
    save_safetensors({"a": torch.ones(3)}, path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")
        yield 0  # a generator, like the real one

    monkeypatch.setattr("torchgraft.io.write._write_tensor", broken)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.safetensors"]


# ---- tensors that are views of a memory-mapped checkpoint ----------------------------------------------------


@pytest.fixture
def mapped(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {"big": torch.randn(300, 1000, generator=g), "small": torch.randn(7, generator=g),
             "half": torch.randn(64, 64, generator=g).half()}
    safetensors.torch.save_file(state, tmp_path / "src.safetensors")
    return state, torchgraft.load(tmp_path / "src.safetensors")


@pytest.mark.pagemap
def test_views_of_a_checkpoint_are_copied_file_to_file(tmp_path, mapped, monkeypatch):
    state, source = mapped
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real(*a))
    save_safetensors(source.state_dict(), tmp_path / "out.safetensors", release_pages=True)
    loaded = safetensors.torch.load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert sum(calls) == sum(v.numel() * v.element_size() for v in state.values())
    # the source's tensors still read the same after their pages were handed back
    assert all(torch.equal(source[k], state[k]) for k in state)


def test_views_changed_in_place_are_written_as_changed(tmp_path, mapped):
    state, source = mapped
    tensors = source.state_dict()
    tensors["big"][0, :10] = 7.0  # a private copy of that page: the file keeps its values
    save_safetensors(tensors, tmp_path / "out.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "out.safetensors")
    assert torch.equal(loaded["big"][0, :10], torch.full((10,), 7.0))
    assert torch.equal(loaded["big"][1:], state["big"][1:]) and torch.equal(loaded["small"], state["small"])
    assert torch.equal(safetensors.torch.load_file(tmp_path / "src.safetensors")["big"], state["big"])


def test_writing_without_copy_file_range(tmp_path, mapped, monkeypatch):
    state, source = mapped

    def unsupported(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    save_safetensors(source.state_dict(), tmp_path / "out.safetensors", release_pages=True)
    loaded = safetensors.torch.load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    """Like open(): 0666 less the umask, not mkstemp's private 0600."""
    import os

    from torchgraft.io.write import atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "out.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
