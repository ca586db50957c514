"""A hand-written ResNet50 detector receives torchvision's ResNet50 backbone weights, then trains its head.

The detector below names its modules its own way (`stem.conv`, `stages.2.units.4.reduce`, `det_head.cls`),
so not one key matches torchvision's `resnet50` state_dict by name. `transfer` matches them by structure (the
same modules in the same order with the same shapes), reports it per tensor as `method: structure`, and
leaves the detection head new. Then the first N parameter tensors (stem and first stage) are frozen, the
optimizer receives only the trainable ones through `param_groups`, and one training step runs.

"The pretrained file" here is a torchvision resnet50's randomly initialised state_dict, saved to disk, because
no ImageNet ResNet50 file is available offline; with the real `resnet50-0676ba61.pth` nothing changes.

    python examples/detector_resnet50.py [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

import torchgraft as tg
from torchgraft.transfer import transfer

from _common import out_dir


class Unit(nn.Module):
    """A bottleneck: 1x1 reduce, 3x3, 1x1 expand, with an optional projection shortcut."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.reduce = nn.Conv2d(cin, width, 1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(width)
        self.spatial = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.spatial_bn = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, cout, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.reduce_bn(self.reduce(x)))
        y = torch.relu(self.spatial_bn(self.spatial(y)))
        y = self.expand_bn(self.expand(y))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Stage(nn.Module):
    def __init__(self, cin: int, width: int, depth: int, stride: int) -> None:
        super().__init__()
        self.units = nn.Sequential(*[Unit(cin if i == 0 else width * 4, width, stride if i == 0 else 1)
                                     for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


class Detector(nn.Module):
    """ResNet50 backbone + a dense head: per cell, class scores and a box (dx, dy, w, h)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(3, 64, 7, 2, 3, bias=False))
        self.stem.add_module("bn", nn.BatchNorm2d(64))
        self.stem.add_module("act", nn.ReLU())
        self.stem.add_module("pool", nn.MaxPool2d(3, 2, 1))
        cfg = [(64, 64, 3, 1), (256, 128, 4, 2), (512, 256, 6, 2), (1024, 512, 3, 2)]
        self.stages = nn.ModuleList(Stage(*c) for c in cfg)
        self.det_head = nn.ModuleDict({"cls": nn.Conv2d(2048, num_classes, 1), "box": nn.Conv2d(2048, 4, 1)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.det_head["cls"](x), self.det_head["box"](x)


def main() -> None:
    out = out_dir(__doc__.splitlines()[0])
    torch.manual_seed(0)
    pretrained = out / "resnet50-pretrained.pth"
    torch.save(torchvision.models.resnet50().state_dict(), pretrained)

    model = Detector(num_classes=3)
    report = transfer(pretrained, model)
    print(report.summary(max_rows=4))

    # Every backbone tensor came from the file by structure; only the detection head is new.
    reference = torch.load(pretrained, weights_only=True)
    assert report.entry("stem.conv.weight").source == "conv1.weight"
    assert report.entry("stem.conv.weight").method == "structure"
    assert report.entry("stages.3.units.2.expand.weight").source == "layer4.2.conv3.weight"
    assert torch.equal(model.stages[2].units[0].shortcut[0].weight, reference["layer3.0.downsample.0.weight"])
    assert sorted(e.target for e in report.by_status("new")) == [
        "det_head.box.bias", "det_head.box.weight", "det_head.cls.bias", "det_head.cls.weight"]
    assert sorted(u["source"] for u in report.unused_source) == ["fc.bias", "fc.weight"]

    # Freeze the stem and the first stage: its first N parameter tensors, in named_parameters() order.
    n = 2 + sum(1 for _ in model.stages[0].parameters())
    frozen = tg.freeze(model, first=n)
    assert frozen[0] == "stem.conv.weight" and frozen[-1].startswith("stages.0.")
    print(tg.trainable_summary(model).summary())

    groups = tg.param_groups(model, lr=1e-3, weight_decay=1e-4)
    optimizer = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)

    # One step on a tiny batch: frozen weights do not move, and their BatchNorm statistics stay put.
    model.train()
    stem_before = model.stem.conv.weight.clone()
    stem_mean_before = model.stem.bn.running_mean.clone()
    head_before = model.det_head["cls"].weight.clone()
    images = torch.randn(2, 3, 64, 64)
    scores, boxes = model(images)
    labels = torch.randint(0, 3, scores.shape[:1] + scores.shape[2:])
    loss = nn.functional.cross_entropy(scores, labels) + boxes.abs().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.equal(model.stem.conv.weight, stem_before)
    assert torch.equal(model.stem.bn.running_mean, stem_mean_before)
    assert not torch.equal(model.det_head["cls"].weight, head_before)
    print(f"detector: backbone by structure, {len(frozen)} tensors frozen, one step, loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
