"""Backbones: torchvision's ResNets (the same modules and parameter names, so a width-1 backbone's
state_dict loads into `torchvision.models.resnetNN()`; written out here so that no process that builds a
model imports torchvision, ~1.3 s per Train worker and driver) with a width multiplier and a small-image
stem, CMC's split encoders (one encoder per channel group, 002_*.txt Sect. 3.1 / 4.1) and CMC's small
AlexNet (Table 10). Every encoder maps images [B, C, H, W] to a representation [B, dim] (after global
pooling) and exposes `dim`."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (groups 1, dilation 1): two 3×3 convs and the shortcut."""
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (ResNet v1.5: the stride on the 3×3 conv; groups 1,
    base width 64): 1×1 reduce, 3×3, 1×1 expand ×4, and the shortcut."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3]),
          101: (Bottleneck, [3, 4, 23, 3])}


class ResNetEncoder(nn.Module):
    """torchvision's ResNet with every stage's width scaled by `width` (ResNet-50 ×2 of CMC and
    InterCLR's tables), `in_channels` input planes, and `small_images=True` for 28–96 px data
    (3×3 stride-1 conv1 and no max-pool, as CIFAR / STL ResNets do). No fc: the output is the
    global-average-pooled representation, `dim` = 512·expansion·width."""

    def __init__(self, depth: int = 50, width: float = 1.0, small_images: bool = False, in_channels: int = 3):
        if depth not in BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS)}, got {depth}")
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")
        super().__init__()
        block, layers = BLOCKS[depth]
        planes = [max(1, round(p * width)) for p in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        if small_images:
            self.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.dim = planes[3] * block.expansion
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """torchvision's ResNet._make_layer: a projection shortcut where the shape changes."""
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth: int = 50, width: float = 1.0, small_images: bool = False, in_channels: int = 3) -> ResNetEncoder:
    return ResNetEncoder(depth, width, small_images, in_channels)


class SmallAlexNet(nn.Module):
    """One half of CMC's AlexNet for 64 px inputs (Table 10: conv 48-96-192-192-96, BN, fc6/fc7
    2048). `width` scales every layer (1.0 = the table's half network)."""

    def __init__(self, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        c = [max(1, round(x * width)) for x in (48, 96, 192, 192, 96, 2048)]

        def conv(i, o):
            return [nn.Conv2d(i, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(
            *conv(in_channels, c[0]), nn.MaxPool2d(3, 2),
            *conv(c[0], c[1]), nn.MaxPool2d(3, 2),
            *conv(c[1], c[2]), *conv(c[2], c[3]), *conv(c[3], c[4]), nn.MaxPool2d(3, 2),
            nn.AdaptiveAvgPool2d((7, 7)))  # 64 px → 7×7 as in the table; other sizes pooled to it
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c[4] * 49, c[5]), nn.BatchNorm1d(c[5]), nn.ReLU(inplace=True),
                                nn.Linear(c[5], c[5]), nn.BatchNorm1d(c[5]), nn.ReLU(inplace=True))
        self.dim = c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class SplitEncoder(nn.Module):
    """CMC's split network: the input's channels are cut into groups (L | ab → (1, 2)) and each
    group has its own encoder. `forward` returns the concatenated representation [B, Σ dim];
    `views(x)` returns the per-group representations, the views CMC contrasts."""

    def __init__(self, make_encoder: Callable[[int], nn.Module], groups: tuple[int, ...] = (1, 2)):
        super().__init__()
        if len(groups) < 2 or any(g <= 0 for g in groups):
            raise ValueError(f"channel groups must be ≥ 2 positive sizes, got {groups}")
        self.groups = tuple(groups)
        self.encoders = nn.ModuleList(make_encoder(g) for g in self.groups)
        self.view_dims = [e.dim for e in self.encoders]
        self.dim = sum(self.view_dims)

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] != sum(self.groups):
            raise ValueError(f"split encoder over channel groups {self.groups} got {x.shape[1]} channels")
        return [encoder(part) for encoder, part in zip(self.encoders, torch.split(x, self.groups, dim=1))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.views(x), dim=1)


ENCODERS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def build_encoder(name: str, width: float = 1.0, small_images: bool = False, in_channels: int = 3) -> nn.Module:
    """The encoder a config names: "resnet18|34|50|101" or "alexnet" (CMC's small AlexNet)."""
    if name == "alexnet":
        return SmallAlexNet(in_channels, width)
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r} (choose from {', '.join([*ENCODERS, 'alexnet'])})")
    return resnet(ENCODERS[name], width, small_images, in_channels)
