"""Sweep files: one teacher, students, methods and a budget, validated before any work.

A sweep runs one Optuna study per method (see the README for why), each
over the method's own space plus `lr` and `weight_decay`, narrowed or
fixed by the sweep file. `trial_config` turns one sampled point into a
complete `kdarena train` config, so a trial and `kdarena train` run the
very same code and an exported config reproduces its trial.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from kdarena.methods import METHODS, get_method
from kdarena.methods.recipe import Recipe
from kdarena.methods.space import COMMON_SPACE, Choice, Dimension, FloatRange, IntRange
from kdarena.zoo.errors import UserError

from kdarena.training.config import DatasetConfig, MethodConfig, ModelConfig, Strict, TeacherConfig, TrainConfig
from kdarena.training.documents import field_path, format_validation_error, load_yaml, show, validate_document

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# student options that may be searched, and what kind of number each takes
SEARCHABLE_OPTIONS = {"width": float, "depth": int, "channels": int}


def option_value(option: str, value: float) -> int | float:
    """A searched student option as the model takes it (depth and channels are whole numbers)."""
    return int(value) if SEARCHABLE_OPTIONS[option] is int else value


class StudentSpec(ModelConfig):
    search: dict[str, list[float]] = Field(default_factory=dict,
                                           description="options to search: {width: [0.25, 1.0], depth: [1, 3]}")

    @field_validator("search")
    @classmethod
    def _ranges(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for name, bounds in v.items():
            if name not in SEARCHABLE_OPTIONS:
                raise ValueError(f"option {show(name)} cannot be searched; searchable: {', '.join(SEARCHABLE_OPTIONS)}")
            _check_bounds(f"search.{name}", bounds, positive=True)
        return v


class MethodSpec(Strict):
    fix: dict[str, Any] = Field(default_factory=dict, description="parameters held fixed (method's own, lr, weight_decay)")
    space: dict[str, Any] = Field(default_factory=dict, description="narrowed ranges [low, high] or choice lists")


class Budget(Strict):
    trials_per_method: int | None = Field(None, gt=0)
    trials: int | None = Field(None, gt=0, description="total, split evenly over the methods")
    epochs: int = Field(10, gt=0, description="full budget of one trial")
    grace_period: int = Field(1, gt=0, description="ASHA: epochs before a trial may be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung")
    early_stopping: bool = Field(True, description="false: every trial runs the full budget (no ASHA)")
    chance_patience: int | None = Field(3, gt=0, description="a trial whose val_acc stays at chance this many epochs "
                                                            "in a row ends as diverged; null: never")

    @model_validator(mode="after")
    def _check(self) -> Budget:
        if self.trials_per_method is None and self.trials is None:
            self.trials_per_method = 4
        if self.trials_per_method is not None and self.trials is not None:
            raise ValueError("give trials_per_method or trials, not both")
        if self.grace_period > self.epochs:
            raise ValueError(f"grace_period ({self.grace_period}) is larger than epochs ({self.epochs})")
        return self


class Resources(Strict):
    cpu: float = Field(1.0, gt=0, le=1024, description="CPUs per trial, per worker with workers > 1 (also its torch "
                                                        "threads)")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial, per worker with workers > 1; fractions share a GPU")
    workers: int = Field(1, ge=1, le=1024, strict=True,
                         description="data-parallel workers per trial (Ray Train), each with cpu and gpu; 1: none")

    @property
    def per_trial(self) -> tuple[float, float]:
        """(CPUs, GPUs) one trial holds, all its workers together."""
        return self.cpu * self.workers, self.gpu * self.workers


class FinalSpec(Strict):
    seeds: int = Field(0, ge=0, description="re-run each method's best config on this many seeds")


class Constraints(Strict):
    """Upper limits on a student's cost: no trial over one is trained (`search/constraints.py` says how)."""

    max_macs: float | None = Field(None, gt=0, allow_inf_nan=False,
                                   description="multiply-accumulates of one forward pass at batch 1")
    max_params: float | None = Field(None, gt=0, allow_inf_nan=False, description="parameter count")
    max_latency_ms: float | None = Field(None, gt=0, allow_inf_nan=False,
                                         description="CPU latency at batch 1, measured (median of repeats)")

    @model_validator(mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        if isinstance(v, dict):
            unknown = [k for k in v if k not in cls.model_fields]
            if unknown:
                raise ValueError(f"unknown constraint {show(unknown[0])}; the constraints are "
                                 f"{', '.join(cls.model_fields)}")
        return v

    @field_validator("max_macs", "max_params", "max_latency_ms", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError("expected a positive number")
        return v


Objective = Literal["val_acc"] | list[Literal["val_acc", "macs", "params"]]


class SweepConfig(Strict):
    name: str
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    teacher: TeacherConfig
    students: list[StudentSpec] = Field(min_length=1)
    methods: dict[str, MethodSpec | None] = Field(min_length=1)
    budget: Budget = Field(default_factory=Budget)
    objective: Objective = "val_acc"
    constraints: Constraints = Field(default_factory=Constraints)
    train: Recipe = Field(default_factory=Recipe, description="the students' recipe; epochs and chance_patience come from the budget")
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, gt=0)
    final: FinalSpec = Field(default_factory=FinalSpec)
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler of every method's study")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the samplers' seed (numpy's range)")
    tracking_uri: str | None = None
    storage: str | None = Field(None, description="where trial results and checkpoints go; default ./kdarena-sweeps")
    cache_dir: str | None = None
    experiment: str = Field("kdarena", min_length=1)
    warm_start: Literal["auto", "off"] | list[str] = Field(
        "auto", description="start each method's study from the store's best configs on this data: auto (any "
                            "sweep or train run), off, or a list of sweep names")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not SAFE_NAME.fullmatch(v) or ".." in v:  # fullmatch: `$` alone would let "name\n" through
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names a folder)")
        return v

    @field_validator("warm_start")
    @classmethod
    def _warm_sweeps(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list warm-starts from nothing; write off, auto, or the sweeps' names")
            for name in v:
                if not SAFE_NAME.fullmatch(name):
                    raise ValueError(f"{show(name)} is not a sweep name (letters, digits, '.', '_' and '-')")
        return v

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: dict[str, MethodSpec | None]) -> dict[str, MethodSpec | None]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {show(unknown[0])}; known methods: {', '.join(METHODS)}")
        return v

    @field_validator("objective")
    @classmethod
    def _objective(cls, v):
        if isinstance(v, list) and (not v or v[0] != "val_acc" or len(set(v)) != len(v) or len(v) > 2):
            raise ValueError("objective is val_acc, or [val_acc, macs] / [val_acc, params] for an accuracy-vs-cost front")
        return v

    @model_validator(mode="after")
    def _data_parallel(self) -> SweepConfig:
        workers = self.resources.workers
        if workers == 1:
            return self
        if self.train.batch_size < workers:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) is below resources.workers ({workers}): each "
                             "worker trains its share of every batch; raise batch_size or lower workers")
        for method in self.methods:
            refusal = get_method(method).data_parallel_refusal
            if refusal:
                raise ValueError(f"method {method} cannot train data-parallel (resources.workers: {workers}): "
                                 f"{refusal}; run it in a sweep with resources.workers: 1")
        return self

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) pairs: val_acc is maximised, costs minimised."""
        names = [self.objective] if isinstance(self.objective, str) else self.objective
        return [(n, "max" if n == "val_acc" else "min") for n in names]

    def method_spec(self, method: str) -> MethodSpec:
        return self.methods[method] or MethodSpec()

    def trials_for(self) -> int:
        b = self.budget
        return b.trials_per_method if b.trials_per_method is not None else max(1, math.ceil(b.trials / len(self.methods)))


def _check_bounds(where: str, bounds: Any, positive: bool = False) -> None:
    if not isinstance(bounds, list) or len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        raise ValueError(f"{where}: expected [low, high], got {show(bounds)}")
    low, high = bounds
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{where}: bounds must be finite numbers, got {bounds!r}")
    if low >= high:
        raise ValueError(f"{where}: empty or inverted range [{low}, {high}]; low must be below high")
    if positive and low <= 0:
        raise ValueError(f"{where}: must be positive, got low {low}")


def method_space(sweep: SweepConfig, method: str) -> dict[str, Dimension]:
    """The searched dimensions of one method: its space and the common knobs, narrowed, minus the fixed ones."""
    spec = sweep.method_spec(method)
    full = get_method(method).space | COMMON_SPACE
    space: dict[str, Dimension] = {}
    for name, dim in full.items():
        if name in spec.fix:
            continue
        override = spec.space.get(name)
        space[name] = dim if override is None else _narrow(dim, override)
    return space


def _narrow(dim: Dimension, override: Any) -> Dimension:
    if isinstance(dim, Choice):
        return Choice(tuple(override))
    low, high = override
    if isinstance(dim, IntRange):
        return IntRange(int(low), int(high), dim.log)
    return FloatRange(float(low), float(high), dim.log and low > 0)


def trial_threads(sweep: SweepConfig) -> int:
    """A trial's torch threads: its CPUs, whole."""
    return max(1, math.floor(sweep.resources.cpu))


