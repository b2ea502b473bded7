"""Building a trial's or a run's models and method from a config (no MLflow: Ray workers import this)."""

from __future__ import annotations

import torch

from kdarena.methods import Distiller, PairInfo, get_method
from kdarena.zoo.data import Dataset
from kdarena.zoo.errors import UserError
from kdarena.zoo.models import StagedModel, build_model, stage_shapes

from .config import ModelConfig, TrainConfig


def make_model(spec: ModelConfig, data: Dataset, seed: int) -> StagedModel:
    """Build `spec` for `data`'s shape; the seed fixes its initial weights."""
    torch.manual_seed(seed)
    try:
        return build_model(spec.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                           input_size=data.input_size, **spec.options)
    except (MemoryError, RuntimeError) as exc:  # e.g. channels: 10000000 asks for terabytes of weights
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{spec.label} cannot be built ({first}); lower its options") from None


def pair_info(student: StagedModel, teacher: StagedModel, data: Dataset) -> PairInfo:
    return PairInfo(stage_shapes(student, data.in_channels, data.input_size),
                    stage_shapes(teacher, data.in_channels, data.input_size),
                    data.num_classes, data.in_channels, data.input_size, len(data.train))


def build_distiller(cfg: TrainConfig, data: Dataset, teacher: StagedModel | None) -> Distiller:
    """Student + method, or a UserError naming why the method cannot apply to this pair."""
    method = get_method(cfg.method.name)
    params = cfg.method_params()
    student = make_model(cfg.student, data, cfg.train.seed)
    probe_teacher = teacher if teacher is not None else make_model(cfg.teacher, data, cfg.teacher.recipe.seed)
    pair = pair_info(student, probe_teacher, data)
    why = method.check_pair(params, pair)
    if why:
        raise UserError(f"method '{method.name}' cannot distil teacher '{cfg.teacher.arch}' into student "
                        f"'{cfg.student.arch}': {why}")
    torch.manual_seed(cfg.train.seed + 1)  # training-only modules: seeded apart from the student
    return method(student, teacher if method.needs_teacher else None, params, pair)
