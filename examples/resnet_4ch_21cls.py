"""A ResNet with a 4-channel first convolution and a 21-class head, from 3-channel, 1000-class weights.

Typical for RGB + depth (or RGB + near-infrared) inputs and a 21-class dataset such as PASCAL VOC. The file
holds `conv1.weight` of shape (64, 3, 7, 7) and a 1000-row `fc`; the model wants (64, 4, 7, 7) and 21 rows.
`transfer` loads everything else by name, adapts the stem with the named `input_channels` adapter (3 -> 4
repeats the RGB filters cyclically, R G B R, and scales them by 3/4 so that the response keeps its scale) and
leaves the new head new instead of cropping 1000 rows to 21.

"The pretrained file" is a torchvision resnet18's randomly initialised state_dict saved to disk, since no
ImageNet ResNet file is available offline; ResNet50 works the same way.

    python examples/resnet_4ch_21cls.py [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from torchgraft.transfer import transfer

from _common import out_dir


def main() -> None:
    out = out_dir(__doc__.splitlines()[0])
    torch.manual_seed(0)
    pretrained = out / "resnet18-pretrained.pth"
    torch.save(torchvision.models.resnet18().state_dict(), pretrained)

    model = torchvision.models.resnet18(num_classes=21)
    model.conv1 = nn.Conv2d(4, 64, kernel_size=7, stride=2, padding=3, bias=False)
    report = transfer(pretrained, model)
    print(report.summary())

    stem = report.entry("conv1.weight")
    assert (stem.status, stem.adapter) == ("adapted", "input_channels"), stem
    assert [e.target for e in report.by_status("new") if not e.benign] == ["fc.weight", "fc.bias"]
    assert {u["source"] for u in report.unused_source} == {"fc.weight", "fc.bias"}
    assert report.entry("layer4.1.conv2.weight").status == "loaded"

    # The adapted stem: channel 4 repeats the red filters, all scaled by 3/4.
    old = torch.load(pretrained, weights_only=True)["conv1.weight"]
    new = model.conv1.weight.detach()
    assert torch.allclose(new[:, :3], old * 0.75) and torch.allclose(new[:, 3], old[:, 0] * 0.75)

    model.eval()
    logits = model(torch.randn(2, 4, 64, 64))
    assert logits.shape == (2, 21)
    print(f"4-channel, 21-class resnet18: conv1 adapted (input_channels), fc new, output {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
