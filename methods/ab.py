"""Activation boundaries (Heo, Lee, Yun, Choi, AAAI 2019).

AB transfers where each teacher neuron switches on, not how strongly it
fires: the student is pushed to the same side of zero as the teacher's
pre-ReLU response, by at least a margin μ. Per distilled layer `l`, with the
student's pre-activation map through a connector, `s = r_l(S_l)`, and the
teacher's pre-activation `t = T_l` (the contract's `preact`, same shape):

    ℓ_l  = Σ_{b,c,h,w} (s + μ)²·1[s > −μ ∧ t ≤ 0] + (s − μ)²·1[s ≤ μ ∧ t > 0]
    L_AB = 3/1000 · Σ_l w_l·ℓ_l / B,      w_l = 2^(l − n + 1)

(`n` distilled layers, `l` = 0..n−1: the deepest layer weighs 1, each
shallower one half the next.) The squared-hinge sum is the paper's
alternative loss; the ÷B, the ×3/1000 and the weights `w_l` are RepDistiller's
`distiller_zoo/AB.py` @ b84f547 (HobbitLong/RepDistiller), which puts them
inside its loss: `L_AB` here equals the sum of the list that `ABLoss`
returns, so `ab_weight = 1` is RepDistiller's init-stage loss.

Layers: every spatial stage, student and teacher paired by relative depth
(`features.paired_stages`). Connectors (RepDistiller's `Connector`, from
`models/util.py`): none where a pair's channels and H already match; else a
conv and BN, no ReLU — a 3×3 stride-2 conv where the student's map is twice
the teacher's H, a 4×4 stride-2 transposed conv where it is half, else a
valid conv of kernel `1 + H_s − H_t` (1×1 at equal size). A student map
smaller than the teacher's by another factor has no connector in the
reference and is refused by `check_pair`. Connectors are training-only
(outside `student.`: counted in `extra_params`, never deployed).

Training (`stages`):
- 2 (the paper; RepDistiller's `init` in `helper/pretrain.py`): for the first
  `n₁ = round(init_epochs·epochs)` epochs (clamped to 1..epochs−1, FSP's
  rule) the loss is `ab_weight·L_AB` alone: the connectors and every student
  layer below the classifier train (RepDistiller's `get_feat_modules()` +
  connector), the classifier gets no gradient. Then `CE + α·τ²·KL(p_t^τ‖p_s^τ)`
  (RepDistiller's `γ·CE + α·KD` with γ=1 and its AB default `-a 0`: CE alone);
  the connectors are no longer used or trained.
- 1: `CE + α·KD + ab_weight·L_AB` throughout (RepDistiller's "can also add
  loss to this stage"; not in its scripts).

Deviations from RepDistiller: its 30 init epochs come before, and on top of,
its 240 epochs, with their own SGD (lr 0.05, no schedule); here they are the
first `init_epochs` (default 30/240 = 0.125) of the run, on the run's one
optimizer and schedule, as FitNets' and FSP's first stages. `init_epochs`
is a fraction, so a search can vary the epochs without the stage vanishing.

Diagnostics per epoch: `ab_loss` (unweighted `L_AB`, measured in both stages),
`boundary_agreement` (the fraction of teacher neurons whose on/off state the
connector's output shares: `(s > 0) == (t > 0)`), `stage` (1 or 2).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from kdarena.zoo.models import StageShape

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import needs_spatial, paired_stages, promote
from .fsp import stage_one_epochs
from .kd import kd_loss
from .space import Choice, FloatRange


def layer_weights(n: int) -> list[float]:
    """RepDistiller's per-layer weights 2^(l − n + 1): 1 for the deepest layer, halving towards the input."""
    return [2.0 ** (l - n + 1) for l in range(n)]


def boundary_loss(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """ℓ = Σ (s + μ)²·1[s > −μ ∧ t ≤ 0] + (s − μ)²·1[s ≤ μ ∧ t > 0], summed over every element."""
    s, t = promote(s), promote(t)
    dtype = torch.promote_types(s.dtype, t.dtype)
    s, t = s.to(dtype), t.to(dtype)
    on = t > 0
    off_violation = (s > -margin) & ~on
    on_violation = (s <= margin) & on
    return ((s + margin).pow(2) * off_violation + (s - margin).pow(2) * on_violation).sum()


def ab_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], margin: float) -> torch.Tensor:
    """L_AB = 3/1000 · Σ_l w_l·ℓ_l / B over the paired (connected) student and teacher pre-activations."""
    weights = layer_weights(len(student_maps))
    batch = student_maps[0].shape[0]
    total = sum(w * boundary_loss(s, t, margin) for w, s, t in zip(weights, student_maps, teacher_maps))
    return total / batch * 3.0 / 1000.0


def connector(s: StageShape, t: StageShape) -> nn.Module:
    """RepDistiller's AB connector for one stage pair (see the module docstring)."""
    if s.channels == t.channels and s.height == t.height:
        return nn.Identity()
    if s.height == 2 * t.height:
        conv = nn.Conv2d(s.channels, t.channels, 3, stride=2, padding=1)
    elif 2 * s.height == t.height:
        conv = nn.ConvTranspose2d(s.channels, t.channels, 4, stride=2, padding=1)
    else:
        conv = nn.Conv2d(s.channels, t.channels, (1 + s.height - t.height, 1 + s.width - t.width))
    return nn.Sequential(conv, nn.BatchNorm2d(t.channels))


