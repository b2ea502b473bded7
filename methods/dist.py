"""DIST: Knowledge Distillation from A Stronger Teacher (Huang, You, Wang, Qian, Xu, NeurIPS 2022).

Relations instead of exact probabilities. With `Y = softmax(z/τ)` (B×C) for
student and teacher and the Pearson correlation `ρ(a, b)` of two vectors
(cosine similarity of the mean-centred vectors),

    inter = 1 − (1/B)·Σ_i ρ(Y_s[i, :], Y_t[i, :])     (each sample's class ranking)
    intra = 1 − (1/C)·Σ_c ρ(Y_s[:, c], Y_t[:, c])     (each class across the batch)

    L = w_ce·CE(z_s, y) + β·τ²·inter + γ·τ²·intra

Reference: the authors' hunto/image_classification_sota
`lib/models/losses/dist_kd.py` and `configs/strategies/distill/dist_cifar.yaml`
@ d9662f7 (the DIST_KD repository's `classification` submodule; HEAD
6f7a70a has the same two files). Their CIFAR-100 recipe is `kd: dist_t4`,
i.e. `DIST(beta=1, gamma=1, tau=4)`, with `kd_loss_weight: 2` and
`ori_loss_weight: 1`: our defaults β = γ = 2, τ = 4, w_ce = 1 (the paper's
ImageNet values are β = γ = 1). τ² is in their code (`tau**2 * ...`).

Epsilon: the authors' cosine similarity *adds* ε = 1e-8 to the product of
the norms, `a·b / (‖a‖‖b‖ + ε)`; torchdistill's `DISTLoss` (mid_level.py
@ 2bc1c18) calls `torch.nn.functional.cosine_similarity`, which *clamps*
(each norm to at least ε in current torch). We follow the authors: the add.
The two differ where ‖a‖‖b‖ is not far above ε, i.e. where a centred
probability vector barely varies: with a very confident teacher at τ = 1
each class's probability moves by ~1e-5 across the batch, and the add
shrinks those columns' correlations towards 0, so intra stays near 1 even
for a student equal to the teacher (torchdistill's clamp gives 0 there).
At the CIFAR τ = 4 the difference is ~1e-7 relative.

`logit_std=True` (Sun et al., CVPR 2024): both logits z-scored per sample
before the temperature (`kd.standardize`), τ² kept. The logit-standardisation
authors did not apply it to DIST; this is the same pre-process on DIST's input.

Diagnostics per epoch: `inter` and `intra` (unweighted, without τ²).
"""

from __future__ import annotations

import torch
from pydantic import Field

from .base import Distiller, MethodParams, StepInfo, cross_entropy
from .features import promote
from .kd import standardize
from .space import Choice, FloatRange

DIST_EPS = 1e-8  # added to ‖a‖·‖b‖, as the authors' cosine_similarity


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = DIST_EPS) -> torch.Tensor:
    """Per row, the Pearson correlation of `a[i]` and `b[i]`: centred dot / (‖·‖‖·‖ + eps)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float,
               eps: float = DIST_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra) relation losses of softmax(z/τ), unweighted and without τ²."""
    y_s = (promote(student_logits) / tau).softmax(dim=1)
    y_t = (promote(teacher_logits) / tau).softmax(dim=1)
    inter = 1.0 - pearson_rows(y_s, y_t, eps).mean()
    intra = 1.0 - pearson_rows(y_s.t(), y_t.t(), eps).mean()
    return inter, intra


class DISTParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of CE(z_s, y)")
    beta: float = Field(2.0, ge=0, description="weight β of the inter-class relation (×τ²)")
    gamma: float = Field(2.0, ge=0, description="weight γ of the intra-class relation (×τ²)")
    tau: float = Field(4.0, gt=0, description="softmax temperature τ")
    logit_std: bool = Field(False, description="z-score each sample's logits before the temperature (Sun et al. 2024)")


class DIST(Distiller):
    name = "dist"
    Params = DISTParams
    teacher_logits_only = True
    reference = ("Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022; hunto/image_classification_sota "
                 "lib/models/losses/dist_kd.py @ d9662f7 (dist_cifar.yaml: tau 4, kd weight 2); ×τ², ε added to ‖a‖‖b‖")
    space = {
        "beta": FloatRange(0.25, 8.0, log=True),
        "gamma": FloatRange(0.25, 8.0, log=True),
        "tau": FloatRange(1.0, 8.0, log=True),
        "logit_std": Choice((False, True)),
    }

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: DISTParams = self.params
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images, step)
        z_s, z_t = (standardize(logits), standardize(teacher_logits)) if p.logit_std else (logits, teacher_logits)
        inter, intra = dist_terms(z_s, z_t, p.tau)
        self.record("inter", inter.detach())
        self.record("intra", intra.detach())
        return logits, {
            "loss_ce": p.ce_weight * cross_entropy(logits, labels),
            "loss_inter": p.beta * p.tau**2 * inter,
            "loss_intra": p.gamma * p.tau**2 * intra,
        }
