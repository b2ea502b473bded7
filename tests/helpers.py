"""Small builders the method tests share: digits-shaped (1×8×8, 10 classes) models and their pair info."""

from __future__ import annotations

import torch

from kdarena.methods import PairInfo
from kdarena.zoo.models import StagedModel, build_model, stage_shapes

CPU = torch.device("cpu")


def digits_model(arch: str, seed: int, **options) -> StagedModel:
    torch.manual_seed(seed)
    return build_model(arch, num_classes=10, in_channels=1, input_size=8, **options)


def digits_cnn(seed: int, channels: int = 8) -> StagedModel:
    return digits_model("cnn", seed, channels=channels)


def digits_pair(student: StagedModel, teacher: StagedModel) -> PairInfo:
    return PairInfo(stage_shapes(student, 1, 8), stage_shapes(teacher, 1, 8), 10, 1, 8)
