"""Factor transfer (Kim, Park, Kwak, NeurIPS 2018): paraphraser, translator, factor loss.

A paraphraser `P` (an autoencoder on the teacher's last-stage map `F_t`) is
first trained alone to reconstruct it; its encoder's output is the teacher's
factor `P_e(F_t)`. A translator `T` on the student's last-stage map `F_s`
gives the student's factor, and the student learns to match the two:

    pre-training:  L_P  = mean((P_d(P_e(F_t)) − F_t)²)                     (P alone, its own optimizer)
    then:          L    = CE + α·τ²·KL(p_t^τ ‖ p_s^τ) + β·L_FT
                   L_FT = mean_{b,i} |φ(T(F_s))_{b,i} − φ(P_e(F_t))_{b,i}|
                   φ(X) = vec(X)/‖vec(X)‖₂ per sample, X reduced as `factor` says:
                          "attention" (default): mean_c X_c², a B×(H·W) map — RepDistiller's
                          `distiller_zoo/FT.py` (p1=2, p2=1); "full": X itself, B×(C·H·W) — the paper.

Reference: RepDistiller (HobbitLong/RepDistiller @ b84f547) `distiller_zoo/FT.py`,
`models/util.py` (`Paraphraser`, `Translator`), `helper/pretrain.py` (the
paraphraser's pre-training) and `train_student.py` / `helper/loops.py`.
Convention: RepDistiller's factor is the channel mean of the squared factor
(an attention map, normalised over positions), not the paper's whole
normalised factor tensor; its β=200 (`-b 200`, CIFAR-100) is set for that
form. `factor: full` is the paper's. `F_s`, `F_t` are the last spatial
stage's outputs after activation (RepDistiller's `feat[-2]`, `preact=False`);
where their H×W differ the larger factor map is average-pooled to the
smaller, as the reference does.

Modules, as the reference builds them: `P`'s encoder is three 3×3 convs
C→C→kC→kC, its decoder three 3×3 transposed convs kC→kC→C→C, each followed
by LeakyReLU(0.1), no BN; `T` is three 3×3 convs C_s→C_s→kC_t→kC_t, each
followed by BN and LeakyReLU(0.1); `k = rate` (0.5), `kC` at least 1. Both
are training-only (outside `student.`: counted in `extra_params`, never
deployed). `P` is trained only by its own SGD (lr `para_lr`, momentum 0.9,
weight decay 5e-4, constant lr: RepDistiller's `init`, whose lr is 0.01 for
its ResNet/WRN students) in `aux_step` during the first
`round(init_epochs·epochs)` epochs (clamped to 1..epochs−1, FSP's rule), and
is frozen afterwards; `T` is trained by the student's optimizer.

During pre-training the student is not trained at all, as in the reference
(its init loop runs the student in eval mode and optimises `P` only): these
epochs are classifier-free (`classifier_free_epochs`), the student's
weights and BN statistics stay as initialised, and the logged loss is
`loss_para` (`L_P`, already stepped by `P`'s optimizer, so `backward` skips
it). Deviation: RepDistiller's 30 pre-training epochs come before its 240
student epochs; here they are the first `init_epochs` (30/240 = 0.125) of
the run, and the student's lr schedule runs through them.

Diagnostics per epoch: `para_loss` (`L_P` in pre-training), `ft_loss`
(unweighted `L_FT` afterwards), `stage` (1 pre-training, 2 transfer).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import needs_spatial, pool_to_match, promote
from .fsp import stage_one_epochs
from .kd import kd_loss
from .space import Choice, FloatRange

PARA_MOMENTUM = 0.9
PARA_WEIGHT_DECAY = 5e-4


def factor_vector(x: torch.Tensor, factor: str) -> torch.Tensor:
    """φ(X): per sample, the unit-L2 vector of mean_c X_c² ("attention") or of X itself ("full")."""
    x = promote(x)
    v = x.pow(2).mean(1).flatten(1) if factor == "attention" else x.flatten(1)
    return F.normalize(v, dim=1)


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, factor: str = "attention") -> torch.Tensor:
    """L_FT = mean |φ(student) − φ(teacher)|, the larger map average-pooled to the smaller's H×W first."""
    s, t = pool_to_match(student_factor, teacher_factor)
    s, t = factor_vector(s, factor), factor_vector(t, factor)
    dtype = torch.promote_types(s.dtype, t.dtype)
    return (s.to(dtype) - t.to(dtype)).abs().mean()


