"""Adversarial KD with a logit discriminator.

A small MLP `D` reads a logit vector and outputs the logit of "this came
from the student": teacher logits are labelled 0, student logits 1.

- `D`'s loss (its own Adam, lr `d_lr`):
  `L_D = ½·[BCE(D(z_t), 0) + BCE(D(sg(z_s)), 1)]`, `sg` = stop-gradient. Before
  the first student step `D` is warmed up for `d_warmup` updates on the
  first batch's teacher and (current) student logits; then it gets `d_steps`
  updates before every student step, so it keeps up.
- Student loss: `L = α·CE(z_s, y) + β·BCE(D(z_s), 0) [+ w_kd·τ²·KL(p_t^τ ‖ p_s^τ)]`.
  `β·BCE(D(z_s), 0)` is the non-saturating form of `−β·BCE(D(z_s), 1)`:
  same fixed point (the student's logits look like the teacher's to `D`),
  but a useful gradient while `D` still wins easily.

With `β = 0` and `w_kd = 0` (and `α = 1`) the student is trained alone
(`D` still trains, but its output reaches no loss).

Diagnostics per epoch: `d_loss`, `d_accuracy` (D's accuracy on the batch's
teacher vs student logits, before its last update of the step) and
`adv_loss` (the unweighted `BCE(D(z_s), 0)`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .kd import kd_loss
from .space import Choice, FloatRange


@contextmanager
def buffers_kept(*modules: nn.Module) -> Iterator[None]:
    """Restore the modules' buffers (BN running statistics) on exit.

    An adversary's step runs the student (train mode, as the student step
    will) only to get samples; it must not move the student's state.
    """
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


class TeacherCache:
    """The teacher's output for the batch an aux step just saw, reused by the student step.

    The engine passes the same `images` tensor to `aux_step` and then to
    `forward_train`, so the frozen teacher runs once per step, not twice.
    """

    def __init__(self) -> None:
        self._images: torch.Tensor | None = None
        self._value = None

    def get(self, images: torch.Tensor, compute):
        if self._images is not images:
            self._images, self._value = images, compute(images)
        return self._value

    def pop(self, images: torch.Tensor, compute):
        value = self.get(images, compute)
        self.clear()
        return value

    def clear(self) -> None:
        self._images = self._value = None


class AdversarialParams(MethodParams):
    alpha: float = Field(1.0, ge=0, description="weight α of CE(z_s, y)")
    beta: float = Field(0.1, ge=0, description="weight β of the adversarial term BCE(D(z_s), 0)")
    d_lr: float = Field(1e-3, gt=0, description="discriminator Adam learning rate")
    d_steps: int = Field(1, ge=1, description="discriminator updates per student update")
    d_hidden: int = Field(128, ge=1, description="width of the discriminator's two hidden layers")
    d_warmup: int = Field(50, ge=0, description="discriminator updates before the first student update")
    temperature: float = Field(4.0, gt=0, description="softmax temperature τ of the optional kd term")
    kd_weight: float = Field(0.0, ge=0, description="weight of the optional kd term (0: none)")


def logit_discriminator(num_classes: int, hidden: int) -> nn.Sequential:
    """MLP on logit vectors: C → h → h → 1, LeakyReLU(0.2); the output is a logit of P(student)."""
    return nn.Sequential(
        nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
        nn.Linear(hidden, 1),
    )


class Adversarial(Distiller):
    name = "adversarial"
    Params = AdversarialParams
    teacher_logits_only = True
    reference = ("kdarena's own seed method, no published reference code: an MLP discriminator on logits "
                 "(teacher 0, student 1), non-saturating GAN loss for the student, optional τ²·KL")
    space = {
        "alpha": FloatRange(0.1, 1.0),
        "beta": FloatRange(1e-3, 1.0, log=True),
        "d_lr": FloatRange(1e-5, 1e-2, log=True),
        "d_steps": Choice((1, 2, 5)),
        "d_hidden": Choice((64, 128, 256)),
    }

    def __init__(self, student, teacher, params: AdversarialParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.discriminator = logit_discriminator(pair.num_classes, params.d_hidden)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=params.d_lr)
        # a buffer, so a resumed run does not warm up a second time
        self.register_buffer("warmed_up", torch.zeros((), dtype=torch.bool))
        self._teacher_cache = TeacherCache()

    def aux_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"discriminator": self.d_optimizer}

    def d_update(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One Adam step of `D` on (detached) logits; its loss and accuracy (detached) before the step."""
        z = torch.cat([teacher_logits, student_logits]).detach()
        target = torch.cat([z.new_zeros(len(teacher_logits)), z.new_ones(len(student_logits))])
        out = self.discriminator(z).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(out, target)
        self.d_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.d_optimizer.step()
        return loss.detach(), ((out.detach() > 0).float() == target).float().mean()

    @torch.no_grad()
    def discriminator_accuracy(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
        """Fraction of teacher (→0) and student (→1) logit vectors `D` labels right."""
        right = (self.discriminator(teacher_logits) <= 0).sum() + (self.discriminator(student_logits) > 0).sum()
        return float(right) / (len(teacher_logits) + len(student_logits))

    def aux_step(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> None:
        p: AdversarialParams = self.params
        # the previous student step left gradients in D (the engine clears only the student's)
        self.discriminator.zero_grad(set_to_none=True)
        teacher_logits = self._teacher_cache.get(images, lambda x: self.teacher_logits(x, step))
        with torch.no_grad(), buffers_kept(self.student):
            student_logits = self.student(images)
        if not bool(self.warmed_up):
            for _ in range(p.d_warmup):
                self.d_update(teacher_logits, student_logits)
            self.warmed_up.fill_(True)
        for _ in range(p.d_steps):
            d_loss, d_accuracy = self.d_update(teacher_logits, student_logits)
        self.record("d_loss", d_loss)
        self.record("d_accuracy", d_accuracy)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo):
        p: AdversarialParams = self.params
        logits = self.student(images)
        d_out = self.discriminator(logits).squeeze(1)
        adv = F.binary_cross_entropy_with_logits(d_out, torch.zeros_like(d_out))
        self.record("adv_loss", adv.detach())
        losses = {"loss_ce": p.alpha * cross_entropy(logits, labels), "loss_adv": p.beta * adv}
        if p.kd_weight > 0:
            teacher_logits = self._teacher_cache.pop(images, lambda x: self.teacher_logits(x, step))
            losses["loss_kd"] = p.kd_weight * kd_loss(logits, teacher_logits, p.temperature)
        self._teacher_cache.clear()
        return logits, losses
