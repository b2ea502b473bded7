"""Variational information distillation (Ahn, Hu, Damianou, Lawrence, Dai, CVPR 2019).

VID maximises a variational lower bound on the mutual information between
teacher and student features: per paired stage, a Gaussian
`q(t | s) = N(t; μ(s), σ²)` whose mean `μ` is regressed from the student's
map and whose variance is one learnable value per teacher channel, and the
student minimises its negative log-likelihood:

    μ      = r(F_s)   r: 1×1 conv (C_s→C_t, no bias) · ReLU · 1×1 conv (C_t→C_t) · ReLU · 1×1 conv (C_t→C_t)
    σ²_c   = softplus(α_c) + ε,   ε = 1e-5,   α_c initialised to softplus⁻¹(σ²₀ − ε) so that σ² starts at σ²₀
    NLL    = mean over b, c, h, w of ½·((F_t − μ)² / σ²_c + log σ²_c)
    L      = CE + β·Σ_pairs NLL

(the constant ½·log 2π of the Gaussian is left out, as in the reference).
Where the two maps' H×W differ, the larger one is average-pooled to the
other's before `r` (`features.pool_to_match`; the reference pools by H, the
same for square maps). `r` and the α's are training-only (extra params),
trained by the student's optimiser as RepDistiller trains them (its
`trainable_list` holds the VIDLoss modules); never deployed.

Follows RepDistiller `distiller_zoo/VID.py` @ b84f547 (the authors' code,
"VIDLoss(s, t, t)": the middle width is the teacher's channels): σ²₀ = 5,
ε = 1e-5, β = 1 (RepDistiller's `-b 1` for CIFAR-100, mdistiller's
FEAT_WEIGHT). mdistiller (`mdistiller/distillers/VID.py` @ a08d46f) keeps
its α's in a plain list, so they are neither trained nor saved there; here
they are parameters, trained and checkpointed, as in RepDistiller. Stages:
RepDistiller uses `feat[1:-1]`, every residual group's output; here every
spatial stage, paired by relative depth among spatial stages. Spatial only:
`check_pair` refuses a pair where either network has no spatial stage. The
NLL is computed with autocast off, in at least float32, never demoted.
NLL can be negative once σ² < 1.

Diagnostics per epoch: `vid_nll`, the unweighted Σ NLL, and `vid_variance`,
the mean σ² over all distilled channels.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, needs_spatial, paired_stages, pool_to_match, promote
from .space import FloatRange

EPS = 1e-5


def inverse_softplus(y: float) -> float:
    """α with softplus(α) = y."""
    return math.log(math.expm1(y))


def variance(alpha: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return F.softplus(alpha) + eps


def gaussian_nll(mean: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """mean over every element of ½·((target − mean)²/σ²_c + log σ²_c), σ²_c = softplus(α_c) + ε per channel."""
    with full_precision(mean.device):
        dtype = torch.promote_types(torch.promote_types(promote(mean).dtype, promote(target).dtype), alpha.dtype)
        var = variance(alpha.to(dtype), eps).view(1, -1, 1, 1)
        return (0.5 * ((target.to(dtype) - mean.to(dtype)).pow(2) / var + var.log())).mean()


def regressor(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 1, bias=False), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 1, bias=False),
    )


class VIDParams(MethodParams):
    vid_weight: float = Field(1.0, ge=0, description="weight β of the summed NLL")
    init_pred_var: float = Field(5.0, gt=EPS, description="σ²₀, the initial variance of every teacher channel")


class VID(Distiller):
    name = "vid"
    Params = VIDParams
    space = {"vid_weight": FloatRange(0.1, 10.0, log=True), "init_pred_var": FloatRange(0.5, 50.0, log=True)}
    reference = ("Ahn et al., CVPR 2019; RepDistiller distiller_zoo/VID.py @ b84f547 on every spatial stage pair "
                 "(larger map avg-pooled); 1×1-conv mean regressor, per-channel softplus variance + 1e-5, σ²₀=5")

    def __init__(self, student, teacher, params: VIDParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.pairs = paired_stages(pair.student_stages, pair.teacher_stages, spatial_only=True)
        channels = [(pair.student_stages[s].channels, pair.teacher_stages[t].channels) for s, t in self.pairs]
        self.regressors = nn.ModuleList(regressor(cs, ct) for cs, ct in channels)
        alpha0 = inverse_softplus(params.init_pred_var - EPS)
        self.alphas = nn.ParameterList(nn.Parameter(torch.full((ct,), alpha0)) for _, ct in channels)

    @classmethod
    def check_pair(cls, params: VIDParams, pair: PairInfo) -> str | None:
        for who, shapes in (("student", pair.student_stages), ("teacher", pair.teacher_stages)):
            if not needs_spatial(shapes):
                return (f"vid needs spatial feature maps (B×C×H×W) for its 1×1-conv regressors and the {who} has "
                        f"none (its stages are B×D vectors, as in an MLP); use rkd, pkt, sp or cc")
        return None

    def vid_loss(self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        """Σ over the paired maps of the Gaussian NLL of the teacher's map under the regressed mean, unweighted."""
        total = None
        for r, alpha, fs, ft in zip(self.regressors, self.alphas, student_maps, teacher_maps):
            fs, ft = pool_to_match(fs, ft)
            term = gaussian_nll(r(fs), ft, alpha)
            total = term if total is None else total + term
        return total

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: VIDParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        loss = self.vid_loss([out.stages[s] for s, _ in self.pairs], [teacher.stages[t] for _, t in self.pairs])
        self.record("vid_nll", loss.detach())
        with torch.no_grad():
            self.record("vid_variance", torch.cat([variance(a) for a in self.alphas]).mean())
        return out.logits, {"loss_ce": cross_entropy(out.logits, labels), "loss_vid": p.vid_weight * loss}
