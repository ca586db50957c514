"""The training loop is one loop for images and for a linear probe's cached features: the same checks apply."""

from __future__ import annotations

import pytest
import torch

from torchgraft.errors import GraftError
from torchgraft.train.config import FinetuneConfig
from torchgraft.train.digits import write_digits
from torchgraft.train.loop import finetune


def test_a_nan_loss_stops_a_linear_probe_on_cached_features(tmp_path, mobilenet_v2_path):
    """A NaN in the backbone makes every cached feature NaN: the probe stops in its first step, as training on
    images does, before any checkpoint or model is written."""
    digits = write_digits(tmp_path / "digits", size=32, train_per_class=4, val_per_class=2)
    state = torch.load(mobilenet_v2_path, map_location="cpu", weights_only=True)
    state["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save(state, weights)
    out = tmp_path / "run"
    config = FinetuneConfig(model="torchvision:mobilenet_v2", weights=str(weights), data=str(digits), out=str(out),
                            image_size=32, batch_size=16, workers=0, epochs=1, linear_probe=True)
    assert config.feature_cache
    with pytest.raises(GraftError, match=r"the training loss became nan at epoch 1 step 1; stopping\. The last good "
                       r"checkpoint is kept; lower --lr and resume or start again\."):
        finetune(config)
    assert not (out / "last.ckpt").exists() and not (out / "model.safetensors").exists()
