"""A NaN in the weights stops the linear probe before anything is trained or saved."""

from __future__ import annotations

import pytest
import torch

from torchgraft.errors import GraftError
from torchgraft.train.config import FinetuneConfig
from torchgraft.train.digits import write_digits
from torchgraft.train.loop import finetune


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
