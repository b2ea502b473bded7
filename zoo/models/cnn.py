"""A small plain CNN family: the zero-download default's teacher and student.

Three (or more) stages of conv-BN-ReLU, halving resolution between stages,
so the same definition runs on 8×8 digits, 28×28 MNIST and 32×32 images.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import StagedModel, StageOutput


class _Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, depth: int):
        super().__init__()
        convs, bns = [], []
        for i in range(depth):
            convs.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False))
            bns.append(nn.BatchNorm2d(c_out))
        self.convs, self.bns = nn.ModuleList(convs), nn.ModuleList(bns)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv, bn in zip(self.convs, self.bns):
            z = bn(conv(x))
            x = F.relu(z)
        return x, z


class SmallCNN(StagedModel):
    """`num_stages` stages of `depth` 3×3 convs with `channels·width·2^i` channels.

    `fc_hidden` adds fully connected layers before the classifier (the
    "few conv and FC layers" student of offline-KD on CIFAR-10).
    """

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int,
                 channels: int = 16, width: float = 1.0, depth: int = 1, num_stages: int = 3,
                 fc_hidden: list[int] | tuple[int, ...] = ()):
        super().__init__()
        if input_size < 2 ** (num_stages - 1):
            raise ValueError(f"input_size {input_size} is too small for {num_stages} stages")
        widths = [max(1, round(channels * width * 2**i)) for i in range(num_stages)]
        self.stages = nn.ModuleList(
            _Stage(c_in, c_out, depth) for c_in, c_out in zip([in_channels] + widths[:-1], widths)
        )
        head, prev = [], widths[-1]
        for h in fc_hidden:
            head += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            prev = h
        self.head = nn.Sequential(*head)
        self.classifier = nn.Linear(prev, num_classes)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        stages, preact = [], []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x, z = stage(x)
            stages.append(x)
            preact.append(z)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return StageOutput(self.classifier(self.head(pooled)), stages, preact)