def _conv_stack(channels: list[int], transposed: bool = False, bn: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        layers.append(conv(c_in, c_out, 3, 1, 1))
        if bn:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Autoencoder of the teacher's map: encoder C→C→kC→kC, decoder kC→kC→C→C (3×3, LeakyReLU 0.1, no BN)."""

    def __init__(self, channels: int, rate: float):
        super().__init__()
        k = max(1, int(channels * rate))
        self.encoder = _conv_stack([channels, channels, k, k])
        self.decoder = _conv_stack([k, k, channels, channels], transposed=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


def translator(student_channels: int, teacher_channels: int, rate: float) -> nn.Sequential:
    """Student map → a factor shaped like the paraphraser's: C_s→C_s→kC_t→kC_t (3×3, BN, LeakyReLU 0.1)."""
    k = max(1, int(teacher_channels * rate))
    return _conv_stack([student_channels, student_channels, k, k], bn=True)


def last_spatial(shapes) -> int | None:
    spatial = [i for i, s in enumerate(shapes) if s.spatial]
    return spatial[-1] if spatial else None


class FTParams(MethodParams):
    ft_weight: float = Field(200.0, ge=0, description="weight β of L_FT (RepDistiller's -b 200)")
    alpha: float = Field(0.0, ge=0, description="weight α of the kd term, added to CE (RepDistiller's -a)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature τ of the kd term")
    rate: float = Field(0.5, gt=0, le=1, description="paraphrase rate k: the factor has k·C_t channels")
    init_epochs: float = Field(0.125, gt=0, lt=1, description="fraction of the epochs pre-training the paraphraser")
    para_lr: float = Field(0.01, gt=0, description="the paraphraser's SGD learning rate")
    factor: Literal["attention", "full"] = Field(
        "attention", description="attention: RepDistiller's mean_c X² map; full: the paper's whole factor")


class FT(Distiller):
    name = "ft"
    Params = FTParams
    space = {
        "ft_weight": FloatRange(10.0, 2000.0, log=True),
        "alpha": FloatRange(0.0, 1.0),
        "rate": Choice((0.25, 0.5, 1.0)),
        "init_epochs": FloatRange(0.05, 0.3),
        "para_lr": FloatRange(1e-3, 0.1, log=True),
    }
    reference = ("Kim et al., NeurIPS 2018; RepDistiller distiller_zoo/FT.py + models/util.py + helper/pretrain.py "
                 "@ b84f547; factor = L2-normalised mean_c X² (RepDistiller), L1 mean; paraphraser pre-trained "
                 "in the run's first init_epochs, student frozen there")

    def __init__(self, student, teacher, params: FTParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.student_stage = last_spatial(pair.student_stages)
        self.teacher_stage = last_spatial(pair.teacher_stages)
        s, t = pair.student_stages[self.student_stage], pair.teacher_stages[self.teacher_stage]
        self.paraphraser = Paraphraser(t.channels, params.rate)
        self.translator = translator(s.channels, t.channels, params.rate)
        self.para_optimizer = torch.optim.SGD(self.paraphraser.parameters(), lr=params.para_lr,
                                              momentum=PARA_MOMENTUM, weight_decay=PARA_WEIGHT_DECAY)
        self._para_loss: torch.Tensor | None = None

    @classmethod
    def check_pair(cls, params: FTParams, pair: PairInfo) -> str | None:
        for who, shapes in (("student", pair.student_stages), ("teacher", pair.teacher_stages)):
            if not needs_spatial(shapes):
                return (f"ft needs a spatial feature map (B×C×H×W) for its paraphraser and translator and the {who} "
                        f"has none (its stages are B×D vectors, as in an MLP); use kd, fitnets or adversarial")
        return None

    def aux_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"paraphraser": self.para_optimizer}

    def classifier_free_epochs(self, total_epochs: int) -> int:
        return stage_one_epochs(self.params.init_epochs, total_epochs)

    def pretraining(self, step: StepInfo | None) -> bool:
        return step is not None and step.epoch < self.classifier_free_epochs(step.total_epochs)

    def reconstruction_loss(self, images: torch.Tensor) -> torch.Tensor:
        """L_P = mean((P_d(P_e(F_t)) − F_t)²) on the teacher's last spatial stage."""
        target = promote(self.teacher_forward(images).stages[self.teacher_stage])
        _, reconstruction = self.paraphraser(target)
        return F.mse_loss(promote(reconstruction), target)

    def aux_step(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> None:
        if not self.pretraining(step):
            self._para_loss = None
            return
        self.paraphraser.train()
        loss = self.reconstruction_loss(images)
        self.para_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.para_optimizer.step()
        self.para_optimizer.zero_grad(set_to_none=True)  # no stale gradient left beside the student's
        self._para_loss = loss.detach()

    def backward(self, losses: dict[str, torch.Tensor], step: StepInfo) -> None:
        total = sum(losses.values())
        if total.requires_grad:  # pre-training: the paraphraser already stepped, the student does not train
            total.backward()

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: FTParams = self.params
        if self.pretraining(step):
            was_training = self.student.training
            self.student.eval()  # the reference runs the student in eval here: its BN statistics stay
            with torch.no_grad():
                logits = self.student(images)
                if self._para_loss is None:  # called without the engine's aux_step: measured, not stepped
                    self._para_loss = self.reconstruction_loss(images)
            self.student.train(was_training)
            para_loss, self._para_loss = self._para_loss, None
            self.record("para_loss", para_loss)
            self.record("stage", 1)
            return logits, {"loss_para": para_loss}

        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        self.paraphraser.eval()
        with torch.no_grad():
            teacher_factor = self.paraphraser.encoder(teacher.stages[self.teacher_stage])
        student_factor = self.translator(out.stages[self.student_stage])
        loss = ft_loss(student_factor, teacher_factor, p.factor)
        self.record("ft_loss", loss.detach())
        self.record("stage", 2)
        losses = {"loss_ce": cross_entropy(out.logits, labels), "loss_ft": p.ft_weight * loss}
        if p.alpha > 0:
            losses["loss_kd"] = p.alpha * kd_loss(out.logits, teacher.logits, p.temperature)
        return out.logits, losses