def trial_config(sweep: SweepConfig, method: str, student_index: int, student_options: dict[str, Any],
                 params: dict[str, Any], seed: int | None = None) -> TrainConfig:
    """The complete `kdarena train` config of one trial (sampled `params` = method knobs + lr/weight_decay)."""
    spec = sweep.method_spec(method)
    values = dict(spec.fix) | params
    recipe_fields = {k: values.pop(k) for k in list(values) if k in COMMON_SPACE}
    student = sweep.students[student_index]
    recipe = sweep.train.model_copy(update={"epochs": sweep.budget.epochs, "num_threads": trial_threads(sweep),
                                            "chance_patience": sweep.budget.chance_patience,
                                            **({"seed": seed} if seed is not None else {}), **recipe_fields})
    return TrainConfig(
        dataset=sweep.dataset, teacher=sweep.teacher,
        student=ModelConfig(arch=student.arch, options=student.options | student_options),
        method=MethodConfig(name=method, params=values), train=Recipe.model_validate(recipe.model_dump()),
        cache_dir=sweep.cache_dir, experiment=sweep.experiment,
    )


def parse_sweep(raw: Any, source: str) -> SweepConfig:
    """Validate a sweep document: every error names its field; narrowed spaces are checked against each method."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a sweep file is a mapping (name, dataset, teacher, students, methods, budget, …)")
    sweep = validate_document(SweepConfig, raw, source)
    for method in sweep.methods:
        _check_method_spec(sweep, method, source)
    # every student must build, and every method must fit every student: found now, not in trial 37
    for i, student in enumerate(sweep.students):
        try:
            TrainConfig(dataset=sweep.dataset, teacher=sweep.teacher, student=ModelConfig(arch=student.arch, options=student.options))
        except ValidationError as exc:
            raise UserError(f"{source}: students.{i}: {format_validation_error(exc)}") from None
    return sweep


def _check_method_spec(sweep: SweepConfig, method: str, source: str) -> None:
    cls = get_method(method)
    spec = sweep.method_spec(method)
    known = list(cls.space) + [k for k in COMMON_SPACE if k not in cls.space]
    own = set(cls.Params.model_fields)
    for section, entries in (("fix", spec.fix), ("space", spec.space)):
        for name in entries:
            if name not in own and name not in COMMON_SPACE:
                raise UserError(f"{source}: {field_path(['methods', method, section, name])}: unknown parameter; {method}'s parameters: "
                                f"{', '.join(sorted(own | set(COMMON_SPACE)))}")
            if section == "space" and name not in cls.space and name not in COMMON_SPACE:
                raise UserError(f"{source}: methods.{method}.space.{name}: not searched by {method}; fix it instead "
                                f"(searchable: {', '.join(known)})")
    for name, override in spec.space.items():
        where = field_path(["methods", method, "space", name])
        dim = (cls.space | COMMON_SPACE)[name]
        if isinstance(dim, Choice):
            if not isinstance(override, list) or not override:
                raise UserError(f"{source}: {where}: expected a non-empty list of choices, got {show(override)}")
            probes = override
        else:
            try:
                _check_bounds(where, override)
            except ValueError as exc:
                raise UserError(f"{source}: {exc}") from None
            probes = override
        if dim in COMMON_SPACE.values() and name in COMMON_SPACE:
            if any(p <= 0 for p in probes):
                raise UserError(f"{source}: {where}: {name} must be positive, got {show(override)}")
            continue
        for probe in probes:
            try:
                cls.Params.model_validate({name: probe})
            except ValidationError as exc:
                raise UserError(f"{source}: {where}: {show(override)} leaves the parameter's valid values "
                                f"({format_validation_error(exc, prefix='')})") from None
    fixed_own = {k: v for k, v in spec.fix.items() if k in own}
    try:
        cls.Params.model_validate(fixed_own)
    except ValidationError as exc:
        raise UserError(f"{source}: {format_validation_error(exc, prefix=f'methods.{method}.fix')}") from None
    for name in set(spec.fix) & set(COMMON_SPACE):
        value = spec.fix[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{source}: methods.{method}.fix.{name}: must be a positive number, got {show(value)}")


def load_sweep(path: str | Path) -> tuple[SweepConfig, Any]:
    raw = load_yaml(path)
    return parse_sweep(raw, str(path)), raw
