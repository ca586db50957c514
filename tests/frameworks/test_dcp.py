"""torch.distributed.checkpoint folders: a real 2-process gloo run saves a ResNet sharded across its ranks (each
weight split in two DTensor shards, each rank writing its own .distcp file); one process without a process group
reads the folder, through the CLI too."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision

import torchgraft as tg
from torchgraft.errors import CheckpointError, UnsafePickleError

SAVE = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torchvision
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():  # real-looking statistics, so a swapped buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1); m.running_var.uniform_(0.5, 2)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    state = {k: distribute_tensor(v, mesh, [Shard(0)]) if v.is_floating_point() and v.dim() and v.shape[0] % 2 == 0
             else v for k, v in model.state_dict().items()}
    dcp.save({"model": state, "step": 7}, checkpoint_id=sys.argv[1])
    if dist.get_rank() == 0:
        torch.save(model.state_dict(), sys.argv[2])
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("dcp")
    (root / "save.py").write_text(SAVE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(root / "save.py"), str(root / "ckpt"), str(root / "reference.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "ckpt", torch.load(root / "reference.pt", weights_only=True)


def test_a_sharded_folder_reads_whole_in_one_process(saved):
    folder, reference = saved
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    source = tg.load(folder)
    assert source.format == "dcp" and source.wrapper == "model"
    assert source.keys() == list(reference)
    for key, value in reference.items():
        assert torch.equal(source[key], value), key
    assert source.metadata["not_tensors"] == ["step"]


def test_transfer_from_the_folder(saved, tmp_path):
    folder, reference = saved
    model = torchvision.models.resnet18(num_classes=10)
    report = tg.transfer(folder, model, strict=True)
    assert report.counts()["loaded"] == len(reference)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    graft = [sys.executable, "-m", "torchgraft.cli"]
    out = tmp_path / "resnet.safetensors"
    done = subprocess.run([*graft, "transfer", str(folder), "--model", "torchvision:resnet18", "--model-kwargs",
                           '{"num_classes": 10}', "--out", str(out), "--strict"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert torch.equal(tg.load(out)["layer4.1.bn2.running_var"], reference["layer4.1.bn2.running_var"])
    shown = subprocess.run([*graft, "inspect", str(folder)], capture_output=True, text=True)
    assert shown.returncode == 0 and "format dcp" in shown.stdout and "wrapper model" in shown.stdout


def test_a_missing_shard_file_is_one_error(saved, tmp_path):
    folder, _ = saved
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for f in folder.iterdir():
        if f.name != "__1_0.distcp":
            (copy / f.name).write_bytes(f.read_bytes())
    source = tg.load(copy)  # the metadata reads; a tensor with a chunk in the missing file does not
    with pytest.raises(CheckpointError, match="cannot read conv1.weight|cannot read model.conv1.weight"):
        source["conv1.weight"]
    done = subprocess.run([sys.executable, "-m", "torchgraft.cli", "transfer", str(copy), "--model",
                           "torchvision:resnet18", "--out", str(tmp_path / "o.safetensors")], capture_output=True,
                          text=True)
    assert done.returncode == 1 and done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/torchgraft-dcp-pwned",))


def test_a_hostile_metadata_pickle_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": _Hostile()}))
    with pytest.raises(UnsafePickleError, match="system"):
        tg.load(folder)
    assert not Path("/tmp/torchgraft-dcp-pwned").exists()
