"""Keras models for the Keras reader's tests and the PyTorch models they go into.

The Keras builders import Keras (on the torch backend) only when called; the PyTorch factories are plain
`torch.nn` and can be named on the command line (`--model tests/frameworks/keras_ports.py:small_convnet`)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

IMAGE = 64  # the applications are built (and the torchvision models run) at 64x64: fast on CPU
CLASSES = 10


def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras as k

    assert k.backend.backend() == "torch", k.backend.backend()
    return k


# ---- Keras models -------------------------------------------------------------------------------------------


def calibrate_batchnorms(model, seed: int = 0) -> None:
    """Every BatchNormalization's moving statistics made non-trivial, without letting the signal die: taken from
    one batch of random images (momentum 0 for one training-mode pass), then the variance scaled by a random
    factor in [0.5, 2] per channel, the mean shifted, gamma and beta randomised; so a lost epsilon, swapped
    mean and variance or a dropped conv bias all show in the outputs."""
    k = keras()
    import numpy as np

    norms = [layer for layer in _all_layers(model) if isinstance(layer, k.layers.BatchNormalization)]
    momenta = [n.momentum for n in norms]
    for n in norms:
        n.momentum = 0.0
    rng = np.random.default_rng(seed)
    shape = [4, *model.inputs[0].shape[1:]]
    model(rng.uniform(0, 1, shape).astype("float32"), training=True)
    for n, momentum in zip(norms, momenta):
        n.momentum = momentum
        gamma, beta, mean, var = n.get_weights()
        c = gamma.shape
        n.set_weights([rng.uniform(0.5, 1.5, c).astype("float32"), rng.normal(0, 0.2, c).astype("float32"),
                       (mean + rng.normal(0, 0.1, c) * np.sqrt(var)).astype("float32"),
                       (var * rng.uniform(0.5, 2.0, c)).astype("float32")])


def _all_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
        yield layer


def application(name: str):
    """A `keras.applications` model without pretrained weights (nothing downloads), 64x64, 10 logits."""
    k = keras()
    k.utils.set_random_seed(0)
    model = getattr(k.applications, name)(weights=None, input_shape=(IMAGE, IMAGE, 3), classes=CLASSES,
                                          classifier_activation=None)
    calibrate_batchnorms(model)
    return model


def keras_small_convnet():
    """Conv2D + BatchNormalization + ReLU + Flatten + Dense: the Dense reads a channels-last (6, 6, 4) map."""
    k = keras()
    k.utils.set_random_seed(1)
    model = k.Sequential([k.Input((8, 8, 3)), k.layers.Conv2D(4, 3, name="conv"),
                          k.layers.BatchNormalization(name="bn"), k.layers.ReLU(name="relu"),
                          k.layers.Flatten(name="flatten"), k.layers.Dense(5, name="fc")], name="small")
    calibrate_batchnorms(model, seed=1)
    return model


def keras_recurrent(reset_after: bool = True):
    """LSTM(6) then GRU(5) over sequences of 4 features, every weight and bias random (no zero biases to hide
    a bias placed in the wrong gate)."""
    k = keras()
    import numpy as np

    k.utils.set_random_seed(2)
    model = k.Sequential([k.Input((7, 4)), k.layers.LSTM(6, return_sequences=True, name="lstm"),
                          k.layers.GRU(5, return_sequences=True, reset_after=reset_after, name="gru")],
                         name="recurrent")
    rng = np.random.default_rng(2)
    for layer in model.layers:
        layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    return model


# ---- PyTorch models -----------------------------------------------------------------------------------------


def small_convnet() -> nn.Module:
    """The PyTorch port of `keras_small_convnet`, named its own way."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


class Recurrent(nn.Module):
    """The PyTorch port of `keras_recurrent`: batch-first nn.LSTM and nn.GRU, all outputs returned."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(4, 6, batch_first=True)
        self.decoder = nn.GRU(6, 5, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)[0])[0]


def recurrent() -> nn.Module:
    return Recurrent()


def tf_padding(model: nn.Module) -> nn.Module:
    """Every stride-2 3x3 conv padded as TensorFlow's `same` (and Keras' `correct_pad`) pads an even-sized
    input: nothing before, one row and column after; PyTorch's `padding=1` pads one on every side. The
    weights' names and shapes do not change."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2) and m.kernel_size == (3, 3):
            m.padding = (0, 0)
            m.register_forward_pre_hook(lambda module, args: (F.pad(args[0], (0, 1, 0, 1)), *args[1:]))
    return model


def mobilenet_v2_tf_padding() -> nn.Module:
    """torchvision's MobileNetV2 (10 classes) with Keras' asymmetric padding on its stride-2 convs."""
    return tf_padding(torchvision.models.mobilenet_v2(num_classes=CLASSES))


def resnet50_v1() -> nn.Module:
    """torchvision's ResNet50 (10 classes) with the stride of each downsampling block on its first 1x1 conv, as
    Keras' ResNet50 (ResNet v1) has it; torchvision's v1.5 strides the 3x3 conv. The weights are the same."""
    model = torchvision.models.resnet50(num_classes=CLASSES)
    for layer in (model.layer2, model.layer3, model.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    return model
