"""Similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019).

Inputs that the teacher maps to similar activations should be mapped to
similar activations by the student. Per distilled stage, each B×… map is
flattened to B×(C·H·W) and

    G      = Q·Qᵀ                          (B×B Gram matrix of the batch)
    G̃      = G with each row divided by its L2 norm
    L_SP   = Σ_stages ‖G̃_t − G̃_s‖²_F / B²
    L      = CE + γ·L_SP

Only sample-to-sample similarities are compared, so channel counts and
H×W may differ between student and teacher: nothing is pooled or
projected (as the reference flattens each map as it is), and MLP stages
(B×D) serve as well as maps.

Follows RepDistiller `distiller_zoo/SP.py` @ b84f547 ("verified by
original author"; identical in mdistiller `mdistiller/distillers/SP.py` @
a08d46f): row normalisation with F.normalize's ε=1e-12, the squared
Frobenius norm over B². γ = 3000 is RepDistiller's `-b 3000` for CIFAR-100
(mdistiller's FEAT_WEIGHT). `stages="last"` (the default) distils the last
stage of each network, RepDistiller's `feat[-2]` (the last stage's output
before pooling; mdistiller's `feats[-1]`); `stages="all"` sums the loss
over every stage pair matched by relative depth (`features.paired_stages`):
the paper writes L_SP as a sum over a chosen set of layer pairs.
The Gram products run with autocast off, in at least float32, never demoted.

Diagnostics per epoch: `sp_loss`, the unweighted L_SP.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, paired_stages, promote
from .space import Choice, FloatRange


def normalised_gram(f: torch.Tensor) -> torch.Tensor:
    """B×B: the batch's Gram matrix of flattened features, each row of unit L2 norm."""
    q = f.flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """Σ over paired maps of ‖G̃_t − G̃_s‖²_F / B², unweighted."""
    with full_precision(student_maps[0].device):
        total = None
        for fs, ft in zip(student_maps, teacher_maps):
            dtype = torch.promote_types(promote(fs).dtype, promote(ft).dtype)
            with torch.no_grad():
                g_t = normalised_gram(ft.to(dtype))
            term = (g_t - normalised_gram(fs.to(dtype))).pow(2).sum() / fs.shape[0] ** 2
            total = term if total is None else total + term
    return total


def sp_pairs(stages: str, pair: PairInfo) -> list[tuple[int, int]]:
    if stages == "last":
        return [(len(pair.student_stages) - 1, len(pair.teacher_stages) - 1)]
    return paired_stages(pair.student_stages, pair.teacher_stages)


class SPParams(MethodParams):
    sp_weight: float = Field(3000.0, ge=0, description="weight γ of L_SP")
    stages: Literal["last", "all"] = Field("last", description="last: the last stage of each network; "
                                                                "all: every stage pair, matched by relative depth")


class SP(Distiller):
    name = "sp"
    Params = SPParams
    space = {"sp_weight": FloatRange(300.0, 30000.0, log=True), "stages": Choice(("last", "all"))}
    reference = ("Tung & Mori, ICCV 2019; RepDistiller distiller_zoo/SP.py @ b84f547 on the last stage (feat[-2]); "
                 "row-normalised B×B Gram, squared Frobenius difference / B²")

    def __init__(self, student, teacher, params: SPParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.pairs = sp_pairs(params.stages, pair)

    @classmethod
    def check_pair(cls, params: SPParams, pair: PairInfo) -> str | None:
        return None  # B×B similarities of flattened stages: any shapes, spatial or not

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: SPParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        loss = sp_loss([out.stages[s] for s, _ in self.pairs], [teacher.stages[t] for _, t in self.pairs])
        self.record("sp_loss", loss.detach())
        return out.logits, {"loss_ce": cross_entropy(out.logits, labels), "loss_sp": p.sp_weight * loss}
