"""The model of `bench_transfer_memory.py`: a deep stack of wide linear layers and a classifier head.

With the defaults (24 layers of 4096 x 4096 and 1000 classes) it has 406.8M parameters, 1.63 GB in float32.
Used as a model spec: `graft transfer CKPT --model benchmarks/bench_model.py:build --model-kwargs
'{"num_classes": 10}'`.
"""

from __future__ import annotations

import torch.nn as nn


class Stack(nn.Module):
    def __init__(self, num_classes: int = 1000, layers: int = 24, width: int = 4096) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x).relu()
        return self.head(x)


def build(num_classes: int = 1000, layers: int = 24, width: int = 4096) -> Stack:
    return Stack(num_classes, layers, width)
