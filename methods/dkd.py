"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu, Liang, CVPR 2022).

The KD term is split into a target-class part and a non-target part:

- TCKD: KL between the binary distributions `b = [p_y, Σ_{j≠y} p_j]` of the
  teacher and of the student, with `p = softmax(z/T)`;
- NCKD: KL between the teacher's and the student's distributions over the
  non-target classes alone, `p̂_j = softmax_{j≠y}(z_j/T)`.

`L = w_ce·CE(z_s, y) + f(e)·(α·T²·TCKD + β·T²·NCKD)`, each KL summed over
classes and averaged over the batch. `f(e) = min((e+1)/W, 1)` is the linear
warm-up of the distillation term by epoch `e` (0-based; mdistiller's trainer
counts epochs from 1 and uses `min(epoch/WARMUP, 1)`), with `W = warmup ×
total epochs`: the default `warmup = 20/240` is mdistiller's 20 epochs of its
240-epoch CIFAR recipe, and a shorter recipe warms up over the same fraction.
`warmup = 0` switches it off; without a StepInfo (a direct call) `f = 1`.

Reference: megvii-research/mdistiller `mdistiller/distillers/DKD.py` and
`mdistiller/engine/cfg.py` @ a08d46f (CIFAR-100 defaults CE_WEIGHT 1,
ALPHA 1, BETA 8, T 4, WARMUP 20). Conventions kept from it:
- the binary masses are `Σ p·gt_mask` and `Σ p·other_mask` (the second is
  summed, not `1 − p_y`), and TCKD takes `log` of them directly;
- NCKD drops the target class by subtracting 1000 from the target's `z/T`
  (student and teacher) before the softmax, rather than removing the
  column: any logits within ~900 of each other give exactly the masked
  softmax (exp(−1000) underflows to 0 in float32 and float64).
The loss is reported as two terms, `loss_tckd` (f·α·T²·TCKD) and
`loss_nckd` (f·β·T²·NCKD); mdistiller reports their sum as `loss_kd`.

`logit_std=True` (Sun et al., CVPR 2024; sunshangquan/logit-standardization-KD
`mdistiller/distillers/DKD.py` @ f6e5aa5): both logits are z-scored per
sample before dividing by T (`kd.standardize`), T² kept. Their CIFAR recipe
with it multiplies α and β by 9 and sets T = 2; our defaults stay DKD's.

Diagnostics per epoch: `warmup_factor` (f), `tckd` and `nckd` (unweighted, ×T²).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from .base import Distiller, MethodParams, StepInfo, cross_entropy
from .features import promote
from .kd import standardize
from .space import Choice, FloatRange

NON_TARGET_SHIFT = 1000.0  # subtracted from the target class's z/T for NCKD, as mdistiller


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T²·TCKD, T²·NCKD), each a batch-mean KL(teacher ‖ student); unweighted."""
    z_s = promote(student_logits) / temperature
    z_t = promote(teacher_logits) / temperature
    n = z_s.shape[0]
    target = F.one_hot(labels, z_s.shape[1]).to(torch.bool)

    p_s, p_t = z_s.softmax(dim=1), z_t.softmax(dim=1)

    def binary(p: torch.Tensor) -> torch.Tensor:
        return torch.stack([(p * target).sum(1), (p * ~target).sum(1)], dim=1)

    b_s, b_t = binary(p_s), binary(p_t)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") / n

    shift = NON_TARGET_SHIFT * target.to(z_s.dtype)
    log_q_s = F.log_softmax(z_s - shift, dim=1)
    q_t = F.softmax(z_t - shift, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") / n
    return tckd * temperature**2, nckd * temperature**2


def warmup_factor(warmup: float, step: StepInfo | None) -> float:
    """`min((epoch+1) / (warmup·total_epochs), 1)`; 1 without a warm-up or a StepInfo."""
    if step is None or warmup <= 0:
        return 1.0
    return min((step.epoch + 1) / (warmup * step.total_epochs), 1.0)


class DKDParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of CE(z_s, y)")
    alpha: float = Field(1.0, ge=0, description="weight α of TCKD (target vs non-target mass)")
    beta: float = Field(8.0, ge=0, description="weight β of NCKD (among non-target classes)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    warmup: float = Field(20 / 240, ge=0, le=1, description="fraction of epochs over which the KD terms ramp up linearly")
    logit_std: bool = Field(False, description="z-score each sample's logits before the temperature (Sun et al. 2024)")


class DKD(Distiller):
    name = "dkd"
    Params = DKDParams
    teacher_logits_only = True
    reference = ("Zhao et al., Decoupled Knowledge Distillation, CVPR 2022; megvii-research/mdistiller "
                 "mdistiller/distillers/DKD.py @ a08d46f; TCKD and NCKD ×T², NCKD by −1000 on the target logit, "
                 "warm-up over 20/240 of the epochs")
    space = {
        "alpha": FloatRange(0.0, 2.0),
        "beta": FloatRange(0.5, 16.0, log=True),
        "temperature": FloatRange(1.0, 8.0, log=True),
        "logit_std": Choice((False, True)),
    }

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: DKDParams = self.params
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images, step)
        z_s, z_t = (standardize(logits), standardize(teacher_logits)) if p.logit_std else (logits, teacher_logits)
        tckd, nckd = dkd_terms(z_s, z_t, labels, p.temperature)
        f = warmup_factor(p.warmup, step)
        self.record("warmup_factor", f)
        self.record("tckd", tckd.detach())
        self.record("nckd", nckd.detach())
        return logits, {
            "loss_ce": p.ce_weight * cross_entropy(logits, labels),
            "loss_tckd": f * p.alpha * tckd,
            "loss_nckd": f * p.beta * nckd,
        }
