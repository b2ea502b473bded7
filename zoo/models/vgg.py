"""CIFAR VGG with batch norm, as defined by RepDistiller (vgg8/11/13/16/19).

Five blocks of 3×3 conv → BN → ReLU (64, 128, 256, 512, 512 channels), 2×2
max pooling after blocks 0–2 (and after block 3 once the input is 64 px or
more, as RepDistiller does for 64×64 Tiny-ImageNet), global average pooling
and a single linear classifier: the fully connected layers of the ImageNet
VGG are gone. Convolutions keep their bias, as in the reference code.

Stages: the five blocks' outputs after their last ReLU; `preact` is the last
BN output of each block.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._init import init_conv_bn
from .base import StagedModel, StageOutput

CONFIGS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class VGG(StagedModel):
    """VGG-`depth` (8, 11, 13, 16 or 19); `width` multiplies every channel count."""

    # RepDistiller / mdistiller `vgg.py`: block0…block4, the same conv/BN/ReLU indices inside
    REFERENCE_RENAMES = ((r"^block(\d)\.", r"blocks.\1."),)

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int,
                 depth: int = 8, width: float = 1.0):
        super().__init__()
        if depth not in CONFIGS:
            raise ValueError(f"depth must be one of {sorted(CONFIGS)}, got {depth}")
        if input_size < 8:
            raise ValueError(f"input_size {input_size} is too small for VGG's pooling (need >= 8)")
        blocks, c_in = [], in_channels
        for cfg in CONFIGS[depth]:
            layers = []
            for c in cfg:
                c = max(1, round(c * width))
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
            blocks.append(nn.Sequential(*layers[:-1]))  # the block's last ReLU is applied in forward
        self.blocks = nn.ModuleList(blocks)
        self.pool_after = (0, 1, 2, 3) if input_size >= 64 else (0, 1, 2)
        self.classifier = nn.Linear(c_in, num_classes)
        init_conv_bn(self, linear_std=0.01)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        stages, preact = [], []
        for i, block in enumerate(self.blocks):
            z = block(x)
            x = F.relu(z)
            stages.append(x)
            preact.append(z)
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return StageOutput(self.classifier(pooled), stages, preact)
