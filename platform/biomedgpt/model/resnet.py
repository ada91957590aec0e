"""The image backbone: a ResNet stem and three Bottleneck stages (OFA's "resnetNN", no layer4).

Input (B, 3, H, W) normalised pixels; output (B, 1024, H/16, W/16) features. Parameter names match
the released checkpoints (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...).
"""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability drop_prob."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


def linear_rates(max_rate: float, n: int) -> list[float]:
    """n rates rising linearly from 0 to max_rate (plain Python: safe under a meta-device context)."""
    if n <= 1:
        return [0.0] * n
    return [max_rate * i / (n - 1) for i in range(n)]


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck block (stride on the 3x3 convolution), expansion 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + drop_path(out, self.drop_path_rate, self.training))


class ResNetBackbone(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) then layer1..layer3; 1024 channels at stride 16."""

    out_channels = 1024
    stride = 16

    def __init__(self, layers: list[int], drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(64, layers[0], 1, drop_path_rate)
        self.layer2 = self._make_stage(128, layers[1], 2, drop_path_rate)
        self.layer3 = self._make_stage(256, layers[2], 2, drop_path_rate)

    def _make_stage(self, planes: int, blocks: int, stride: int, drop_path_rate: float) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        # As in OFA: the first block has no stochastic depth, later ones rise linearly to the rate.
        rates = linear_rates(drop_path_rate, blocks)
        stage = [Bottleneck(self.inplanes, planes, stride, downsample, 0.0)]
        self.inplanes = planes * Bottleneck.expansion
        stage += [Bottleneck(self.inplanes, planes, drop_path_rate=rates[i]) for i in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer3(self.layer2(self.layer1(x)))
