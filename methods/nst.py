"""Neuron selectivity transfer (Huang & Wang, "Like what you like", 2017).

Each channel's activation over the H×W positions is one sample of a
distribution over "neuron selectivity patterns"; NST matches the student's
distribution to the teacher's with the squared maximum mean discrepancy
under the degree-2 polynomial kernel `k(x, y) = (xᵀy)²`. Per stage pair,
with the larger map average-pooled to the smaller's H×W first
(`features.pool_to_match`; the reference pools by H, for square maps the
same), each B×C×H×W map becomes B×C rows `f_i` of H·W values, each row
scaled to unit L2 norm, and

    MMD² = mean_{i,i'} k(f^t_i, f^t_i') + mean_{j,j'} k(f^s_j, f^s_j') − 2·mean_{i,j} k(f^s_j, f^t_i)
    L    = CE + λ·Σ_pairs MMD²

each mean over the batch and every channel pair (C_t², C_s², C_s·C_t
entries per sample), so student and teacher channel counts may differ. The
teacher-only term is constant (no gradient), kept so that the loss is the
full MMD² (≥ 0, 0 when the distributions agree), as the reference's
`full_loss=True`.

Follows RepDistiller `distiller_zoo/NST.py` @ b84f547 (identical in
mdistiller `mdistiller/distillers/NST.py` @ a08d46f): normalisation with
F.normalize's ε=1e-12, the plain means above. λ = 50 is RepDistiller's
`-b 50` for CIFAR-100 (mdistiller's FEAT_WEIGHT). Stages: RepDistiller uses
`feat[1:-1]`, every residual group's output; here every spatial stage,
paired by relative depth among spatial stages (`features.paired_stages`).
Spatial only: an MLP's B×D stages have no positions to form a distribution,
so `check_pair` refuses a pair where either network has no spatial stage.
The products run with autocast off, in at least float32, never demoted.

Diagnostics per epoch: `nst_loss`, the unweighted Σ MMD².
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, needs_spatial, paired_stages, pool_to_match, promote
from .space import FloatRange


def selectivity(f: torch.Tensor) -> torch.Tensor:
    """B×C×(H·W): each channel's activations over the positions, scaled to unit L2 norm."""
    return F.normalize(f.flatten(2), p=2, dim=2)


def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and all channel pairs of (aᵀb)², for B×Ca×N and B×Cb×N rows."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


def nst_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """Σ over paired maps of the polynomial-kernel MMD² between channel selectivities, unweighted."""
    with full_precision(student_maps[0].device):
        total = None
        for fs, ft in zip(student_maps, teacher_maps):
            dtype = torch.promote_types(promote(fs).dtype, promote(ft).dtype)
            fs, ft = pool_to_match(fs.to(dtype), ft.to(dtype))
            s, t = selectivity(fs), selectivity(ft)
            with torch.no_grad():
                tt = poly_kernel_mean(t, t)
            term = tt + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)
            total = term if total is None else total + term
    return total


class NSTParams(MethodParams):
    nst_weight: float = Field(50.0, ge=0, description="weight λ of the summed MMD²")


class NST(Distiller):
    name = "nst"
    Params = NSTParams
    space = {"nst_weight": FloatRange(5.0, 500.0, log=True)}
    reference = ("Huang & Wang 2017; RepDistiller distiller_zoo/NST.py @ b84f547 on every spatial stage pair "
                 "(larger map avg-pooled); degree-2 polynomial MMD², plain means over batch and channel pairs")

    def __init__(self, student, teacher, params: NSTParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.pairs = paired_stages(pair.student_stages, pair.teacher_stages, spatial_only=True)

    @classmethod
    def check_pair(cls, params: NSTParams, pair: PairInfo) -> str | None:
        for who, shapes in (("student", pair.student_stages), ("teacher", pair.teacher_stages)):
            if not needs_spatial(shapes):
                return (f"nst needs spatial feature maps (B×C×H×W) and the {who} has none (its stages are B×D "
                        f"vectors, as in an MLP); use rkd, pkt, sp or cc, which relate flattened embeddings")
        return None

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: NSTParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        loss = nst_loss([out.stages[s] for s, _ in self.pairs], [teacher.stages[t] for _, t in self.pairs])
        self.record("nst_loss", loss.detach())
        return out.logits, {"loss_ce": cross_entropy(out.logits, labels), "loss_nst": p.nst_weight * loss}
