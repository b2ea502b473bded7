"""Fully connected networks, as in the soft-target and adversarial-KD MNIST papers."""

from __future__ import annotations

import torch
from torch import nn

from .base import StagedModel, StageOutput


class MLP(StagedModel):
    """Flatten → (Linear → ReLU → Dropout) per hidden size → Linear.

    Each hidden layer is a stage (a B×D feature, not a map): logit and
    hint methods apply, spatial ones (fsp, svd, at, wasserstein) do not.
    """

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int,
                 hidden: list[int] | tuple[int, ...] = (800, 800), dropout: float = 0.0,
                 width: float = 1.0):
        super().__init__()
        sizes = [in_channels * input_size * input_size] + [max(1, round(h * width)) for h in hidden]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        h = x.flatten(1)
        stages, preact = [], []
        for linear in self.linears:
            z = linear(h)
            h = self.dropout(torch.relu(z))
            preact.append(z)
            stages.append(h)
        return StageOutput(self.classifier(h), stages, preact)
