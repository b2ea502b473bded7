"""FitNets hints (Romero et al. 2015).

A regressor `r` maps the student's guided stage `g` to the shape of the
teacher's hint stage `h`, and the hint loss is

    L_hint = ½·mean((F_t^h − r(F_s^g))²)        (mean over every element)

`r` is a 3×3 (or 1×1, `regressor_kernel`) conv + BN between spatial stages.
It has no output non-linearity: the contract's stage activation differs by
model (ReLU, linear bottlenecks), and a linear `r` can reach any target.
Where the two maps' H×W differ, `r`'s output or the teacher's map, whichever
is larger, is average-pooled to the other. Where either stage is a B×D
vector (an MLP), both sides are flattened and `r` is one Linear layer, so
MLP pairs and CNN↔MLP pairs work too. `r` is a training-only submodule:
trained by the student's optimiser, reported as extra params, never deployed.

Stages are chosen by index into the models' stage lists; by default the
middle stage of each network, `(n-1)//2`, as in the paper (the earlier of
the two middles when the count is even: a deeper guided layer regularises
more of the student).

- `stages=1`: `L = (1-α)·CE + α·τ²·KL(p_t^τ ‖ p_s^τ) + β·L_hint` throughout.
  The defaults (α=0, β=200) are RepDistiller's / mdistiller's FitNet
  configuration, `CE + 100·MSE` (they have no ½), the "FitNet" column of
  the reference table.
- `stages=2` (the paper): for the first `round(hint_epochs·epochs)` epochs
  (rounded half up) `L = β·L_hint` alone, so only the student up to the
  guided stage and `r` get gradients (later layers have none and the
  optimiser skips them, weight decay included); then `(1-α)·CE + α·kd`.
  Set α > 0 for the paper's stage 2 (its KD); with α=0 stage 2 is CE alone.
  `hint_epochs` defaults to 0.125, RepDistiller's 30 of 240 epochs of
  initialisation for its two-stage methods.

Diagnostics per epoch: `hint_loss` (unweighted ½·MSE, also measured in the
second stage of `stages=2`, where it is not trained) and `stage` (1 or 2).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from kdarena.zoo.models import StageShape

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import pool_to_match, promote, resolve_stage
from .kd import kd_loss
from .space import Choice, FloatRange


class FitNetsParams(MethodParams):
    hint_weight: float = Field(200.0, ge=0, description="weight β of ½·MSE (200 = RepDistiller's 100·MSE)")
    hint_epochs: float = Field(0.125, ge=0, lt=1, description="stages=2: fraction of epochs on hints alone")
    temperature: float = Field(4.0, gt=0, description="softmax temperature τ of the kd term")
    alpha: float = Field(0.0, ge=0, le=1, description="weight α of the kd term; 1-α weighs CE")
    stages: Literal[1, 2] = Field(1, description="1: CE/kd + hint; 2: hint, then CE/kd (the paper)")
    student_stage: int | None = Field(None, description="guided stage index; default the middle")
    teacher_stage: int | None = Field(None, description="hint stage index; default the middle")
    regressor_kernel: Literal[1, 3] = Field(3, description="kernel size of the conv regressor between spatial stages")


def middle_stage(n: int) -> int:
    return (n - 1) // 2


def hint_stage_epochs(hint_epochs: float, total_epochs: int) -> int:
    """Epochs of the hint-only stage: `hint_epochs·total` rounded half up (Python's round would send 0.5 to 0)."""
    return int(hint_epochs * total_epochs + 0.5)


def _stage_index(index: int | None, shapes: list[StageShape], who: str) -> int:
    return middle_stage(len(shapes)) if index is None else resolve_stage(index, shapes, who)


def _regressor(s: StageShape, t: StageShape, kernel: int) -> nn.Module:
    if s.spatial and t.spatial:
        return nn.Sequential(nn.Conv2d(s.channels, t.channels, kernel, padding=kernel // 2, bias=False),
                             nn.BatchNorm2d(t.channels))
    return nn.Linear(s.channels * s.height * s.width, t.channels * t.height * t.width)


class FitNets(Distiller):
    name = "fitnets"
    Params = FitNetsParams
    reference = ("Romero et al., ICLR 2015; RepDistiller distiller_zoo/FitNet.py @ b84f547 (MSE, -b 100, hint layer 2): "
                 "our hint is ½·MSE, so hint_weight 200 = their 100; regressor conv+BN without their ReLU; "
                 "stages=2 is the paper's hint-then-KD training")
    space = {
        "hint_weight": FloatRange(1.0, 1000.0, log=True),
        "hint_epochs": FloatRange(0.0, 0.3),
        "temperature": FloatRange(1.0, 20.0, log=True),
        "alpha": FloatRange(0.0, 1.0),
        "stages": Choice((1, 2)),
    }

    def __init__(self, student, teacher, params: FitNetsParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.student_stage = _stage_index(params.student_stage, pair.student_stages, "the student")
        self.teacher_stage = _stage_index(params.teacher_stage, pair.teacher_stages, "the teacher")
        s, t = pair.student_stages[self.student_stage], pair.teacher_stages[self.teacher_stage]
        self.spatial = s.spatial and t.spatial
        self.regressor = _regressor(s, t, params.regressor_kernel)

    @classmethod
    def check_pair(cls, params: FitNetsParams, pair: PairInfo) -> str | None:
        try:
            _stage_index(params.student_stage, pair.student_stages, "the student")
            _stage_index(params.teacher_stage, pair.teacher_stages, "the teacher")
        except ValueError as exc:
            return f"{exc}; set method.params.student_stage / teacher_stage to existing stages"
        return None

    def hint_loss(self, guided: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        """½·mean((hint − r(guided))²), after bringing both to one shape."""
        if self.spatial:
            pred, target = pool_to_match(self.regressor(guided), hint)
        else:
            pred, target = self.regressor(guided.flatten(1)), hint.flatten(1)
        dtype = torch.promote_types(promote(pred).dtype, promote(target).dtype)
        return 0.5 * F.mse_loss(pred.to(dtype), target.to(dtype))

    def classifier_free_epochs(self, total_epochs: int) -> int:
        p: FitNetsParams = self.params
        return hint_stage_epochs(p.hint_epochs, total_epochs) if p.stages == 2 else 0

    def in_hint_stage(self, step: StepInfo) -> bool:
        p: FitNetsParams = self.params
        return p.stages == 2 and step.epoch < hint_stage_epochs(p.hint_epochs, step.total_epochs)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo):
        p: FitNetsParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        guided, hint = out.stages[self.student_stage], teacher.stages[self.teacher_stage]

        if self.in_hint_stage(step):
            hint_loss = self.hint_loss(guided, hint)
            self.record("stage", 1)
            self.record("hint_loss", hint_loss.detach())
            return out.logits, {"loss_hint": p.hint_weight * hint_loss}

        losses = {
            "loss_ce": (1.0 - p.alpha) * cross_entropy(out.logits, labels),
            "loss_kd": p.alpha * kd_loss(out.logits, teacher.logits, p.temperature),
        }
        if p.stages == 1:
            hint_loss = self.hint_loss(guided, hint)
            losses["loss_hint"] = p.hint_weight * hint_loss
        else:
            # still measured, untrained: shows how far stage 2 drifts from the hint
            with torch.no_grad():
                hint_loss = self.hint_loss(guided, hint)
        self.record("stage", p.stages)
        self.record("hint_loss", hint_loss.detach())
        return out.logits, losses
