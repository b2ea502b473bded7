"""The `Distiller` interface: one small class per method, run by one engine.

A distiller owns the student (registered, trained, saved) and sees the
teacher (frozen, unregistered: it is never saved with the student nor moved
into the student's optimizer). `forward_train` returns the student's logits
and a dict of named loss terms, which the engine sums and backpropagates.

Methods that change the loop use the optional hooks instead of the engine
knowing about them: `aux_optimizers`/`aux_step` for critics and
discriminators with their own optimizers, `backward` for gradient rules
such as SVD's multi-task clipping, `record` for per-epoch diagnostics.
Training-only modules (regressors, adapters, critics) are any submodule
other than `student`; they never count in the deployed student's cost.
A method that reads the teacher only through `teacher_logits` says so
(`teacher_logits_only`), and the engine may then hand it logits computed
once per training image (`teacher_logits.py`) instead of running the teacher.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.nn import functional as F

from kdarena.zoo.augment import Policy
from kdarena.zoo.models import StagedModel, StageOutput, StageShape

from .space import Dimension


class MethodParams(BaseModel):
    """A method's own hyper-parameters; unknown names are an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class StepInfo:
    epoch: int  # 0-based
    total_epochs: int
    step: int  # global optimiser step, 0-based
    steps_per_epoch: int
    indices: torch.Tensor | None = None  # the batch's positions in the training split (`wants_indices`)
    strong_images: torch.Tensor | None = None  # the batch under the strong policy (`strong_view`)
    teacher_logits: torch.Tensor | None = None  # the batch's cached teacher logits (`teacher_logits_only`)


@dataclass(frozen=True)
class PairInfo:
    """What a method may know about the pair when it is built or checked."""

    student_stages: list[StageShape]
    teacher_stages: list[StageShape]
    num_classes: int
    in_channels: int
    input_size: int
    num_train: int = 0  # images in the training split (a memory bank's size)


class Distiller(nn.Module):
    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    space: ClassVar[dict[str, Dimension]] = {}
    needs_teacher: ClassVar[bool] = True
    # the paper and the code this method follows (file and commit), and any convention factor
    reference: ClassVar[str] = ""
    # the engine passes each batch's dataset indices in `StepInfo.indices`
    wants_indices: ClassVar[bool] = False
    # a second view of each batch under this policy, in `StepInfo.strong_images` (e.g. `Strong()`)
    strong_view: ClassVar[Policy | None] = None
    # the teacher is read only through `teacher_logits`, so the engine may hand it logits computed once
    teacher_logits_only: ClassVar[bool] = False
    # why this method cannot train data-parallel (`replica.py`: state kept per training image), or "" when it can
    data_parallel_refusal: ClassVar[str] = ""

    def __init__(self, student: StagedModel, teacher: StagedModel | None, params: MethodParams, pair: PairInfo):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: frozen, never saved here
        self.params = params
        self.pair = pair
        self._diagnostics: dict[str, list[float]] = defaultdict(list)

    @classmethod
    def check_pair(cls, params: MethodParams, pair: PairInfo) -> str | None:
        """Why this method cannot apply to the pair, or None when it can."""
        return None

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward_test(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def teacher_forward(self, images: torch.Tensor) -> StageOutput:
        with torch.no_grad():
            return self.teacher.forward_stages(images)

    def teacher_logits(self, images: torch.Tensor, step: StepInfo | None) -> torch.Tensor:
        """The teacher's logits for `images`: those the engine cached for this batch, else computed now."""
        if step is not None and step.teacher_logits is not None:
            return step.teacher_logits
        return self.teacher_forward(images).logits

    # -- hooks for methods that change the loop --------------------------------
    def aux_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimizers of training-only adversaries; their parameters stay out of the student's."""
        return {}

    def aux_step(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> None:
        """Updates of critics/discriminators, run before each student step."""

    def backward(self, losses: dict[str, torch.Tensor], step: StepInfo) -> None:
        sum(losses.values()).backward()

    # -- diagnostics -------------------------------------------------------------
    def record(self, name: str, value: float | torch.Tensor) -> None:
        self._diagnostics[name].append(float(value))

    def pop_diagnostics(self) -> dict[str, float]:
        means = {k: sum(v) / len(v) for k, v in self._diagnostics.items() if v}
        self._diagnostics.clear()
        return means

    # -- what the engine asks ------------------------------------------------------
    def student_optimizer_parameters(self) -> list[nn.Parameter]:
        owned = {id(p) for opt in self.aux_optimizers().values() for g in opt.param_groups for p in g["params"]}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in owned]

    def classifier_free_epochs(self, total_epochs: int) -> int:
        """Leading epochs that do not train the classifier (a hint or FSP stage): chance val_acc there is by design."""
        return 0

    def extra_params(self) -> int:
        """Parameters of training-only modules: reported, never deployed."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("student."))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)
