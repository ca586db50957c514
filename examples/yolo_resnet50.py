"""A hand-written ResNet50 YOLO (a `layer5` of three dilated blocks, then `conv_end` and `bn_end`) receives
torchvision's ResNet50 backbone: its 318 tensors, and nothing else.

The model is written as a popular tutorial writes it: torchvision's bottleneck as one `bottleneck` Sequential
with a `shortcut`, and an extra `layer5` of three 256-channel blocks whose BatchNorms and 3x3 convolutions have
exactly the shapes of `layer3`'s. The tutorial zips the two state dicts by position and stops at key 318. With
`transfer` no position is counted: the backbone is aligned by structure in execution order, and the look-alike
blocks of `layer5` stay new, because `layer3` already has its own counterpart in this model.

"The pretrained file" is a torchvision resnet50's randomly initialised state_dict saved to disk (every tensor
distinct, so a misplaced tensor could not pass for the right one); with the real `resnet50-0676ba61.pth`
nothing changes.

    python examples/yolo_resnet50.py [--out DIR]
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.nn import BatchNorm2d, Conv2d, MaxPool2d, ReLU, Sequential

import torchgraft as tg

from _common import out_dir

CLASS_NUM = 20


class Bottleneck(nn.Module):
    def __init__(self, in_channel, out_channel, stride, downsample):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.bottleneck = Sequential(
            Conv2d(in_channel, out_channel, kernel_size=1, stride=stride[0], padding=0, bias=False),
            BatchNorm2d(out_channel), ReLU(inplace=True),
            Conv2d(out_channel, out_channel, kernel_size=3, stride=stride[1], padding=1, bias=False),
            BatchNorm2d(out_channel), ReLU(inplace=True),
            Conv2d(out_channel, out_channel * 4, kernel_size=1, stride=stride[2], padding=0, bias=False),
            BatchNorm2d(out_channel * 4))
        if self.downsample is False:
            self.shortcut = Sequential()
        else:
            self.shortcut = Sequential(
                Conv2d(self.in_channel, self.out_channel * 4, kernel_size=1, stride=stride[0], bias=False),
                BatchNorm2d(self.out_channel * 4))

    def forward(self, x):
        out = self.bottleneck(x)
        out += self.shortcut(x)
        return self.relu(out)


class output_net(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, block_type='A'):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=2, bias=False, dilation=2)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.downsample = nn.Sequential()
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != self.expansion * planes or block_type == 'B':
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return self.relu(out)


class ResNet50(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        self.layer0 = Sequential(Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False), BatchNorm2d(64),
                                 ReLU(inplace=True), MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = self.make_layer(self.block, channel=[64, 64], stride1=[1, 1, 1], stride2=[1, 1, 1], n_re=3)
        self.layer2 = self.make_layer(self.block, channel=[256, 128], stride1=[2, 1, 1], stride2=[1, 1, 1], n_re=4)
        self.layer3 = self.make_layer(self.block, channel=[512, 256], stride1=[2, 1, 1], stride2=[1, 1, 1], n_re=6)
        self.layer4 = self.make_layer(self.block, channel=[1024, 512], stride1=[2, 1, 1], stride2=[1, 1, 1], n_re=3)
        self.layer5 = self._make_output_layer(in_channels=2048)
        self.avgpool = nn.AvgPool2d(2)
        self.conv_end = nn.Conv2d(256, int(CLASS_NUM + 10), kernel_size=3, stride=1, padding=1, bias=False)
        self.bn_end = nn.BatchNorm2d(int(CLASS_NUM + 10))

    def make_layer(self, block, channel, stride1, stride2, n_re):
        layers = []
        for num_layer in range(0, n_re):
            if num_layer == 0:
                layers.append(block(channel[0], channel[1], stride1, downsample=True))
            else:
                layers.append(block(channel[1] * 4, channel[1], stride2, downsample=False))
        return Sequential(*layers)

    def _make_output_layer(self, in_channels):
        return nn.Sequential(output_net(in_planes=in_channels, planes=256, block_type='B'),
                             output_net(in_planes=256, planes=256, block_type='A'),
                             output_net(in_planes=256, planes=256, block_type='A'))

    def forward(self, x):
        out = self.layer0(x)
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = self.layer5(out)
        out = self.avgpool(out)
        out = self.conv_end(out)
        out = self.bn_end(out)
        out = torch.sigmoid(out)
        return out.permute(0, 2, 3, 1)


def resnet50():
    return ResNet50(Bottleneck)


def main() -> None:
    out = out_dir("seed 000's YOLO model receives torchvision's ResNet50 backbone")
    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    with torch.no_grad():
        for t in reference.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape))
    pretrained = out / "resnet50.pth"
    torch.save(reference.state_dict(), pretrained)

    net = resnet50()
    report = tg.transfer(pretrained, net)
    print(report.summary())

    # The tutorial's own truth: the first 318 keys of both state dicts are the same tensors, in order.
    source = torch.load(pretrained, weights_only=True)
    mine = net.state_dict()
    truth = dict(zip(list(mine)[:318], list(source)[:318]))
    for target, source_key in truth.items():
        assert report.entry(target).status == "loaded" and report.entry(target).source == source_key, target
        assert torch.equal(mine[target], source[source_key]), target
    placed = [e.target for e in report.entries if e.status != "new"]
    assert sorted(placed) == sorted(truth), sorted(set(placed) - set(truth))[:5]
    assert all(e.status == "new" for e in report.entries if e.target.startswith(("layer5.", "conv_end", "bn_end")))
    assert sorted(u["source"] for u in report.unused_source) == ["fc.bias", "fc.weight"]
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 3, 3, CLASS_NUM + 10)  # 7 x 7 at 448 px
    print(f"yolo: 318 backbone tensors loaded, {len(report.by_status('new'))} new (layer5, conv_end, bn_end)")


if __name__ == "__main__":
    main()
