"""ShuffleNetV2 (Ma et al. 2018), the CIFAR variant RepDistiller uses ("ShuffleV2").

A 1×1 stem to 24 channels at full resolution, three stages of one
down-sampling unit (stride 2) plus `blocks` basic units (channel split,
1×1 → 3×3 depthwise → 1×1 on one half, concat, channel shuffle), a 1×1 conv
to the final width, global average pooling and a linear layer.
`width` is ShuffleNetV2's net size: one of 0.2, 0.3, 0.5, 1, 1.5, 2, each
with its own channel table (RepDistiller's `ShuffleV2` is `width=1`).

Stages: the three units' outputs (at 32×32 input: 16, 8, 4 px); the last
stage includes the final 1×1 conv, so its map is that conv's ReLU output and
its `preact` the conv's BN output. For the first two stages `preact` is the
last unit's concat before its final ReLU (RepDistiller's `f_pre`), in the
same channel order as the shuffled output.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._init import init_conv_bn
from .base import StageOutput, StagedModel, run_stages

# net size → (stage channels ×3, final channels), basic units per stage
CONFIGS: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class BasicUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.half = c = channels // 2
        self.conv1 = nn.Conv2d(channels - c, channels - c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels - c)
        self.conv2 = nn.Conv2d(channels - c, channels - c, 3, 1, 1, groups=channels - c, bias=False)
        self.bn2 = nn.BatchNorm2d(channels - c)
        self.conv3 = nn.Conv2d(channels - c, channels - c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels - c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, : self.half], x[:, self.half:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        z = self.bn3(self.conv3(out))
        return channel_shuffle(torch.cat([x1, F.relu(z)], 1)), channel_shuffle(torch.cat([x1, z], 1))


class DownUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        # left branch: 3×3 depthwise stride 2 → 1×1
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: 1×1 → 3×3 depthwise stride 2 → 1×1
        self.conv3 = nn.Conv2d(c_in, c_out - mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out - mid)
        self.conv4 = nn.Conv2d(c_out - mid, c_out - mid, 3, 2, 1, groups=c_out - mid, bias=False)
        self.bn4 = nn.BatchNorm2d(c_out - mid)
        self.conv5 = nn.Conv2d(c_out - mid, c_out - mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(c_out - mid)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1 = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        out2 = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        z2 = self.bn5(self.conv5(out2))
        z = torch.cat([z1, z2], 1)
        return channel_shuffle(F.relu(z)), channel_shuffle(z)


class ShuffleNetV2(StagedModel):
    """ShuffleNetV2 of net size `width` (0.2, 0.3, 0.5, 1, 1.5 or 2)."""

    # RepDistiller / mdistiller `ShuffleNetv2.py`: conv1/bn1 stem, layer1…layer3, conv2/bn2 head, linear
    REFERENCE_RENAMES = ((r"^conv1\.", "stem."), (r"^bn1\.", "stem_bn."), (r"^layer1\.", "stages.0."),
                         (r"^layer2\.", "stages.1."), (r"^layer3\.", "stages.2."), (r"^conv2\.", "head_conv."),
                         (r"^bn2\.", "head_bn."), (r"^linear\.", "classifier."))

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int, width: float = 1.0):
        super().__init__()
        if float(width) not in CONFIGS:
            raise ValueError(f"width (net size) must be one of {sorted(CONFIGS)}, got {width}")
        channels, blocks = CONFIGS[float(width)]
        self.stem = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(24)
        stages, c_in = [], 24
        for c_out, n in zip(channels[:3], blocks):
            stages.append(nn.ModuleList([DownUnit(c_in, c_out)] + [BasicUnit(c_out) for _ in range(n)]))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.head_conv = nn.Conv2d(c_in, channels[3], 1, bias=False)
        self.head_bn = nn.BatchNorm2d(channels[3])
        self.classifier = nn.Linear(channels[3], num_classes)
        init_conv_bn(self)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        x = F.relu(self.stem_bn(self.stem(x)))
        x, stages, preact = run_stages(x, self.stages)
        z = self.head_bn(self.head_conv(x))
        x = F.relu(z)
        stages[-1], preact[-1] = x, z
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return StageOutput(self.classifier(pooled), stages, preact)
