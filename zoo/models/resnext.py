"""CIFAR ResNeXt (Xie et al. 2017, §5.3), e.g. ResNeXt-29 (C×dd).

The paper's CIFAR template: a 3×3 stem to 64 channels and three stages of
`(depth − 2) / 9` bottleneck blocks — 1×1 conv to C·d channels, 3×3 grouped
conv (C groups), 1×1 conv to the stage's output width — with output widths
256, 512, 1024 (`stage_channels`, doubled per stage) and the bottleneck
width d doubled per stage too, stride 2 at the start of stages 2 and 3,
global average pooling and a linear layer. Shortcuts that change shape are a
1×1 strided conv + BN. `cardinality` is C, `bottleneck_width` is d: the
paper's ResNeXt-29 (8×64d) is 34.4 M parameters; the small variants
(2×32d, 4×16d) are under 4 M.

Stages: the three stages' outputs after the last block's ReLU; `preact` is
that block's residual sum before the ReLU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._init import init_conv_bn
from .base import StageOutput, StagedModel, run_stages


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, group_width: int, c_out: int, cardinality: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, group_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.conv2 = nn.Conv2d(group_width, group_width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(group_width)
        self.conv3 = nn.Conv2d(group_width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        z = self.bn3(self.conv3(out)) + (x if self.downsample is None else self.downsample(x))
        return F.relu(z), z


class ResNeXt(StagedModel):
    """ResNeXt-`depth` (`cardinality`×`bottleneck_width`d) for small images."""

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int,
                 depth: int = 29, cardinality: int = 2, bottleneck_width: int = 32,
                 stage_channels: int = 256, stem_channels: int = 64):
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"depth must be 9n+2 with n >= 1 (11, 20, 29, …), got {depth}")
        if min(cardinality, bottleneck_width, stage_channels, stem_channels) < 1:
            raise ValueError("cardinality, bottleneck_width, stage_channels and stem_channels must be positive")
        if input_size < 4:
            raise ValueError(f"input_size {input_size} is too small for three stages (need >= 4)")
        n = (depth - 2) // 9
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        stages, c_in = [], stem_channels
        for i in range(3):
            group_width, c_out = cardinality * bottleneck_width * 2**i, stage_channels * 2**i
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(c_in, group_width, c_out, cardinality, 2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        x, stages, preact = run_stages(x, self.stages)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return StageOutput(self.fc(pooled), stages, preact)
