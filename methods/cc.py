"""Correlation congruence (Peng et al., ICCV 2019), with training-only embedding heads.

The penultimate embeddings (the last stage, global-average-pooled when it
is a spatial map, as RepDistiller's `feat[-1]`; an MLP's last hidden layer
as it is) go through one linear embedding head per network, `z = W·e + b`
to `feat_dim` (128) units — RepDistiller's `LinearEmbed`, torchdistill's
`Linear4CCKD`. Both heads are training-only submodules, trained by the
student's optimiser (the teacher's head too: the teacher's features are
frozen, its head is not, as in both references); never deployed. Then
`L = CE + β·L_CC` with, by `kernel`:

- `adjacent` (default; RepDistiller `distiller_zoo/CC.py` @ b84f547, the
  code the authors shared with RepDistiller's author, the one behind its
  CIFAR-100 table): with `δ_i = |z^s_i − z^t_i|` (element-wise),

      L_CC = 1/(B−1) · Σ_{i=1}^{B−1} Σ_d δ_{i,d} · δ_{i+1,d}

  It multiplies the residuals of *adjacent* samples of the batch, so it
  DEPENDS ON THE BATCH ORDER: the engine shuffles each epoch, which makes it
  a random-pair estimate. β = 0.02 is RepDistiller's `-b 0.02`.
  Deviation: a batch of one sample has no adjacent pair; its L_CC is 0
  (the reference takes the mean of an empty set, NaN).
- `gaussian` / `bilinear` (the published loss, as torchdistill's
  `CCKDLoss` @ 3e4373c computes it): a B×B correlation matrix over all pairs,
  `K_ij = exp(−2γ)·Σ_{p=0}^{P} (2γ)^p/p! · ⟨z_i, z_j⟩^p` (the order-P Taylor
  expansion of the Gaussian RBF `exp(−γ‖z_i − z_j‖²)`, exact for unit-norm
  z, which neither torchdistill nor this code enforces) or `K_ij = ⟨z_i, z_j⟩`,
  and `L_CC = ‖K^s − K^t‖_F / B²` (torchdistill's `torch.dist`: the norm,
  not its square). Invariant to the order of the batch. γ = 0.4, P = 2 are
  torchdistill's ImageNet configuration (its weight there is 0.003; β keeps
  RepDistiller's 0.02 whatever the kernel).

Products run with autocast off, in at least float32, never demoted.
Diagnostics per epoch: `cc_loss`, the unweighted L_CC.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, pooled_embedding, promote
from .space import FloatRange


def correlation_matrix(z: torch.Tensor, kernel: str, gamma: float, order: int) -> torch.Tensor:
    """B×B: the bilinear kernel ⟨z_i, z_j⟩, or the order-P Taylor expansion of the Gaussian RBF."""
    dot = z @ z.t()
    if kernel == "bilinear":
        return dot
    total = torch.ones_like(dot)
    for p in range(1, order + 1):
        total = total + (2 * gamma) ** p / math.factorial(p) * dot.pow(p)
    return math.exp(-2 * gamma) * total


def cc_loss(student: torch.Tensor, teacher: torch.Tensor, kernel: str = "adjacent", gamma: float = 0.4,
            order: int = 2) -> torch.Tensor:
    """L_CC between two B×F embeddings (the heads' outputs), unweighted."""
    with full_precision(student.device):
        dtype = torch.promote_types(promote(student).dtype, promote(teacher).dtype)
        s, t = student.to(dtype), teacher.to(dtype)
        b = s.shape[0]
        if kernel == "adjacent":
            delta = (s - t).abs()
            return (delta[:-1] * delta[1:]).sum() / max(b - 1, 1)
        diff = correlation_matrix(s, kernel, gamma, order) - correlation_matrix(t, kernel, gamma, order)
        return torch.linalg.matrix_norm(diff) / b**2


class CCParams(MethodParams):
    cc_weight: float = Field(0.02, ge=0, description="weight β of L_CC")
    feat_dim: int = Field(128, gt=0, description="width of the two linear embedding heads")
    kernel: Literal["adjacent", "gaussian", "bilinear"] = Field(
        "adjacent", description="adjacent: RepDistiller's residual products of neighbouring samples (order-dependent); "
                                "gaussian / bilinear: the paper's all-pairs correlation matrix (torchdistill)")
    gamma: float = Field(0.4, gt=0, description="γ of the Gaussian RBF (kernel=gaussian)")
    order: int = Field(2, ge=1, le=8, description="Taylor order P of the Gaussian RBF (kernel=gaussian)")


class CC(Distiller):
    name = "cc"
    Params = CCParams
    space = {"cc_weight": FloatRange(2e-3, 0.2, log=True)}
    reference = ("Peng et al., ICCV 2019; RepDistiller distiller_zoo/CC.py @ b84f547 with LinearEmbed heads (128) on "
                 "the pooled penultimate embedding; multiplies residuals of adjacent samples, so depends on batch order "
                 "(kernel=gaussian/bilinear: torchdistill CCKDLoss, order-invariant)")

    def __init__(self, student, teacher, params: CCParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.embed_s = nn.Linear(pair.student_stages[-1].channels, params.feat_dim)
        self.embed_t = nn.Linear(pair.teacher_stages[-1].channels, params.feat_dim)

    @classmethod
    def check_pair(cls, params: CCParams, pair: PairInfo) -> str | None:
        return None  # a linear head on each pooled embedding: any widths, spatial or not

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: CCParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        z_s = self.embed_s(pooled_embedding(out.stages[-1]))
        z_t = self.embed_t(pooled_embedding(teacher.stages[-1]))
        loss = cc_loss(z_s, z_t, p.kernel, p.gamma, p.order)
        self.record("cc_loss", loss.detach())
        return out.logits, {"loss_ce": cross_entropy(out.logits, labels), "loss_cc": p.cc_weight * loss}
