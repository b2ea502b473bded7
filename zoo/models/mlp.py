"""Fully connected networks, as in the soft-target and adversarial-KD MNIST papers."""

from __future__ import annotations

import torch
from torch import nn

from .base import StagedModel, StageOutput


class MLP(StagedModel):
    """Flatten → input dropout → (Linear → ReLU → Dropout) per hidden size → Linear.

    Each hidden layer is a stage (a B×D feature, not a map): logit and
    hint methods apply, spatial ones (fsp, svd, at, wasserstein) do not.

    The classic MNIST teacher of the dropout and soft-target papers is
    `hidden=[1200, 1200], dropout=0.5, input_dropout=0.2, max_norm=3.5`:
    `max_norm` caps the L2 norm of each hidden unit's incoming weights after
    every optimiser step (the constraint dropout was trained with; none by
    default).
    """

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int,
                 hidden: list[int] | tuple[int, ...] = (800, 800), dropout: float = 0.0,
                 width: float = 1.0, input_dropout: float = 0.0, max_norm: float | None = None):
        super().__init__()
        if not 0 <= dropout < 1 or not 0 <= input_dropout < 1:
            raise ValueError(f"dropout and input_dropout are probabilities in [0, 1), got {dropout} and {input_dropout}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be positive (or null for none), got {max_norm}")
        sizes = [in_channels * input_size * input_size] + [max(1, round(h * width)) for h in hidden]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.input_dropout = nn.Dropout(input_dropout)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(sizes[-1], num_classes)
        self.max_norm = max_norm

    @torch.no_grad()
    def apply_constraints(self) -> None:
        if self.max_norm is None:
            return
        for linear in self.linears:  # a row of `weight` holds one unit's incoming weights
            norms = linear.weight.norm(dim=1, keepdim=True)
            linear.weight.mul_(norms.clamp(min=self.max_norm).reciprocal().mul_(self.max_norm))

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        h = self.input_dropout(x.flatten(1))
        stages, preact = [], []
        for linear in self.linears:
            z = linear(h)
            h = self.dropout(torch.relu(z))
            preact.append(z)
            stages.append(h)
        return StageOutput(self.classifier(h), stages, preact)
