"""Curriculum Temperature for KD (Li, Li, Yang, Lin, Zhao, Cheng, Yang, AAAI 2023), global-temperature variant.

A learnable temperature `T = t_min + t_span·σ(θ)` (one scalar θ, initialised
to 1, so T starts at 1 + 20·σ(1) ≈ 15.62) replaces KD's fixed one:

    L = w_ce·CE(z_s, y) + w_kd·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))      (batch-mean KL)

θ is trained by the same optimiser and step as the student, through a
gradient-reversal layer: forward identity, backward `−λ·∂L/∂θ`, so the
student descends L while the temperature ascends it (a harder task). λ
follows a cosine curriculum by epoch `e` (1-based, as the authors' loop):

    λ(e) = λ_max·(1 − cos(π·min(e/E_c, 1)))/2,   E_c = curriculum × total epochs

rising from ~0 to `λ_max` over the first E_c epochs and staying there.
Without a StepInfo (a direct call) λ = λ_max. θ is a training-only
parameter (one, reported in extra_params), decayed like the student's
weights, as in the authors' single SGD over the student and `Global_T`.

Reference: zhengli97/CTKD @ 7d52522: `models/temp_global.py` (Global_T and
its GradientReversal, which multiplies by the λ it is given; the loop passes
the negative CosineDecay value), `helper/loops.py` (`temp = t_start +
t_end·sigmoid(global_T)`, `gamma·CE + alpha·KL·T²`), `train_student.py`
(CosineDecay) and `scripts/run_cifar_distill.sh` (CIFAR-100: `-r 0.1 -a 0.9
--t_start 1 --t_end 20 --cosine_decay 1 --decay_max 0 --decay_min -1
--decay_loops 10` of 240 epochs). Their `decay_min = −1` is our λ_max = 1,
their `decay_loops = 10` our `curriculum = 10/240`, `t_start`/`t_end` our
`t_min`/`t_span` (`t_end` is a span: T ranges over (1, 21)).

Diagnostics per epoch: `temperature` (mean T over the epoch's steps) and
`lambda` (the reversal weight).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .kd import kd_loss
from .space import FloatRange

INIT_THETA = 1.0  # the authors' Global_T starts at torch.ones(1)


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def reverse_grad(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Identity forward; the gradient multiplied by −λ backward."""
    return _ReverseGrad.apply(x, lam)


class GlobalTemperature(nn.Module):
    """One learnable temperature `t_min + t_span·σ(θ)`, its θ behind a gradient-reversal layer."""

    def __init__(self, t_min: float, t_span: float):
        super().__init__()
        self.t_min, self.t_span = t_min, t_span
        self.theta = nn.Parameter(torch.full((1,), INIT_THETA))

    def forward(self, lam: float) -> torch.Tensor:
        return (self.t_min + self.t_span * torch.sigmoid(reverse_grad(self.theta, lam))).squeeze(0)


def curriculum_lambda(lambda_max: float, curriculum: float, step: StepInfo | None) -> float:
    """`λ_max·(1 − cos(π·min(e/E_c, 1)))/2` at 1-based epoch e; λ_max without a curriculum or a StepInfo."""
    if step is None:
        return lambda_max
    length = curriculum * step.total_epochs
    if length <= 0:
        return lambda_max
    progress = min((step.epoch + 1) / length, 1.0)
    return lambda_max * (1.0 - math.cos(math.pi * progress)) / 2.0


class CTKDParams(MethodParams):
    ce_weight: float = Field(0.1, ge=0, description="weight of CE(z_s, y) (the authors' -r)")
    kd_weight: float = Field(0.9, ge=0, description="weight of T²·KL at the learned T (the authors' -a)")
    lambda_max: float = Field(1.0, ge=0, description="largest gradient-reversal weight λ, reached at the curriculum's end")
    curriculum: float = Field(10 / 240, ge=0, le=1, description="fraction of epochs over which λ rises (cosine) from 0 to lambda_max")
    t_min: float = Field(1.0, gt=0, description="lowest temperature (the authors' t_start)")
    t_span: float = Field(20.0, gt=0, description="temperature range above t_min (the authors' t_end)")


class CTKD(Distiller):
    name = "ctkd"
    Params = CTKDParams
    teacher_logits_only = True
    reference = ("Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023; zhengli97/CTKD "
                 "models/temp_global.py + helper/loops.py @ 7d52522 (global T = 1 + 20·σ(θ), cosine λ 0→1 over 10 of 240 "
                 "epochs); KL ×T²")
    space = {
        "lambda_max": FloatRange(0.1, 10.0, log=True),
        "kd_weight": FloatRange(0.1, 10.0, log=True),
        "curriculum": FloatRange(0.0, 0.5),
    }

    def __init__(self, student, teacher, params: CTKDParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.temperature = GlobalTemperature(params.t_min, params.t_span)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: CTKDParams = self.params
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images, step)
        lam = curriculum_lambda(p.lambda_max, p.curriculum, step)
        t = self.temperature(lam)
        self.record("temperature", t.detach())
        self.record("lambda", lam)
        return logits, {
            "loss_ce": p.ce_weight * cross_entropy(logits, labels),
            "loss_kd": p.kd_weight * kd_loss(logits, teacher_logits, t),
        }
