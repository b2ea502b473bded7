"""Search-space dimensions a method declares; the sweep turns them into Optuna distributions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"type": "float", "low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"type": "int", "low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class Choice:
    choices: tuple[Any, ...]

    def to_json(self) -> dict[str, Any]:
        return {"type": "categorical", "choices": list(self.choices)}


Dimension = FloatRange | IntRange | Choice

# Every method's space also holds these: they matter as much as
# the method's own knobs, so a search never holds them fixed by default.
COMMON_SPACE: dict[str, Dimension] = {
    "lr": FloatRange(1e-3, 0.3, log=True),
    "weight_decay": FloatRange(1e-6, 1e-2, log=True),
}
