"""Relational knowledge distillation (Park, Kim, Lu, Cho, CVPR 2019), distance- and angle-wise.

RKD transfers the geometry of a batch rather than each sample's features.
On the penultimate embeddings `e_i` (B×D; the last stage, global-average-
pooled to a vector when it is a spatial map, as RepDistiller's `feat[-1]`
and mdistiller's `pooled_feat`; an MLP's last hidden layer as it is):

    ψ_D(i, j)    = ‖e_i − e_j‖₂ / μ,   μ = mean of the positive distances in the batch
    ψ_A(i, j, k) = ⟨(e_j − e_i)/‖e_j − e_i‖, (e_k − e_i)/‖e_k − e_i‖⟩   (0 when a difference is 0)
    L_D = mean over all B² pairs (i, j)     of smooth-L1(ψ_D^s − ψ_D^t)
    L_A = mean over all B³ triplets (i, j, k) of smooth-L1(ψ_A^s − ψ_A^t)
    L   = CE + β·(w_d·L_D + w_a·L_A)

Convention (RepDistiller `distiller_zoo/RKD.py` @ b84f547, the same code
in mdistiller `mdistiller/distillers/RKD.py` @ a08d46f and torchdistill's
`RKDLoss`): the means run over all B² pairs and B³ triplets, degenerate ones
included — the diagonal (i = j) and the triplets with a repeated index add 0
to the sums but count in the denominators, so `L_D` is (B−1)/B of the mean
over distinct pairs and `L_A` is (B−1)(B−2)/B² of the mean over distinct
triplets. Distances are `sqrt(clamp(‖e_i‖² + ‖e_j‖² − 2⟨e_i, e_j⟩, 1e-12))`
with a zero diagonal, as the reference computes them; smooth-L1 has β=1.
The teacher's potentials carry no gradient. Defaults: w_d=25, w_a=50 (the
paper's and the reference's), β=1 (RepDistiller's `-b 1` for CIFAR-100;
mdistiller's FEAT_WEIGHT 1). Deviation: where no distance in a batch is
positive (a batch of one sample, or all embeddings equal) the reference
divides by the mean of an empty set (NaN); here L_D is 0 there. The products
run with autocast off, in at least float32 (`promote`), never demoted.

Diagnostics per epoch: `rkd_distance` and `rkd_angle`, the unweighted L_D and L_A.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, pooled_embedding, promote
from .space import FloatRange


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """B×B Euclidean distances from the expanded square (clamped at 1e-12 before the root), zero diagonal."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def distance_potential(e: torch.Tensor) -> torch.Tensor:
    """ψ_D: distances over the mean positive distance (zeros where none is positive)."""
    d = pairwise_distances(e)
    positive = d > 0
    mean = (d * positive).sum() / positive.sum().clamp(min=1)
    return d / mean.clamp(min=1e-12)


def angle_potential(e: torch.Tensor) -> torch.Tensor:
    """ψ_A as a B×B×B tensor: [i, j, k] is the cosine of the angle at e_i between e_j and e_k."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [i, j] = unit(e_j − e_i)
    return diff @ diff.transpose(1, 2)


def rkd_losses(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_D, L_A), unweighted, on two B×D embeddings (any D each)."""
    with full_precision(student.device):
        dtype = torch.promote_types(promote(student).dtype, promote(teacher).dtype)
        s, t = student.flatten(1).to(dtype), teacher.flatten(1).to(dtype)
        with torch.no_grad():
            t_d, t_a = distance_potential(t), angle_potential(t)
        loss_d = F.smooth_l1_loss(distance_potential(s), t_d)
        loss_a = F.smooth_l1_loss(angle_potential(s), t_a)
    return loss_d, loss_a


class RKDParams(MethodParams):
    rkd_weight: float = Field(1.0, ge=0, description="overall weight β of w_d·L_D + w_a·L_A (RepDistiller's -b)")
    distance_weight: float = Field(25.0, ge=0, description="w_d, weight of the distance-wise loss")
    angle_weight: float = Field(50.0, ge=0, description="w_a, weight of the angle-wise loss")


class RKD(Distiller):
    name = "rkd"
    Params = RKDParams
    # β only rescales w_d and w_a together: the two span every scale, a third would be a redundant direction
    space = {"distance_weight": FloatRange(2.5, 250.0, log=True), "angle_weight": FloatRange(5.0, 500.0, log=True)}
    reference = ("Park et al., CVPR 2019; RepDistiller distiller_zoo/RKD.py @ b84f547 on the pooled penultimate "
                 "embedding; means over all B² pairs and B³ triplets, degenerate ones included")

    @classmethod
    def check_pair(cls, params: RKDParams, pair: PairInfo) -> str | None:
        return None  # relations between samples: any embedding widths, spatial or not

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: RKDParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        loss_d, loss_a = rkd_losses(pooled_embedding(out.stages[-1]), pooled_embedding(teacher.stages[-1]))
        self.record("rkd_distance", loss_d.detach())
        self.record("rkd_angle", loss_a.detach())
        return out.logits, {
            "loss_ce": cross_entropy(out.logits, labels),
            "loss_rkd": p.rkd_weight * (p.distance_weight * loss_d + p.angle_weight * loss_a),
        }
