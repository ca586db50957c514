"""A NaN in the weights stops the linear probe before anything is trained or saved; on the CPU a step runs in
smaller passes with the gradients of one."""

from __future__ import annotations

import pytest
import torch

from torchgraft.errors import GraftError
from torchgraft.freeze import freeze, unfreeze
from torchgraft.train.config import FinetuneConfig
from torchgraft.train.data import CPU_PIXELS_PER_PASS, decode_images, find_splits, pass_size
from torchgraft.train.digits import write_digits
from torchgraft.train.loop import _batch_dependent, _gradients, _NoCast, finetune


def test_nan_weights_stop_the_linear_probe_before_anything_is_saved(tmp_path, mobilenet_v2_path):
    """A NaN in the backbone makes every feature NaN: the probe refuses to fit, before any checkpoint or model is
    written."""
    digits = write_digits(tmp_path / "digits", size=32, train_per_class=4, val_per_class=2)
    state = torch.load(mobilenet_v2_path, map_location="cpu", weights_only=True)
    state["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save(state, weights)
    out = tmp_path / "run"
    config = FinetuneConfig(model="torchvision:mobilenet_v2", weights=str(weights), data=str(digits), out=str(out),
                            image_size=32, batch_size=16, workers=0, epochs=1, linear_probe=True)
    with pytest.raises(GraftError, match=r"the backbone's features hold NaN or infinite values, so no classifier can "
                       r"be fitted on them; expected finite features\. Check the weights"):
        finetune(config)
    assert not (out / "last.ckpt").exists() and not (out / "model.safetensors").exists()


# ---- a step in smaller passes on the CPU -------------------------------------------------------------------


def test_the_cpus_pass_size_keeps_a_pass_within_its_pixels():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [pass_size(cpu, s, 32) for s in (32, 64, 128, 224, 1024)] == [32, 32, 16, 4, 1]
    assert pass_size(cpu, 64, 20) == 20 and pass_size(cpu, 224, 3) == 3 and pass_size(cpu, 64, 0) == 1
    assert pass_size(cuda, 224, 32) == 32
    for size in range(8, 600, 7):
        n = pass_size(cpu, size, 10_000)
        assert n & (n - 1) == 0  # a power of two
        assert n == 1 or n * size * size <= CPU_PIXELS_PER_PASS < 2 * n * size * size


def _probed_mobilenet(weights) -> torch.nn.Module:
    """torchvision's real MobileNetV2 as after a probe: a new 10-class head, BatchNorm held in eval, no dropout."""
    import torchvision

    model = torchvision.models.mobilenet_v2(dropout=0.0)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    torch.manual_seed(0)  # the same new head each time
    model.classifier[1] = torch.nn.Linear(1280, 10)
    freeze(model, types=torch.nn.modules.batchnorm._BatchNorm)
    model.train()
    return model


def _real_batch(tmp_path, n: int = 12, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    data = write_digits(tmp_path / "digits", size=size, train_per_class=2, val_per_class=1)
    images = decode_images(find_splits(data, None, 0).train, size, 1 << 30)
    return (images.pixels[:n].float() / 255 - 0.45) / 0.25, images.labels[:n]


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_a_step_in_smaller_passes_has_the_gradients_of_one_pass(tmp_path, mobilenet_v2_path):
    """Real digit scans through the real MobileNetV2 with BatchNorm held (as after a probe): the mean loss over
    12 images in passes of 5, 5 and 2 has the loss, logits and gradients of one pass over all 12, label
    smoothing included. With BatchNorm training, a pass depends on the batch, and the loop keeps one pass."""
    model = _probed_mobilenet(mobilenet_v2_path)
    assert not _batch_dependent(model)
    x, y = _real_batch(tmp_path)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    results = {}
    for passes in (12, 5):
        model.zero_grad(set_to_none=True)
        logits, loss = _gradients(model, loss_fn, None, _NoCast(), x, y, passes)
        results[passes] = logits, loss, _grads(model)
    (logits1, loss1, grads1), (logits5, loss5, grads5) = results[12], results[5]
    assert logits1.shape == logits5.shape == (12, 10)
    assert torch.allclose(logits1, logits5, atol=1e-4)
    assert float(loss5) == pytest.approx(float(loss1), rel=1e-5)
    assert grads1.keys() == grads5.keys() and "classifier.1.weight" in grads1 and "features.1.conv.0.0.weight" in grads1
    for name in grads1:
        scale = grads1[name].abs().max().item()
        assert torch.allclose(grads5[name], grads1[name], atol=1e-4 * max(scale, 1e-6)), name
    unfreeze(model)
    model.train()
    assert _batch_dependent(model)


def test_passes_under_ddp_average_the_gradients_once(tmp_path, mobilenet_v2_path):
    """One gloo process under DistributedDataParallel: passes of 4 (all but the last without synchronising) give
    the gradients of one pass over the 12 images."""
    import torch.distributed as dist

    x, y = _real_batch(tmp_path)
    loss_fn = torch.nn.CrossEntropyLoss()
    plain = _probed_mobilenet(mobilenet_v2_path)
    _gradients(plain, loss_fn, None, _NoCast(), x, y, 12)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _probed_mobilenet(mobilenet_v2_path)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        _gradients(wrapped, loss_fn, None, _NoCast(), x, y, 4)
    finally:
        dist.destroy_process_group()
    expected, got = _grads(plain), _grads(model)
    assert expected.keys() == got.keys()
    for name in expected:
        scale = expected[name].abs().max().item()
        assert torch.allclose(got[name], expected[name], atol=1e-4 * max(scale, 1e-6)), name
