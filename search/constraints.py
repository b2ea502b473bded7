"""A sweep's cost constraints: which students may be trained, and how far each searched option may go.

The mechanism is a bound computed from the cost model, not Optuna's
`constraints_func`. Optuna's constraints learn feasibility from trials
already run: an infeasible point is still trained, then weighed down, so
they cannot promise that no trial over a limit is trained. MACs and
parameters are known exactly before any training (one forward pass of the
built student), and grow with each of width, depth and channels (more
channels or more layers, never fewer, for every model that takes them), so
the searcher samples a student's searched options one at a time (in the
order the sweep file lists them), each inside the largest range where the
point — options drawn so far, this one, the rest at their lows — still fits:
whatever it draws next, the finished point fits. A value the model refuses
(a ResNet depth that is not 6n+2) counts as over: the bound stays safe and
may stop below a valid value.

Latency is measured, hence noisy. The bound keeps searched points
`LATENCY_MARGIN` under `max_latency_ms`; fixed students and a search's
lowest point are checked against the limit itself. Every trial measures
its student again before training (as at the end of the run: batch 1,
`zoo.cost.LATENCY_THREADS` threads) and ends `failed`, untrained, with the
reason, if it is over: no trial is trained whose latency was measured over the limit. The
latency a completed trial records is measured once more after training
and may differ by that noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from kdarena.training.config import ModelConfig
from kdarena.training.record import Metric
from kdarena.zoo.cost import Cost, profile_cost
from kdarena.zoo.data import Dataset
from kdarena.zoo.errors import UserError
from kdarena.zoo.models import build_model

from .sweep_config import SEARCHABLE_OPTIONS, SweepConfig, option_value

LATENCY_MARGIN = 0.1  # searched points stay 10 % under max_latency_ms, so noise rarely refuses a sampled trial
FLOAT_STEPS = 12  # bisection steps of a float option: its range to 1/4096
# each constraint and the cost it bounds
LIMITED = {"max_macs": Metric.MACS, "max_params": Metric.PARAMS, "max_latency_ms": Metric.LATENCY_MS}
SHOWN = {Metric.MACS: "MACs", Metric.PARAMS: "parameter count", Metric.LATENCY_MS: "latency"}


@dataclass(frozen=True)
class Shape:
    """What a student's cost depends on besides its options: the data's shape."""

    num_classes: int
    in_channels: int
    input_size: int

    @classmethod
    def of(cls, data: Dataset) -> Shape:
        return cls(data.num_classes, data.in_channels, data.input_size)


def measure(model: nn.Module, shape: Shape, latency: bool) -> Cost:
    return profile_cost(model, in_channels=shape.in_channels, input_size=shape.input_size, latency=latency)


@lru_cache(maxsize=4096)
def _priced(arch: str, options_json: str, shape: Shape, latency: bool) -> Cost:
    """One student's cost, cached: the bisection asks for the same points again and again."""
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's RNG alone
        model = build_model(arch, num_classes=shape.num_classes, in_channels=shape.in_channels,
                            input_size=shape.input_size, **json.loads(options_json))
    return measure(model, shape, latency)


def excess(limits: dict[str, float], cost: Cost, margin: float = 0.0) -> list[str]:
    """Each limit `cost` is over, as text; latency is held `margin` (a fraction) under its limit."""
    over = []
    for key, limit in limits.items():
        name = LIMITED[key]
        value = getattr(cost, name)
        allowed = limit * (1 - margin) if name == Metric.LATENCY_MS else limit
        if value > allowed:
            shown = f"{value:.3g} ms" if name == Metric.LATENCY_MS else f"{value:,}"
            over.append(f"{SHOWN[name]} {shown} is over constraints.{key} {_number(limit)}")
    return over


def _number(value: float) -> str:
    return f"{int(value):,}" if value.is_integer() else f"{value:g}"


@dataclass(frozen=True)
class CostBounds:
    """A sweep's limits and its students, all that pricing a point needs (picklable: the searcher holds it)."""

    limits: dict[str, float]
    students: tuple[tuple[str, dict[str, Any]], ...]  # (arch, fixed options) of each student
    shape: Shape

    @classmethod
    def of(cls, sweep: SweepConfig, shape: Shape) -> CostBounds | None:
        """None when the sweep has no constraints."""
        limits = limits_of(sweep)
        if not limits:
            return None
        return cls(limits, tuple((s.arch, dict(s.options)) for s in sweep.students), shape)

    def cost(self, student: int, searched: dict[str, Any]) -> Cost:
        arch, options = self.students[student]
        return _priced(arch, json.dumps(options | searched, sort_keys=True), self.shape,
                       "max_latency_ms" in self.limits)

    def over(self, student: int, searched: dict[str, Any], margin: float = 0.0) -> list[str]:
        try:
            return excess(self.limits, self.cost(student, searched), margin)
        except (UserError, MemoryError, RuntimeError) as exc:  # a value the model refuses: never a point to sample
            return [str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__]

    def upper(self, student: int, option: str, low: float, high: float, chosen: dict[str, Any],
              pending: dict[str, Any]) -> float:
        """The largest value of `option` in [low, high] whose point (`chosen`, this value, `pending`) fits.

        `low` itself fits (the sweep's validation refused any student whose lowest point does not), so the
        answer is never below it.
        """
        def fits(value: float) -> bool:
            return not self.over(student, chosen | {option: option_value(option, value)} | pending, LATENCY_MARGIN)

        if fits(high):
            return high
        good, bad = low, high
        if SEARCHABLE_OPTIONS[option] is int:
            while bad - good > 1:
                middle = (good + bad) // 2
                good, bad = (middle, bad) if fits(middle) else (good, middle)
        else:
            for _ in range(FLOAT_STEPS):
                middle = (good + bad) / 2
                good, bad = (middle, bad) if fits(middle) else (good, middle)
        return good


def limits_of(sweep: SweepConfig) -> dict[str, float]:
    return {k: v for k, v in sweep.constraints.model_dump().items() if v is not None}


def check_students(sweep: SweepConfig, data: Dataset) -> None:
    """Refuse, before any work, a fixed student over a limit or a searched one whose lowest point is."""
    bounds = CostBounds.of(sweep, Shape.of(data))
    if bounds is None:
        return
    for index, student in enumerate(sweep.students):
        lows = {option: option_value(option, low) for option, (low, _) in student.search.items()}
        over = bounds.over(index, lows)
        if not over:
            continue
        label = ModelConfig(arch=student.arch, options=student.options | lows).label
        if lows:
            raise UserError(f"students.{index} ({label}, the lowest point of its search): {'; '.join(over)}, so every "
                            "trial of it would be; lower the search's low bounds or raise the limit")
        raise UserError(f"students.{index} ({label}): {'; '.join(over)}; make the student smaller or raise the limit")


def trial_refusal(sweep: SweepConfig, student: nn.Module, shape: Shape, cost: Cost) -> str | None:
    """Why a trial's student must not be trained (a limit it is over, measured now), or None.

    `cost` was measured without latency; latency is measured here when it is constrained.
    """
    limits = limits_of(sweep)
    if "max_latency_ms" in limits:
        cost = measure(student, shape, latency=True)
    over = excess(limits, cost)
    return f"not trained: the student's {'; '.join(over)}" if over else None
