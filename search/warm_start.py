"""Warm starts: each method's study begins with the best configs the MLflow store already holds for this data.

Evidence is every completed full-budget student run (trial, final or
`kdarena train`) of the method on the same data — matched by the content
fingerprint, never by the dataset's name. Runs of the same teacher and
student come first, then the nearest pairs: another teacher counts as one
unit of distance, the student's size as |log(MACs ratio)| to the nearest of
this sweep's students. The best configs by val_acc are put in the study's
queue (Optuna's `enqueue_trial`), clipped to this sweep's space, so they are
the method's first trials; their scores are never told to the study, since
another pair's score is not an observation of this sweep's objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from kdarena.methods.space import Choice, Dimension, IntRange
from kdarena.training.record import Param, Role, Status
from kdarena.zoo.errors import UserError

from .points import STUDENT, method_param, student_option
from .sweep_config import SEARCHABLE_OPTIONS, SweepConfig, method_space

Fits = Callable[[int, dict[str, Any]], bool]  # (student index, searched options) -> within the constraints?

# a different teacher weighs as much as a student e (≈2.7) times bigger or smaller
OTHER_TEACHER_DISTANCE = 1.0


@dataclass(frozen=True)
class WarmPoint:
    """One enqueued config: its Optuna point, where it came from and how near that pair is to this sweep's."""

    method: str
    point: dict[str, Any]  # Optuna's names, e.g. {"kd/temperature": 4.0, "student": 1}
    source: str  # "sweep/trial name" (or a `kdarena train` run's name) and its MLflow run id
    val_acc: float
    distance: float

    @property
    def same_pair(self) -> bool:
        return self.distance == 0.0


def per_method_quota(trials_per_method: int) -> int:
    """How many of a method's trials start from evidence: a third, at least one, so the sampler still explores."""
    return max(1, trials_per_method // 3)


def check_named_sweeps(names: Sequence[str], runs: pd.DataFrame) -> None:
    """A `warm_start:` list names sweeps the store holds; a typo is refused before any work."""
    known = sorted(set(runs["sweep"].dropna())) if not runs.empty else []
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"warm_start names sweep '{unknown[0]}', which the tracking store has no runs of; "
                        f"known sweeps: {', '.join(known) or 'none'}. Fix the name, or use warm_start: auto")


def evidence(runs: pd.DataFrame, fingerprint: str, sweeps: Sequence[str] | None) -> pd.DataFrame:
    """Completed full-budget student runs on the data with this fingerprint (of the named sweeps, if given)."""
    if runs.empty:
        return runs
    df = runs[runs["role"].isin(Role.STUDENTS) & (runs["status"] == Status.COMPLETED)
              & (runs["dataset_fingerprint"] == fingerprint) & runs["val_acc"].notna()]
    if sweeps is not None:
        df = df[df["sweep"].isin(list(sweeps))]
    return df


def _clip(dim: Dimension, value: Any) -> Any:
    """`value` inside `dim`, or None when it cannot be (a choice this sweep does not offer)."""
    if isinstance(dim, Choice):
        return value if value in dim.choices else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    clipped = min(max(value, dim.low), dim.high)
    return int(round(clipped)) if isinstance(dim, IntRange) else float(clipped)


def _student_options(run: pd.Series) -> dict[str, float]:
    """The run's searched student options (`student0/width` or, for a final run, `point/student0/width`)."""
    out = {}
    for key, value in run["searched"].items():
        parts = key.split(Param.SEARCHED_SEP)
        if len(parts) >= 2 and parts[-2].startswith(STUDENT) and parts[-1] in SEARCHABLE_OPTIONS:
            out[parts[-1]] = value
    return out


def match_student(sweep: SweepConfig, run: pd.Series) -> int | None:
    """This sweep's student the run trained: the same label, or the same architecture with searched options."""
    for index, spec in enumerate(sweep.students):
        if not spec.search and spec.label == run["student"]:
            return index
    options = _student_options(run)
    for index, spec in enumerate(sweep.students):
        if spec.search and spec.arch == run["student_arch"] and set(spec.search) <= set(options):
            return index
    return None


def point_of_run(sweep: SweepConfig, method: str, run: pd.Series, student: int | None,
                 fits: Fits | None = None) -> dict[str, Any]:
    """The run's config as an Optuna point of this sweep: its knobs this sweep searches, clipped to the space.

    `fits(student, options)` says whether searched student options are within the sweep's constraints;
    options that are not are left to the sampler, which draws only points that fit.
    """
    space = method_space(sweep, method)
    point: dict[str, Any] = {}
    for name, value in run["hparams"].items():
        if name in space and (clipped := _clip(space[name], value)) is not None:
            point[method_param(method, name)] = clipped
    if student is not None:
        if len(sweep.students) > 1:
            point[STUDENT] = student
        options = _student_options(run)
        searched = {}
        for option, (low, high) in sweep.students[student].search.items():
            if option in options:
                value = min(max(options[option], low), high)
                searched[option] = int(round(value)) if SEARCHABLE_OPTIONS[option] is int else float(value)
        if fits is None or fits(student, searched):
            point |= {student_option(student, option): value for option, value in searched.items()}
    return point


def distance(run: pd.Series, teacher_label: str, student_macs: Sequence[float], student: int | None) -> float:
    """How far the run's pair is from this sweep's: 0 for the same teacher and student."""
    teacher = 0.0 if run["teacher"] == teacher_label else OTHER_TEACHER_DISTANCE
    if student is not None:
        return teacher
    macs = run["macs"]
    if not (isinstance(macs, (int, float)) and macs > 0) or not student_macs:
        return teacher + OTHER_TEACHER_DISTANCE
    return teacher + min(abs(math.log(macs / m)) for m in student_macs if m > 0)


def warm_points(sweep: SweepConfig, runs: pd.DataFrame, fingerprint: str, student_macs: Sequence[float],
                quota: int, fits: Fits | None = None) -> dict[str, list[WarmPoint]]:
    """Per method, up to `quota` distinct points from the nearest pairs' best runs (nearest first, then val_acc)."""
    if sweep.warm_start == "off":
        return {}
    named = sweep.warm_start if isinstance(sweep.warm_start, list) else None
    pool = evidence(runs, fingerprint, named)
    out: dict[str, list[WarmPoint]] = {}
    for method in sweep.methods:
        found: list[WarmPoint] = []
        for _, run in pool[pool["method"] == method].iterrows():
            student = match_student(sweep, run)
            point = point_of_run(sweep, method, run, student, fits)
            name = f"{run['sweep']}/{run['run_name']}" if isinstance(run["sweep"], str) else run["run_name"]
            found.append(WarmPoint(method, point, f"{name} ({run['run_id']})", float(run["val_acc"]),
                                   distance(run, sweep.teacher.label, student_macs, student)))
        found.sort(key=lambda w: (w.distance, -w.val_acc, w.source))
        chosen: list[WarmPoint] = []
        for w in found:
            if w.point and all(w.point != c.point for c in chosen):
                chosen.append(w)
            if len(chosen) == quota:
                break
        if chosen:
            out[method] = chosen
    return out


def describe(points: dict[str, list[WarmPoint]]) -> list[str]:
    """One line per warm-started method, for the sweep's output."""
    lines = []
    for method, chosen in points.items():
        pairs = "the same teacher and student" if all(w.same_pair for w in chosen) else "the nearest pairs"
        lines.append(f"{method}: {len(chosen)} trial(s) warm-started from {pairs}: "
                     + ", ".join(f"{w.source} val_acc {w.val_acc:.4f}" for w in chosen))
    return lines
