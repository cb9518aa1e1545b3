"""ResNet with a CIFAR stem (He et al. 2016, "Deep Residual Learning"): 3x3 stem, no max-pool,
four stages of BasicBlocks at widths w, 2w, 4w, 8w, global average pooling, linear head. One named factory
per depth: resnet18 (2, 2, 2, 2 blocks per stage) and resnet34 (3, 4, 6, 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from . import CIFAR, models


@dataclass
class ResNetConfig:
    name: str = "resnet18"  # resnet18 | resnet34: the depth is the variant's, not an option
    width: int = 64  # channels of the first stage; doubled at each later stage


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # projection shortcut (option B of the paper)
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig, blocks: tuple[int, ...], in_channels: int, num_classes: int):
        super().__init__()
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU(inplace=True))
        stages, c = [], w
        for i, n in enumerate(blocks):
            out = w * 2 ** i
            for j in range(n):
                stages.append(BasicBlock(c, out, 2 if (i > 0 and j == 0) else 1))
                c = out
        self.stages = nn.Sequential(*stages)  # (B, w, H, W) -> (B, 8w, H/8, W/8)
        self.head = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: blocks start as identity (Goyal 2017)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean((2, 3)))  # global average pool: (B, C, h, w) -> (B, C)


@models.register("resnet18", config=ResNetConfig, example=CIFAR)
def resnet18(cfg: ResNetConfig, spec) -> nn.Module:
    """ResNet-18 with a CIFAR stem (11M parameters at width 64)."""
    return ResNet(cfg, (2, 2, 2, 2), spec.input_shape[0], spec.num_classes)


@models.register("resnet34", config=ResNetConfig, example=CIFAR)
def resnet34(cfg: ResNetConfig, spec) -> nn.Module:
    """ResNet-34 with a CIFAR stem (21M parameters at width 64)."""
    return ResNet(cfg, (3, 4, 6, 3), spec.input_shape[0], spec.num_classes)
