"""Wide ResNets WRN-depth-k (Zagoruyko & Komodakis 2016), CIFAR variant.

Pre-activation basic blocks (BN → ReLU → 3×3 conv, twice), three groups of
`n = (depth − 4) / 6` blocks with 16k, 32k, 64k channels, a 16-channel 3×3
stem, a final BN → ReLU, global average pooling and a linear layer — the
definition RepDistiller and the AT authors use (wrn_40_2, wrn_16_2, …).

Stages: in a pre-activation network a group's output is a raw residual sum;
the activation that belongs to it is the BN → ReLU that opens the next
group's first block (or the final BN → ReLU after the last group). So
stage `l` = ReLU(BN(group_l output)) and `preact` = BN(group_l output), the
same maps RepDistiller hands to its feature losses with `preact=True`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._init import init_conv_bn
from .base import StagedModel, StageOutput


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = c_in == c_out and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor, act: torch.Tensor | None = None) -> torch.Tensor:
        """`act` = ReLU(bn1(x)) when the caller has already computed it."""
        a = F.relu(self.bn1(x)) if act is None else act
        out = F.relu(self.bn2(self.conv1(a)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # a shape-changing block projects the activated input, an identity block adds x itself
        return out + (x if self.equal_in_out else self.shortcut(a))


class WideResNet(StagedModel):
    """WRN-`depth`-`widen_factor`; `drop_rate` is the dropout between the two convs."""

    # RepDistiller / mdistiller `wrn.py`: groups are block1…block3 wrapping `.layer`, the final BN is bn1
    REFERENCE_RENAMES = ((r"^block1\.layer\.", "groups.0."), (r"^block2\.layer\.", "groups.1."),
                         (r"^block3\.layer\.", "groups.2."), (r"\.convShortcut\.", ".shortcut."),
                         (r"^bn1\.", "bn."))

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int,
                 depth: int = 16, widen_factor: float = 2, drop_rate: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, …), got {depth}")
        if widen_factor <= 0:
            raise ValueError(f"widen_factor must be positive, got {widen_factor}")
        if input_size < 4:
            raise ValueError(f"input_size {input_size} is too small for three stages (need >= 4)")
        n = (depth - 4) // 6
        widths = [max(1, round(c * widen_factor)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        groups, c_in = [], 16
        for i, c_out in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1, drop_rate))
                c_in = c_out
            groups.append(nn.ModuleList(blocks))
        self.groups = nn.ModuleList(groups)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        x = self.conv1(x)
        stages, preact = [], []
        act = None  # the first block of the first group activates its own input
        for i, group in enumerate(self.groups):
            for j, block in enumerate(group):
                x = block(x, act if j == 0 else None)
            # the BN that follows this group: the next group's first-block bn1, or the final one.
            # The next group's first block always changes shape (channels double, stride 2),
            # so it consumes exactly this activation.
            bn = self.groups[i + 1][0].bn1 if i + 1 < len(self.groups) else self.bn
            z = bn(x)
            act = F.relu(z)
            stages.append(act)
            preact.append(z)
        pooled = torch.flatten(F.adaptive_avg_pool2d(act, 1), 1)
        return StageOutput(self.fc(pooled), stages, preact)
