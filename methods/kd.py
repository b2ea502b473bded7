"""Soft targets (Hinton, Vinyals, Dean 2015).

`L = (1-α)·CE(z_s, y) + α·τ²·KL(p_t^τ ‖ p_s^τ)`, KL summed over classes
and averaged over the batch. The τ² keeps the soft term's gradient scale
independent of τ. Papers that write `CE + λ·H(p_t^τ, p_s^τ)` reach the same
optimum with `λ = α / (1 - α)`.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from .base import Distiller, MethodParams, StepInfo, cross_entropy
from .space import FloatRange


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), batch-mean: the soft-target term other methods reuse."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class KDParams(MethodParams):
    temperature: float = Field(4.0, gt=0, description="softmax temperature τ")
    alpha: float = Field(0.9, ge=0, le=1, description="weight α of the soft term; 1-α weighs CE")


class KD(Distiller):
    name = "kd"
    Params = KDParams
    space = {"temperature": FloatRange(1.0, 20.0, log=True), "alpha": FloatRange(0.0, 1.0)}

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo):
        p: KDParams = self.params
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images).logits
        return logits, {
            "loss_ce": (1.0 - p.alpha) * cross_entropy(logits, labels),
            "loss_kd": p.alpha * kd_loss(logits, teacher_logits, p.temperature),
        }
