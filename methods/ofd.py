"""A comprehensive overhaul of feature distillation (Heo, Kim, Yun, Park, Kwak, Choi, ICCV 2019).

OFD distils pre-ReLU features (the contract's `preact`) through a connector
`r` (conv + BN) on the student side, against a teacher target whose
negative responses are clipped at a per-channel margin `m_c`, with a
partial L2 that ignores a student already below a non-positive target:

    T̃ = max(T, m_c)                               (teacher transform σ_m)
    d(T̃, S) = 0 if S ≤ T̃ ≤ 0, else (T̃ − S)²      (S = r(student preact))
    L_l  = mean_b Σ_{c,h,w} d                      (summed over the map, averaged over the batch)
    L_OFD = Σ_l L_l / 2^(n−l−1),   L = CE + feat_weight·L_OFD

The deepest of the `n` distilled layers weighs 1, each shallower one half
the next (mdistiller's `ofd_loss`); `feat_weight = 1e-3` is mdistiller's
`OFD.LOSS.FEAT_WEIGHT` (the authors' `sum / batch / 1000`). Where H×W differ,
the teacher's map is adaptive-average-pooled to the student's.

The margin is the expectation of the negative part of the teacher's
pre-activation, each channel taken as a Gaussian N(μ_c, σ_c²):

    m_c = E[x | x < 0] = μ_c − σ_c·φ(μ_c/σ_c) / Φ(−μ_c/σ_c)    if Φ(−μ_c/σ_c) > 0.001, else −3σ_c.

mdistiller reads μ_c, σ_c off the teacher's BN before the ReLU (bias β_c and
|weight γ_c|). The feature contract gives no BN modules (methods never reach
into a model by attribute name), so here μ_c and σ_c are estimated from the
teacher's pre-activations themselves: per channel, the mean and the
(biased) standard deviation over every position of every training batch of
the first epoch (float64 running sums in registered buffers, so checkpoints
and resume carry them); during that epoch each step uses the statistics of
the batches seen so far, its own included, and from the second epoch on the
statistics are fixed. Why this matches mdistiller's formula in expectation:
where the pre-activation is a BN output `y = γ·x̂ + β`, x̂ has zero mean and
unit variance over the data it is normalised with, so y's mean over those
data is β and its standard deviation |γ| — exactly per batch for a BN in
training mode, and in expectation over the training set for a teacher in
eval mode whose running statistics are the training data's. Where the
pre-activation is not a bare BN output (a ResNet's stage `preact` is the
residual sum, BN + shortcut) mdistiller still uses the last BN's γ, β, which
ignore the shortcut; the estimate here describes the distribution actually
distilled, which is what the paper's margin (the expected negative teacher
response) defines. A contract extension that exposes each stage's
pre-activation BN (γ, β) would give mdistiller's exact numbers.

Layers: the last `n = min(#student, #teacher spatial stages)` stages of
each network, aligned from the deepest (mdistiller's `_align_list` over
`preact_feats[1:]`). Connectors (mdistiller's `ConnectorConvBN`): a k×k conv
(`connector_kernel`, default 1, no bias; weights N(0, 2/(k²·C_t))) and a BN
(weight 1, bias 0), training-only: outside `student.`, counted in
`extra_params`, trained by the student's optimizer, never deployed.

Deviation: mdistiller's OFD puts the teacher in training mode during
distillation (its `train()` override sets every child, teacher included),
so teacher BNs use batch statistics and update their running statistics;
the engine here keeps the teacher frozen in eval mode.

Diagnostics per epoch: `ofd_loss` (unweighted L_OFD) and `margin` (the mean
of m_c over every distilled channel).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import needs_spatial, promote
from .space import Choice, FloatRange

# below this mass of negative responses the conditional mean is ill-determined: the margin is −3σ
MIN_NEGATIVE_MASS = 0.001


def gaussian_margin(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """m = E[x | x < 0] for x ~ N(mean, std²), per channel; −3·std where P(x < 0) ≤ 0.001."""
    std = std.abs()
    z = mean / std.clamp_min(torch.finfo(std.dtype).tiny)
    negative_mass = torch.special.ndtr(-z)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    conditional = mean - std * density / negative_mass.clamp_min(MIN_NEGATIVE_MASS)
    return torch.where(negative_mass > MIN_NEGATIVE_MASS, conditional, -3 * std)


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """mean_b Σ_{c,h,w} d(max(T, m_c), S), d = 0 where S ≤ max(T, m_c) ≤ 0, else the squared difference."""
    source, target = promote(source), promote(target)
    dtype = torch.promote_types(torch.promote_types(source.dtype, target.dtype), margin.dtype)
    source, target = source.to(dtype), target.to(dtype)
    clipped = torch.maximum(target, margin.to(dtype).view(1, -1, 1, 1))
    skip = (source <= clipped) & (clipped <= 0)
    return ((clipped - source).pow(2) * ~skip).sum() / source.shape[0]


def ofd_loss(sources: list[torch.Tensor], targets: list[torch.Tensor], margins: list[torch.Tensor]) -> torch.Tensor:
    """Σ_l partial_l2_l / 2^(n−l−1), each teacher map pooled to its student map's H×W."""
    n = len(sources)
    total = 0
    for l, (s, t, m) in enumerate(zip(sources, targets, margins)):
        if t.shape[-2:] != s.shape[-2:]:
            t = F.adaptive_avg_pool2d(t, s.shape[-2:])
        total = total + partial_l2(s, t, m) / 2 ** (n - l - 1)
    return total