def _unconnectable(s: StageShape, t: StageShape) -> bool:
    if s.channels == t.channels and s.height == t.height:
        return False
    return not (s.height == 2 * t.height or 2 * s.height == t.height or (s.height >= t.height and s.width >= t.width))


class ABParams(MethodParams):
    ab_weight: float = Field(1.0, ge=0, description="weight of L_AB (1: RepDistiller's init loss, ÷B·3/1000 inside)")
    margin: float = Field(1.0, gt=0, description="margin μ around the activation boundary")
    stages: Literal[1, 2] = Field(2, description="2: L_AB alone for init_epochs, then CE/kd (the paper); 1: CE/kd + L_AB")
    init_epochs: float = Field(0.125, gt=0, lt=1, description="stages=2: fraction of the epochs on L_AB alone")
    temperature: float = Field(4.0, gt=0, description="softmax temperature τ of the kd term")
    alpha: float = Field(0.0, ge=0, description="weight α of the kd term, added to CE (RepDistiller's -a)")


class AB(Distiller):
    name = "ab"
    Params = ABParams
    space = {
        "ab_weight": FloatRange(0.1, 10.0, log=True),
        "margin": FloatRange(0.25, 4.0, log=True),
        "stages": Choice((1, 2)),
        "init_epochs": FloatRange(0.05, 0.3),
        "alpha": FloatRange(0.0, 1.0),
    }
    reference = ("Heo et al., AAAI 2019; RepDistiller distiller_zoo/AB.py + helper/pretrain.py @ b84f547 on preact; "
                 "÷B·3/1000 and layer weights 2^(l−n+1) inside L_AB; init stage = first init_epochs of the run")

    def __init__(self, student, teacher, params: ABParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.pairs = paired_stages(pair.student_stages, pair.teacher_stages, spatial_only=True)
        self.connectors = nn.ModuleList(
            connector(pair.student_stages[s], pair.teacher_stages[t]) for s, t in self.pairs)

    @classmethod
    def check_pair(cls, params: ABParams, pair: PairInfo) -> str | None:
        for who, shapes in (("student", pair.student_stages), ("teacher", pair.teacher_stages)):
            if not needs_spatial(shapes):
                return (f"ab needs spatial pre-activation maps (B×C×H×W) and the {who} has none "
                        f"(its stages are B×D vectors, as in an MLP); use kd, fitnets or adversarial")
        for s, t in paired_stages(pair.student_stages, pair.teacher_stages, spatial_only=True):
            a, b = pair.student_stages[s], pair.teacher_stages[t]
            if _unconnectable(a, b):
                return (f"ab's connector cannot map the student's stage {s} ({a.height}×{a.width}) to the teacher's "
                        f"stage {t} ({b.height}×{b.width}): a smaller student map must be exactly half the teacher's")
        return None

    def connected(self, student_preact: list[torch.Tensor]) -> list[torch.Tensor]:
        return [r(student_preact[s]) for r, (s, _) in zip(self.connectors, self.pairs)]

    def classifier_free_epochs(self, total_epochs: int) -> int:
        p: ABParams = self.params
        return stage_one_epochs(p.init_epochs, total_epochs) if p.stages == 2 else 0

    def _record(self, sources: list[torch.Tensor], targets: list[torch.Tensor], loss: torch.Tensor, stage: int) -> None:
        with torch.no_grad():
            agree = sum(((s > 0) == (t > 0)).sum() for s, t in zip(sources, targets))
            total = sum(t.numel() for t in targets)
        self.record("ab_loss", loss.detach())
        self.record("boundary_agreement", agree / total)
        self.record("stage", stage)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: ABParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        targets = [teacher.preact[t] for _, t in self.pairs]
        init_stage = p.stages == 2 and step is not None and step.epoch < self.classifier_free_epochs(step.total_epochs)
        if init_stage:
            sources = self.connected(out.preact)
            loss = ab_loss(sources, targets, p.margin)
            self._record(sources, targets, loss, 1)
            return out.logits, {"loss_ab": p.ab_weight * loss}

        losses = {"loss_ce": cross_entropy(out.logits, labels)}
        if p.alpha > 0:
            losses["loss_kd"] = p.alpha * kd_loss(out.logits, teacher.logits, p.temperature)
        if p.stages == 1:
            sources = self.connected(out.preact)
            loss = ab_loss(sources, targets, p.margin)
            losses["loss_ab"] = p.ab_weight * loss
        else:  # measured, untrained: how far the classification stage drifts from the boundaries
            was_training = self.connectors.training
            self.connectors.eval()  # RepDistiller's main stage holds the connector in eval: its BN statistics stay
            with torch.no_grad():
                sources = self.connected(out.preact)
                loss = ab_loss(sources, targets, p.margin)
            self.connectors.train(was_training)
        self._record(sources, targets, loss, p.stages)
        return out.logits, losses
