"""Statistics of the leaderboard: the Pareto front of accuracy against a cost, and the spread over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def pareto_mask(acc: Sequence[float], cost: Sequence[float]) -> list[bool]:
    """True for each point no other point dominates (as accurate or more, as cheap or cheaper, better in one).

    Points with a missing (None/NaN) accuracy or cost are never on the front
    and never dominate another. Equal points are all on the front. O(n log n).
    """
    if len(acc) != len(cost):
        raise ValueError(f"pareto_mask: {len(acc)} accuracies but {len(cost)} costs")
    mask = [False] * len(acc)
    valid = [i for i in range(len(acc)) if _finite(acc[i]) and _finite(cost[i])]
    # cheapest first, most accurate first among equal costs: a point is on the front iff it
    # beats the best accuracy of every strictly cheaper point and ties the best of its own cost
    valid.sort(key=lambda i: (float(cost[i]), -float(acc[i])))
    best_cheaper = -math.inf  # best accuracy among strictly cheaper points
    k = 0
    while k < len(valid):
        c = float(cost[valid[k]])
        group = []
        while k < len(valid) and float(cost[valid[k]]) == c:
            group.append(valid[k])
            k += 1
        top = float(acc[group[0]])
        if top > best_cheaper:
            for i in group:
                if float(acc[i]) == top:
                    mask[i] = True
            best_cheaper = top
    return mask


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (accuracy, cost) points on the front, in input order."""
    mask = pareto_mask([p[0] for p in points], [p[1] for p in points])
    return [i for i, on in enumerate(mask) if on]


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n − 1); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