def aligned_stages(student, teacher) -> list[tuple[int, int]]:
    """(student, teacher) spatial stage pairs, the last n of each, n the smaller count (mdistiller's _align_list)."""
    s = [i for i, x in enumerate(student) if x.spatial]
    t = [i for i, x in enumerate(teacher) if x.spatial]
    n = min(len(s), len(t))
    return list(zip(s[len(s) - n:], t[len(t) - n:]))


def ofd_connector(student_channels: int, teacher_channels: int, kernel: int) -> nn.Sequential:
    conv = nn.Conv2d(student_channels, teacher_channels, kernel, padding=(kernel - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel * kernel * teacher_channels)))
    bn = nn.BatchNorm2d(teacher_channels)  # weight 1, bias 0
    return nn.Sequential(conv, bn)


class OFDParams(MethodParams):
    feat_weight: float = Field(1e-3, ge=0, description="weight of L_OFD (mdistiller's FEAT_WEIGHT; CE weighs 1)")
    connector_kernel: Literal[1, 3] = Field(1, description="kernel size of the conv in each connector")


class OFD(Distiller):
    name = "ofd"
    Params = OFDParams
    space = {"feat_weight": FloatRange(1e-4, 1e-2, log=True), "connector_kernel": Choice((1, 3))}
    reference = ("Heo et al., ICCV 2019; mdistiller mdistiller/distillers/OFD.py @ a08d46f on preact, deepest "
                 "stages aligned; margins from per-channel Gaussians estimated on the teacher's first-epoch "
                 "pre-activations (the contract has no BN), loss summed per sample ×1e-3")

    def __init__(self, student, teacher, params: OFDParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.pairs = aligned_stages(pair.student_stages, pair.teacher_stages)
        self.connectors = nn.ModuleList(
            ofd_connector(pair.student_stages[s].channels, pair.teacher_stages[t].channels, params.connector_kernel)
            for s, t in self.pairs)
        for k, (_, t) in enumerate(self.pairs):
            c = pair.teacher_stages[t].channels
            self.register_buffer(f"count_{k}", torch.zeros((), dtype=torch.float64))
            self.register_buffer(f"sum_{k}", torch.zeros(c, dtype=torch.float64))
            self.register_buffer(f"sumsq_{k}", torch.zeros(c, dtype=torch.float64))

    @classmethod
    def check_pair(cls, params: OFDParams, pair: PairInfo) -> str | None:
        for who, shapes in (("student", pair.student_stages), ("teacher", pair.teacher_stages)):
            if not needs_spatial(shapes):
                return (f"ofd needs spatial pre-activation maps (B×C×H×W) and the {who} has none "
                        f"(its stages are B×D vectors, as in an MLP); use kd, fitnets or adversarial")
        return None

    @torch.no_grad()
    def observe(self, teacher_preact: list[torch.Tensor]) -> None:
        """Add a batch of the teacher's distilled pre-activations to each channel's running sums."""
        for k, (_, t) in enumerate(self.pairs):
            x = promote(teacher_preact[t]).to(torch.float64)
            getattr(self, f"count_{k}").add_(x.numel() // x.shape[1])
            getattr(self, f"sum_{k}").add_(x.sum(dim=(0, 2, 3)))
            getattr(self, f"sumsq_{k}").add_(x.pow(2).sum(dim=(0, 2, 3)))

    def margins(self) -> list[torch.Tensor]:
        """m_c per distilled teacher stage, from the Gaussian of the observed pre-activations (float64)."""
        out = []
        for k in range(len(self.pairs)):
            count = getattr(self, f"count_{k}").clamp_min(1)
            mean = getattr(self, f"sum_{k}") / count
            var = (getattr(self, f"sumsq_{k}") / count - mean.pow(2)).clamp_min(0)
            out.append(gaussian_margin(mean, var.sqrt()))
        return out

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: OFDParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        if step is None or step.epoch == 0:
            self.observe(teacher.preact)
        margins = self.margins()
        sources = [r(out.preact[s]) for r, (s, _) in zip(self.connectors, self.pairs)]
        targets = [teacher.preact[t] for _, t in self.pairs]
        loss = ofd_loss(sources, targets, [m.to(promote(sources[0]).dtype) for m in margins])
        self.record("ofd_loss", loss.detach())
        self.record("margin", torch.cat(margins).mean())
        return out.logits, {"loss_ce": cross_entropy(out.logits, labels), "loss_ofd": p.feat_weight * loss}
