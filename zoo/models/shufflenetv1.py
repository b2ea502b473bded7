"""ShuffleNetV1 (Zhang et al. 2018), the CIFAR variant RepDistiller uses ("ShuffleV1").

A 1×1 stem to 24 channels at full resolution (no max-pool), three stages of
units — 1×1 group conv to a quarter of the unit's output width, channel
shuffle, 3×3 depthwise conv, 1×1 group conv — stride 2 in each stage's first
unit, whose output is concatenated with the 3×3 average-pooled input (so its
convs produce the stage width minus the input's), global average pooling and
a linear layer. `groups` picks the paper's channel table (Table 1: g = 1, 2,
3, 4 or 8); RepDistiller's `ShuffleV1` is g = 3 (240, 480, 960) with 4, 8, 4
units. The bottleneck is a quarter of the unit's conv output (rounded down to
a multiple of g). The first unit's first conv is not grouped: 24 stem
channels are too few to split, as in the paper.

Stages: the three stages' outputs (at 32×32 input: 16, 8, 4 px); `preact` is
the last unit's sum (or concat) before its final ReLU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._init import init_conv_bn
from .base import StageOutput, StagedModel, run_stages
from .shufflenetv2 import channel_shuffle

STAGE_CHANNELS: dict[int, tuple[int, int, int]] = {
    1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088), 8: (384, 768, 1536),
}
UNITS = (4, 8, 4)
STEM = 24


class ShuffleUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        branch = c_out - c_in if stride == 2 else c_out  # a stride-2 unit concatenates its pooled input
        mid = branch // 4 // groups * groups  # a quarter, as RepDistiller; g = 4 and 8 need it a multiple of g
        self.first_groups = 1 if c_in == STEM else groups
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, output before its ReLU)."""
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            z = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        else:
            z = out + x
        return F.relu(z), z


class ShuffleNetV1(StagedModel):
    """ShuffleNetV1 with `groups` (1, 2, 3, 4 or 8) in its 1×1 group convs."""

    # RepDistiller / mdistiller `ShuffleNetv1.py`: conv1/bn1 stem, layer1…layer3, linear
    REFERENCE_RENAMES = ((r"^conv1\.", "stem."), (r"^bn1\.", "stem_bn."), (r"^layer1\.", "stages.0."),
                         (r"^layer2\.", "stages.1."), (r"^layer3\.", "stages.2."), (r"^linear\.", "classifier."))

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int, groups: int = 3):
        super().__init__()
        if groups not in STAGE_CHANNELS:
            raise ValueError(f"groups must be one of {sorted(STAGE_CHANNELS)}, got {groups}")
        if input_size < 8:
            raise ValueError(f"input_size {input_size} is too small for three stride-2 stages (need >= 8)")
        self.stem = nn.Conv2d(in_channels, STEM, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(STEM)
        stages, c_in = [], STEM
        for c_out, n in zip(STAGE_CHANNELS[groups], UNITS):
            units = []
            for j in range(n):
                units.append(ShuffleUnit(c_in, c_out, 2 if j == 0 else 1, groups))
                c_in = c_out
            stages.append(nn.ModuleList(units))
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        x = F.relu(self.stem_bn(self.stem(x)))
        x, stages, preact = run_stages(x, self.stages)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return StageOutput(self.classifier(pooled), stages, preact)
