"""A trial's point under Optuna's names: encoded for the studies, decoded back into a train config, here only.

Each method's parameters are prefixed by the method (`kd/temperature`),
because one parameter name cannot have two distributions across studies;
a searched student option by the student's index (`student1/width`); the
student itself is the categorical `student`. Search trials carry Optuna's
point as Ray's trial config; final runs carry one such point plus a `seed`
under `point`, one grid entry each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from kdarena.methods.space import Choice, Dimension, IntRange
from kdarena.training.identity import student_tags
from kdarena.training.record import Param, Tag

from .constraints import CostBounds
from .sweep_config import SEARCHABLE_OPTIONS, SweepConfig, option_value, trial_config

STUDENT = "student"
POINT = "point"
SEED = "seed"
WARM_START = "warm_start"  # a warm-started trial's config: where its point came from (search/warm_start.py)


def method_param(method: str, name: str) -> str:
    return f"{method}{Param.SEARCHED_SEP}{name}"


def student_option(index: int, option: str) -> str:
    return f"{STUDENT}{index}{Param.SEARCHED_SEP}{option}"


@dataclass(frozen=True)
class DefineByRun:
    """One method's Optuna space, define-by-run so a student's searched options depend on the student.

    A plain picklable object: Ray checkpoints the searcher, space included.
    With the sweep's `bounds`, each searched option's range is cut, per
    trial, to what still fits the constraints (`constraints.CostBounds.upper`):
    Optuna's samplers take a range that changes from trial to trial.
    """

    method: str
    space: dict[str, Dimension]
    student_search: tuple[dict[str, list[float]], ...]
    bounds: CostBounds | None = None  # None: no constraints (and a searcher saved before they existed)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        count = len(self.student_search)
        student = trial.suggest_categorical(STUDENT, list(range(count))) if count > 1 else 0
        search = list(self.student_search[student].items())
        chosen: dict[str, Any] = {}
        for i, (option, (low, high)) in enumerate(search):
            name = student_option(student, option)
            low, high = option_value(option, low), option_value(option, high)
            if self.bounds is not None:
                pending = {later: option_value(later, bounds[0]) for later, bounds in search[i + 1:]}
                high = self.bounds.upper(student, option, low, high, chosen, pending)
            if SEARCHABLE_OPTIONS[option] is int:
                chosen[option] = trial.suggest_int(name, low, high)
            else:
                chosen[option] = trial.suggest_float(name, low, high)
        for name, dim in self.space.items():
            key = method_param(self.method, name)
            if isinstance(dim, Choice):
                trial.suggest_categorical(key, list(dim.choices))
            elif isinstance(dim, IntRange):
                trial.suggest_int(key, dim.low, dim.high, log=dim.log)
            else:
                trial.suggest_float(key, dim.low, dim.high, log=dim.log)
        return {"method": self.method, STUDENT: student}


def flat_point(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's nested trial config back under Optuna's flat names ({"kd": {"temperature": 4}} → kd/temperature)."""
    flat: dict[str, Any] = {}
    for key, value in point_of(config).items():
        if isinstance(value, dict):
            flat |= {f"{key}{Param.SEARCHED_SEP}{k}": v for k, v in value.items()}
        else:
            flat[key] = value
    return flat


def point_of(config: dict[str, Any]) -> dict[str, Any]:
    """The Optuna point in Ray's trial config (a final run's sits under `point`)."""
    return config.get(POINT, config)


def final_point(point: dict[str, Any], seed: int) -> dict[str, Any]:
    """A final run: the best trial's point on another seed."""
    return point | {SEED: seed}


def split_trial_params(config: dict[str, Any]) -> tuple[str, int, dict[str, Any], dict[str, Any], int | None]:
    """Ray's trial config → (method, student index, student options, method params, seed or None)."""
    point = point_of(config)
    method = point["method"]
    student_index = int(point.get(STUDENT, 0))
    student_options = dict(point.get(f"{STUDENT}{student_index}", {}))
    params = dict(point.get(method, {}))
    return method, student_index, student_options, params, point.get(SEED)


@dataclass(frozen=True)
class Describe:
    """Trial config (Ray's) → (resolved train config as a dict, MLflow tags). Picklable for Ray."""

    sweep_doc: dict[str, Any]

    def __call__(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        sweep = SweepConfig.model_validate(self.sweep_doc)
        method, index, options, params, seed = split_trial_params(config)
        cfg = trial_config(sweep, method, index, options, params, seed=seed)
        tags = student_tags(cfg, with_teacher=True) | {Tag.SWEEP: sweep.name}
        if point_of(config).get(WARM_START):
            tags[Tag.WARM_START] = str(point_of(config)[WARM_START])
        return cfg.model_dump(mode="json"), tags
