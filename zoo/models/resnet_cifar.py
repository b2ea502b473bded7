"""CIFAR ResNets (He et al. 2016, §4.2) as defined by RepDistiller / mdistiller.

A 3×3 stem and three stages of basic blocks (`n = (depth − 2) / 6` blocks
each), stride 2 between stages, global average pooling and one linear layer.
`resnet20` … `resnet110` use filters (16, 16, 32, 64) — stem, then the three
stages; the "×4" family (`resnet8x4`, `resnet32x4`) uses (32, 64, 128, 256).
Shortcuts that change shape are a 1×1 strided conv + BN (option B).

Stages: the output of each of the three residual stages (after the final
ReLU of its last block); `preact` is the same sum before that ReLU.
On 8×8 inputs the maps are 8/4/2 pixels — still valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ._init import init_conv_bn
from .base import StageOutput, StagedModel, run_stages


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, output before its ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        z = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(z), z


class CifarResNet(StagedModel):
    """ResNet-`depth` for small images; `filters` = (stem, stage1, stage2, stage3).

    `width` multiplies every filter count (a student-shrinking knob; 1.0 is
    the published network).
    """

    # RepDistiller / mdistiller `resnet.py`: stages are layer1…layer3
    REFERENCE_RENAMES = ((r"^layer1\.", "layers.0."), (r"^layer2\.", "layers.1."), (r"^layer3\.", "layers.2."))

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int,
                 depth: int = 20, filters: Sequence[int] = (16, 16, 32, 64), width: float = 1.0):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, …), got {depth}")
        if len(filters) != 4:
            raise ValueError(f"filters must be 4 numbers (stem and three stages), got {list(filters)}")
        if input_size < 4:
            raise ValueError(f"input_size {input_size} is too small for three stages (need >= 4)")
        n = (depth - 2) // 6
        stem, *widths = [max(1, round(f * width)) for f in filters]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, c_in = [], stem
        for i, c_out in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            layers.append(nn.ModuleList(blocks))
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        x, stages, preact = run_stages(x, self.layers)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return StageOutput(self.fc(pooled), stages, preact)
