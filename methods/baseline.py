"""The student trained alone on labels (the "S" / "S-DNN" rows of the papers)."""

from __future__ import annotations

import torch

from .base import Distiller, StepInfo, cross_entropy


class Baseline(Distiller):
    name = "baseline"
    reference = "the student trained alone: cross-entropy on labels only (the papers' student rows); no distillation code"
    needs_teacher = False

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo):
        logits = self.student(images)
        return logits, {"loss_ce": cross_entropy(logits, labels)}
