"""Adversarial feature-map transfer with a Wasserstein critic (WGAN-GP).

The student's stage-`l` map `F_s` goes through a training-only adapter
`A` (1×1 conv + BN to the teacher's channel count); where the two maps'
H×W differ, the larger is average-pooled to the smaller. A critic `D`
(strided 3×3 convs with LeakyReLU(0.2), no batch norm, halving down to
2×2, then a linear score; a map already ≤2×2 gets one stride-1 conv, so
`D` is never linear) scores maps. With `F_t` the teacher's map:

- Before every student step, `critic_iters` critic steps (own Adam,
  lr `critic_lr`, betas (0.5, 0.9)) on
  `L_D = E[D(A(F_s))] − E[D(F_t)] + λ_gp·E[(‖∇_f̂ D(f̂)‖₂ − 1)²]`,
  `f̂ = ε·F_t + (1−ε)·A(F_s)`, `ε ~ U[0,1]` per sample, `A(F_s)` detached:
  critic steps change only the critic.
- Student step (student and adapter, by the student's optimizer):
  `L_S = CE(z_s, y) + β_adv·(−E[D(A(F_s))]) [+ w_kd·τ²·KL(p_t^τ ‖ p_s^τ)]`.

`F_t` is the teacher's stage-`l` map before its final activation
(`preact`, default): like the adapter's conv+BN output it is real-valued,
whereas against a post-ReLU map (`preact: false`) the critic can win on
the sign alone. `layer` indexes stages on both sides (−1: the last).

Diagnostics per epoch: `wasserstein`, the critic's estimate
`W = E[D(F_t)] − E[D(A(F_s))]` (last critic iteration of each step),
`critic_loss` and `gradient_penalty`.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from kdarena.zoo.models import StageOutput

from .adversarial import TeacherCache, buffers_kept
from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import pool_to_match, promote, resolve_stage
from .kd import kd_loss
from .space import Choice, FloatRange

CRITIC_WIDTH = 64  # channels of every critic conv


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """`E[(‖∇_f̂ D(f̂)‖₂ − 1)²]` at `f̂ = ε·real + (1−ε)·fake`, one `ε ~ U[0,1]` per sample.

    Differentiable with respect to the critic's parameters (for its own
    step); `real` and `fake` are treated as constants.
    """
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    eps = torch.rand(shape, generator=generator, device=real.device, dtype=real.dtype)
    mixed = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def feature_critic(channels: int, height: int, width: int) -> nn.Sequential:
    """Strided 3×3 convs (LeakyReLU 0.2, no BN) halving H×W down to ≤2×2, then a linear score."""
    layers: list[nn.Module] = []
    c, h, w = channels, height, width
    while max(h, w) > 2:
        layers += [nn.Conv2d(c, CRITIC_WIDTH, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c, h, w = CRITIC_WIDTH, (h + 1) // 2, (w + 1) // 2
    if not layers:
        layers += [nn.Conv2d(c, CRITIC_WIDTH, 3, padding=1), nn.LeakyReLU(0.2)]
        c = CRITIC_WIDTH
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, 1))


class WassersteinParams(MethodParams):
    critic_iters: int = Field(5, ge=1, description="critic steps per student step")
    adv_weight: float = Field(0.1, ge=0, description="weight β_adv of the student's −E[D(A(F_s))]")
    critic_lr: float = Field(1e-4, gt=0, description="critic Adam learning rate (betas 0.5, 0.9)")
    gp_weight: float = Field(10.0, ge=0, description="gradient-penalty weight λ_gp")
    layer: int = Field(-1, description="stage index on both sides (negative counts from the last)")
    preact: bool = Field(True, description="compare with the teacher's map before its final activation")
    temperature: float = Field(4.0, gt=0, description="softmax temperature τ of the optional kd term")
    kd_weight: float = Field(0.0, ge=0, description="weight of the optional kd term (0: none)")


class Wasserstein(Distiller):
    name = "wasserstein"
    Params = WassersteinParams
    reference = ("kdarena's own seed method, no published reference code: a WGAN-GP critic (Gulrajani et al., "
                 "NeurIPS 2017; λ_gp 10, Adam betas 0.5, 0.9, 5 critic steps) on a 1×1 conv+BN adapted student map "
                 "against the teacher's pre-activation map")
    space = {
        "critic_iters": Choice((1, 2, 3, 5, 10)),
        "adv_weight": FloatRange(1e-3, 1.0, log=True),
        "critic_lr": FloatRange(1e-5, 1e-3, log=True),
        "gp_weight": FloatRange(1.0, 20.0),
        "layer": Choice((-1, -2)),
    }

    @classmethod
    def check_pair(cls, params: WassersteinParams, pair: PairInfo) -> str | None:
        for who, shapes in (("student", pair.student_stages), ("teacher", pair.teacher_stages)):
            try:
                i = resolve_stage(params.layer, shapes, who)
            except ValueError as exc:
                return f"method.params.layer: {exc}"
            if not shapes[i].spatial:
                return (f"its critic needs a spatial feature map (B×C×H×W) at stage {params.layer}, "
                        f"but the {who}'s is a flat B×D vector; pick a convolutional {who}")
        return None

    def __init__(self, student, teacher, params: WassersteinParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        why = self.check_pair(params, pair)
        if why:
            raise ValueError(why)
        self.s_layer = resolve_stage(params.layer, pair.student_stages, "student")
        self.t_layer = resolve_stage(params.layer, pair.teacher_stages, "teacher")
        s, t = pair.student_stages[self.s_layer], pair.teacher_stages[self.t_layer]
        self.adapter = nn.Sequential(nn.Conv2d(s.channels, t.channels, 1, bias=False), nn.BatchNorm2d(t.channels))
        self.critic = feature_critic(t.channels, min(s.height, t.height), min(s.width, t.width))
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=params.critic_lr, betas=(0.5, 0.9))
        self._teacher_cache = TeacherCache()

    def aux_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic": self.critic_optimizer}

    def _teacher_map(self, out: StageOutput) -> torch.Tensor:
        return (out.preact if self.params.preact else out.stages)[self.t_layer]

    def _maps(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, fake) = (F_t, A(F_s)) at one H×W."""
        fake, real = pool_to_match(self.adapter(student_map), teacher_map)
        return real, fake

    def critic_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Adam step of the critic on L_D; the terms (detached) measured before the step."""
        real, fake = real.detach(), fake.detach()
        d_real, d_fake = self.critic(real).mean(), self.critic(fake).mean()
        gp = gradient_penalty(self.critic, real, fake)
        loss = d_fake - d_real + self.params.gp_weight * gp
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        return {"critic_loss": loss.detach(), "gradient_penalty": gp.detach(), "wasserstein": (d_real - d_fake).detach()}

    def aux_step(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> None:
        # the previous student step left gradients in the critic (the engine clears only the student's)
        self.critic.zero_grad(set_to_none=True)
        teacher_map = self._teacher_map(self._teacher_cache.get(images, self.teacher_forward))
        with torch.no_grad(), buffers_kept(self.student, self.adapter):
            real, fake = self._maps(self.student.forward_stages(images).stages[self.s_layer], teacher_map)
        for _ in range(self.params.critic_iters):
            terms = self.critic_step(real, fake)
        for name, value in terms.items():
            self.record(name, value)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo):
        p: WassersteinParams = self.params
        out = self.student.forward_stages(images)
        teacher = self._teacher_cache.pop(images, self.teacher_forward)
        _, fake = self._maps(out.stages[self.s_layer], self._teacher_map(teacher))
        losses = {"loss_ce": cross_entropy(out.logits, labels), "loss_adv": p.adv_weight * -promote(self.critic(fake)).mean()}
        if p.kd_weight > 0:
            losses["loss_kd"] = p.kd_weight * kd_loss(out.logits, teacher.logits, p.temperature)
        return out.logits, losses
