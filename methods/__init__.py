"""Distillation methods, one file each, and the engine that trains any of them.

Adding a method: one file with a `Distiller` subclass, one line here, its tests.
"""

from __future__ import annotations

from kdarena.zoo.errors import UserError

from .base import Distiller, MethodParams, PairInfo, StepInfo
from .baseline import Baseline
from .kd import KD

METHODS: dict[str, type[Distiller]] = {
    "baseline": Baseline,
    "kd": KD,
    # (one line per method, in methods.md's order)
}


def get_method(name: str) -> type[Distiller]:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; known methods: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Distiller", "MethodParams", "PairInfo", "StepInfo", "get_method"]
