"""The feature contract every zoo model follows.

Feature-based distillation methods need a network's intermediate maps. Rather
than reaching into each architecture by attribute name, every model returns a
`StageOutput`: its logits plus one feature map per stage (the output of each
resolution stage, after its activation) and the same maps before the final
activation of the stage (`preact`), which methods such as FitNets' hints or
FSP may prefer. An MLP's "stages" are its hidden layers (B×D tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass
class StageOutput:
    logits: torch.Tensor
    stages: list[torch.Tensor]
    preact: list[torch.Tensor]


class StagedModel(nn.Module):
    """A classifier whose `forward` gives logits and `forward_stages` gives everything.

    Subclasses implement `forward_stages`; `forward` is what a deployed
    student runs and what cost profiling measures.

    A family that RepDistiller and mdistiller also define says how their
    state_dict keys become its own (`REFERENCE_RENAMES`: regex, replacement,
    applied in order); a family whose keys are torchvision's says so
    (`TORCHVISION_KEYS`); a wrapper of a timm network names the prefix its
    keys sit under (`TIMM_KEYS_UNDER`). `zoo.models.formats` loads
    checkpoints by them.
    """

    REFERENCE_RENAMES: ClassVar[tuple[tuple[str, str], ...] | None] = None  # None: no reference network
    TORCHVISION_KEYS: ClassVar[bool] = False
    TIMM_KEYS_UNDER: ClassVar[str | None] = None

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x).logits

    def apply_constraints(self) -> None:
        """Projected back onto the model's weight constraints (e.g. max-norm) after each optimiser step."""


@dataclass(frozen=True)
class StageShape:
    channels: int
    height: int  # 1 for an MLP stage
    width: int
    spatial: bool  # False for B×D (MLP) stages


def run_stages(x: torch.Tensor, stages: nn.ModuleList) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """`x` through each stage's blocks in turn, every block returning (output, its pre-activation).

    Returns the final output, each stage's output, and the pre-activation of each stage's last block.
    """
    outputs, preact = [], []
    for stage in stages:
        for block in stage:
            x, z = block(x)
        outputs.append(x)
        preact.append(z)
    return x, outputs, preact


def stage_shapes(model: StagedModel, in_channels: int, input_size: int) -> list[StageShape]:
    """Shapes of a model's stages at an input size, found by one dry run.

    Methods pick and match stages through this, never by model internals.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(2, in_channels, input_size, input_size, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        out = model.forward_stages(x)
    model.train(was_training)
    shapes = []
    for f in out.stages:
        if f.dim() == 4:
            shapes.append(StageShape(f.shape[1], f.shape[2], f.shape[3], True))
        else:
            shapes.append(StageShape(f.shape[1], 1, 1, False))
    return shapes
