"""Attention transfer (Zagoruyko & Komodakis 2017), activation-based.

The spatial attention of a B×C×H×W map is the channel mean of |F|^p,
flattened and normalised to unit L2 norm per sample:

    Q(F) = vec(mean_c |F_c|^p) / ‖vec(mean_c |F_c|^p)‖₂
    L_AT = Σ_l mean_{b, positions} (Q(F_s^l) − Q(F_t^l))²
    L    = CE + β/2 · L_AT

β/2 is the paper's form (its β = 10³ is the default here). The authors'
code (szagoruyko/attention-transfer cifar.py @ 893df54) and RepDistiller
(distiller_zoo/AT.py @ b84f547) write `CE + β·L_AT` with β=1000, which is
β=2000 here.
Stages are paired by relative depth among the spatial stages only
(`features.paired_stages`); where a pair's H×W differ, the larger feature
map is average-pooled to the smaller before Q, as in the reference code.
Channel counts need not match: Q averages them away, so AT has no
training-only parameters. Q is computed in float32 (bf16 loses the small
differences between unit-norm maps that the loss is made of).

Diagnostics per epoch: `at_loss`, the unweighted L_AT (comparable across β).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import needs_spatial, paired_stages, pool_to_match, promote
from .space import Choice, FloatRange


def attention_map(f: torch.Tensor, p: int) -> torch.Tensor:
    """Q(F): B×(H·W), each row of unit L2 norm."""
    return F.normalize(promote(f).abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], p: int) -> torch.Tensor:
    """Σ over paired maps of mean((Q_s − Q_t)²), unweighted."""
    total = torch.zeros((), device=student_maps[0].device)
    for fs, ft in zip(student_maps, teacher_maps):
        fs, ft = pool_to_match(fs, ft)
        total = total + (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()
    return total


class ATParams(MethodParams):
    at_weight: float = Field(1000.0, ge=0, description="weight β; the loss adds β/2·L_AT (the authors' convention)")
    p: Literal[1, 2, 4] = Field(2, description="power p in mean_c |F_c|^p")


class AT(Distiller):
    name = "at"
    Params = ATParams
    reference = ("Zagoruyko & Komodakis, ICLR 2017; szagoruyko/attention-transfer utils.py @ 893df54 and RepDistiller "
                 "distiller_zoo/AT.py @ b84f547 (mean((Q_s−Q_t)²), larger map pooled): we add the paper's β/2·L_AT, "
                 "their code adds β·L_AT with β=1000, i.e. at_weight 2000 here")
    space = {"at_weight": FloatRange(10.0, 1e4, log=True), "p": Choice((1, 2, 4))}

    def __init__(self, student, teacher, params: ATParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.pairs = paired_stages(pair.student_stages, pair.teacher_stages, spatial_only=True)

    @classmethod
    def check_pair(cls, params: ATParams, pair: PairInfo) -> str | None:
        for who, shapes in (("student", pair.student_stages), ("teacher", pair.teacher_stages)):
            if not needs_spatial(shapes):
                return (f"attention transfer needs spatial feature maps and the {who} has none "
                        f"(its stages are B×D vectors, as in an MLP); use kd, fitnets or adversarial")
        return None

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo):
        p: ATParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        loss = at_loss([out.stages[s] for s, _ in self.pairs], [teacher.stages[t] for _, t in self.pairs], p.p)
        self.record("at_loss", loss.detach())
        return out.logits, {"loss_ce": cross_entropy(out.logits, labels), "loss_at": p.at_weight / 2 * loss}
