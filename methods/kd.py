"""Soft targets (Hinton, Vinyals, Dean 2015).

`L = (1-α)·CE(z_s, y) + α·τ²·KL(p_t^τ ‖ p_s^τ)`, KL summed over classes
and averaged over the batch. The τ² keeps the soft term's gradient scale
independent of τ. Papers that write `CE + λ·H(p_t^τ, p_s^τ)` reach the same
optimum with `λ = α / (1 - α)`.

`logit_std=True` (Sun et al., "Logit Standardization in Knowledge
Distillation", CVPR 2024) z-scores each sample's logits over the classes,
student and teacher alike, before the temperature:
`z ↦ (z − mean(z)) / (1e-7 + std(z))`, std with Bessel's correction
(torch's default), as the authors' `normalize` in
sunshangquan/logit-standardization-KD `mdistiller/distillers/KD.py`
@ f6e5aa5. τ then acts as their "base temperature" and the soft term keeps
its τ² (the authors always multiply by τ², and so do we). torchdistill's
`LogitStdKDLoss` (mid_level.py @ 2bc1c18), whose α weighs CE, returns the
bare KL without τ² when that α is 0/None or labels are absent; we do not
follow it: our α = 1 (no CE) still gives `τ²·KL`. The authors' CIFAR recipe with standardisation is
τ = 2 and CE : KD weights 0.1 : 9 (α ≈ 0.989 here, up to an lr scale);
our defaults stay KD's (τ = 4, α = 0.9) and the flag is searchable.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from .base import Distiller, MethodParams, StepInfo, cross_entropy
from .features import promote
from .space import Choice, FloatRange

LOGIT_STD_EPS = 1e-7  # added to the std, as the authors' `normalize` and torchdistill's LogitStdKDLoss


def standardize(logits: torch.Tensor, eps: float = LOGIT_STD_EPS) -> torch.Tensor:
    """Each row's logits z-scored over the classes: `(z − mean) / (eps + std)`, std unbiased (N−1).

    Computed in at least float32 (`promote`), never demoted.
    """
    z = promote(logits)
    return (z - z.mean(dim=1, keepdim=True)) / (eps + z.std(dim=1, keepdim=True))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            logit_std: bool = False) -> torch.Tensor:
    """τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), batch-mean: the soft-target term other methods reuse.

    With `logit_std`, both logits are standardised (`standardize`) before the temperature; τ² stays.
    Computed in at least float32 (`promote`): bf16 log-probabilities under autocast made the KL negative.
    """
    student_logits, teacher_logits = promote(student_logits), promote(teacher_logits)
    if logit_std:
        student_logits, teacher_logits = standardize(student_logits), standardize(teacher_logits)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class KDParams(MethodParams):
    temperature: float = Field(4.0, gt=0, description="softmax temperature τ")
    alpha: float = Field(0.9, ge=0, le=1, description="weight α of the soft term; 1-α weighs CE")
    logit_std: bool = Field(False, description="z-score each sample's logits before the temperature (Sun et al. 2024)")


class KD(Distiller):
    name = "kd"
    Params = KDParams
    teacher_logits_only = True
    reference = ("Hinton et al., NIPS 2014 workshop (arXiv 2015); RepDistiller distiller_zoo/KD.py @ b84f547: "
                 "τ²·KL summed over classes / B, (1−α)·CE + α·KD with RepDistiller's -r 0.1 -a 0.9 T=4; "
                 "logit_std: sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py @ f6e5aa5, τ² kept")
    space = {"temperature": FloatRange(1.0, 20.0, log=True), "alpha": FloatRange(0.0, 1.0),
             "logit_std": Choice((False, True))}

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo):
        p: KDParams = self.params
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images, step)
        return logits, {
            "loss_ce": (1.0 - p.alpha) * cross_entropy(logits, labels),
            "loss_kd": p.alpha * kd_loss(logits, teacher_logits, p.temperature, p.logit_std),
        }
