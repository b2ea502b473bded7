"""MobileNetV2 (Sandler et al. 2018), the CIFAR variant RepDistiller uses.

Stem 3×3 conv stride 2, the seven inverted-residual groups of the paper
(expansion `expand`, strides 1,1,2,2,1,2,1), a 1×1 conv to 1280 channels
(1280·width when width > 1), global average pooling and a linear layer.
As in RepDistiller every block keeps its 1×1 expansion conv (also at
expansion 1). RepDistiller's "MobileNetV2" row is `width=0.5`
(`mobilenetv2_half` here).

Stages (four resolutions; at 32×32 input: 16, 8, 4, 2 px): groups 0–1,
group 2, groups 3–4, and groups 5–6 followed by the final 1×1 conv. Inverted
residual blocks end in a linear bottleneck (no activation), so for the first
three stages `stages` and `preact` are the same tensor (RepDistiller's
features too); the last stage ends with the 1×1 conv's ReLU, and its
`preact` is that conv's BN output.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._init import init_conv_bn
from .base import StagedModel, StageOutput

# expansion (None = the model's `expand`), channels, blocks, first stride
SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
           (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
STAGE_ENDS = (1, 2, 4, 6)  # the last group of each resolution stage


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(StagedModel):
    """MobileNetV2 with width multiplier `width` and expansion ratio `expand` (paper: 6)."""

    # RepDistiller / mdistiller `mobilenetv2.py`: conv1 (stem), blocks, conv2 (head), classifier.0
    REFERENCE_RENAMES = ((r"^conv1\.", "stem."), (r"^blocks\.", "groups."), (r"^conv2\.0\.", "head_conv."),
                         (r"^conv2\.1\.", "head_bn."), (r"^classifier\.0\.", "classifier."))

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int,
                 width: float = 1.0, expand: int = 6):
        super().__init__()
        if width <= 0 or expand < 1:
            raise ValueError(f"width must be > 0 and expand >= 1, got width={width}, expand={expand}")
        c = max(1, int(32 * width))
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(inplace=True))
        groups = []
        for t, ch, n, s in SETTING:
            c_out = max(1, int(ch * width))
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(c, c_out, s if j == 0 else 1, expand if t is None else t))
                c = c_out
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        last = int(1280 * width) if width > 1.0 else 1280
        self.head_conv = nn.Conv2d(c, last, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(last)
        self.classifier = nn.Linear(last, num_classes)
        init_conv_bn(self, linear_std=0.01)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        x = self.stem(x)
        stages, preact = [], []
        for i, group in enumerate(self.groups):
            x = group(x)
            if i in STAGE_ENDS[:-1]:
                stages.append(x)
                preact.append(x)
        z = self.head_bn(self.head_conv(x))
        x = F.relu(z)
        stages.append(x)
        preact.append(z)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return StageOutput(self.classifier(pooled), stages, preact)
