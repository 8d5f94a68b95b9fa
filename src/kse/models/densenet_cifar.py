"""DenseNet-40 for CIFAR (Huang et al. 2017): 3 dense blocks of 12 layers, growth rate 12,
BN-ReLU-Conv3x3 layers, transitions BN-ReLU-Conv1x1-AvgPool, no bottleneck or compression,
as in the KSE paper's DenseNet-40 (CVPR 2019, Table 2; about 1.0 M params, 0.28 G MACs)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class DenseLayer(nn.Module):
    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetCifar(nn.Module):
    def __init__(self, depth: int = 40, growth: int = 12, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 3 != 0:
            raise ValueError(f"DenseNet depth must be 3n+4, got {depth}")
        n = (depth - 4) // 3
        planes = 16  # the original DenseNet-40 stem has 16 channels
        self.conv1 = nn.Conv2d(in_channels, planes, 3, 1, 1, bias=False)
        blocks = []
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth))
                planes += growth
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                blocks.append(Transition(planes, planes))
        self.features = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(x))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)
        return self.fc(x)


@register_model("densenet40")
def densenet40(num_classes: int = 10, in_channels: int = 3) -> DenseNetCifar:
    """DenseNet-40, growth rate 12 (CIFAR)."""
    return DenseNetCifar(40, 12, num_classes, in_channels)
