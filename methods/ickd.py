"""Inter-channel correlation KD, ICKD-C (Liu et al., ICCV 2021).

"Exploring Inter-Channel Correlation for Diversity-Preserved Knowledge
Distillation".

The student is taught how the teacher's channels correlate with each other,
not the values of its maps. Per distilled stage pair, a training-only
embedding `e` (a 1×1 conv without bias, then BatchNorm — the reference's
`Embed`) maps the student's B×C_s×H×W map to the teacher's C_t channels;
each map becomes B×C×(H·W) rows and

    G      = F·Fᵀ                         (per sample: C_t×C_t, summed over the H·W positions)
    G̃      = G with each row divided by its L2 norm (F.normalize, ε = 1e-12)
    L_ICKD = Σ_pairs Σ_b ‖G̃_s,b − G̃_t,b‖²_F / (C_t · B)
    L      = CE + α·τ²·KL(p_t^τ ‖ p_s^τ) + β·L_ICKD

Only channel-to-channel correlations are compared, summed over the
positions, so the two maps' H×W may differ and nothing is pooled (the
reference flattens each map as it is). The row normalisation makes G̃
independent of the map's scale and of H·W.

Follows the authors' CIFAR-100 code, ADLab-AutoDrive/ICKD
`Cifar100/distiller_zoo/ICKD.py` (read at commit 403b8d3, the latest;
`Cifar100/train_student.py`, `helper/loops.py`): the loss divides the
summed squares by C·B. torchdistill's `ChSimLoss` (`torchdistill/losses/
mid_level.py` @ 3e4373c, refactored from the authors' ImageNet code)
divides by C·B² instead, i.e. its weight w is our β = w/B; its embedding is
a 3×3 conv + BN. The reference builds a second embedding for the teacher
that its loss never applies; it is left out here (it trains nothing).
Defaults are the authors' CIFAR-100 command (README and
`scripts/run_cifar_distill.sh`): β = 2.5 (`-b 2.5`), α = 0 (`-a 0`,
"ICKD-C (w/o KL)"; `-a 1` is their "ICKD-C" with KL, τ = 4, RepDistiller's
`kd_T`). `stages="last"` (default) distils the last spatial stage of each
network, the reference's `feat[-2]` (the last block's output before
pooling); `stages="all"` sums the loss over every spatial stage pair
matched by relative depth (`features.paired_stages`), one embedding each.

The embeddings are training-only submodules: trained by the student's
optimiser, counted in `extra_params`, never deployed. Spatial only: an
MLP's B×D stages have no positions to correlate channels over, so
`check_pair` refuses a pair where either network has no spatial stage. The
Gram products run with autocast off, in at least float32, never demoted.

Diagnostics per epoch: `ickd_loss`, the unweighted L_ICKD.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, needs_spatial, paired_stages, promote
from .kd import kd_loss
from .space import FloatRange


def channel_correlation(f: torch.Tensor) -> torch.Tensor:
    """B×C×C: each sample's channel Gram matrix over the H·W positions, each row of unit L2 norm."""
    q = f.flatten(2)
    return F.normalize(q @ q.transpose(1, 2), p=2, dim=2)


def ickd_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """Σ over paired maps (the student's already embedded to the teacher's channels) of
    Σ_b ‖G̃_s − G̃_t‖²_F / (C·B), unweighted."""
    with full_precision(student_maps[0].device):
        total = None
        for fs, ft in zip(student_maps, teacher_maps):
            dtype = torch.promote_types(promote(fs).dtype, promote(ft).dtype)
            b, c = fs.shape[:2]
            with torch.no_grad():
                g_t = channel_correlation(ft.to(dtype))
            term = (channel_correlation(fs.to(dtype)) - g_t).pow(2).sum() / (c * b)
            total = term if total is None else total + term
    return total


def ickd_pairs(stages: str, pair: PairInfo) -> list[tuple[int, int]]:
    spatial = paired_stages(pair.student_stages, pair.teacher_stages, spatial_only=True)
    if stages == "last" and spatial:
        s_last = max(i for i, s in enumerate(pair.student_stages) if s.spatial)
        t_last = max(i for i, s in enumerate(pair.teacher_stages) if s.spatial)
        return [(s_last, t_last)]
    return spatial


def _embedding(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


class ICKDParams(MethodParams):
    ickd_weight: float = Field(2.5, ge=0, description="weight β of L_ICKD (the authors' -b 2.5)")
    kd_weight: float = Field(0.0, ge=0, description="weight α of the τ²·KL soft-target term (the authors' -a; "
                                                    "0: ICKD-C w/o KL, 1: ICKD-C)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature τ of the soft-target term")
    stages: Literal["last", "all"] = Field("last", description="last: the last spatial stage of each network; "
                                                                "all: every spatial stage pair, by relative depth")


class ICKD(Distiller):
    name = "ickd"
    Params = ICKDParams
    space = {"ickd_weight": FloatRange(0.25, 25.0, log=True)}
    reference = ("Liu et al., ICCV 2021; ADLab-AutoDrive/ICKD Cifar100/distiller_zoo/ICKD.py @ 403b8d3 on the last "
                 "spatial stage (feat[-2]), 1×1 conv+BN student embedding; row-normalised C×C Gram, squared Frobenius "
                 "difference / (C·B) (torchdistill ChSimLoss divides by C·B²)")

    def __init__(self, student, teacher, params: ICKDParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.pairs = ickd_pairs(params.stages, pair)
        self.embeds = nn.ModuleList(
            _embedding(pair.student_stages[s].channels, pair.teacher_stages[t].channels) for s, t in self.pairs)

    @classmethod
    def check_pair(cls, params: ICKDParams, pair: PairInfo) -> str | None:
        for who, shapes in (("student", pair.student_stages), ("teacher", pair.teacher_stages)):
            if not needs_spatial(shapes):
                return (f"ickd needs spatial feature maps (B×C×H×W) and the {who} has none (its stages are B×D "
                        f"vectors, as in an MLP); use rkd, pkt, sp or cc, which relate flattened embeddings")
        return None

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: ICKDParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        with full_precision(images.device):
            embedded = [e(promote(out.stages[s])) for e, (s, _) in zip(self.embeds, self.pairs)]
        loss = ickd_loss(embedded, [teacher.stages[t] for _, t in self.pairs])
        self.record("ickd_loss", loss.detach())
        losses = {"loss_ce": cross_entropy(out.logits, labels)}
        if p.kd_weight:
            losses["loss_kd"] = p.kd_weight * kd_loss(out.logits, teacher.logits, p.temperature)
        losses["loss_ickd"] = p.ickd_weight * loss
        return out.logits, losses
