"""Statistics of the leaderboard: the Pareto front, the spread over seeds, the paired test and what "best" means.

Pure functions over numbers; `search/` imports them too, so the sweep, `export`
and the leaderboard share one definition of "best".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass


def finite(x: float | None) -> bool:
    """A known number: not None, NaN or infinite."""
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def pareto_mask(acc: Sequence[float], cost: Sequence[float], cost_noise: Sequence[float] | None = None) -> list[bool]:
    """True for each point no other point dominates (as accurate or more, as cheap or cheaper, better in one).

    Points with a missing (None/NaN) accuracy or cost are never on the front
    and never dominate another. Equal points are all on the front. O(n log n).

    `cost_noise` (a measured cost's noise, e.g. latency's): two costs closer
    than the larger of their noises are a tie, so a point that is cheaper
    only by noise does not stand on the front beside a more accurate one. O(n²).
    """
    if len(acc) != len(cost) or (cost_noise is not None and len(cost_noise) != len(cost)):
        raise ValueError(f"pareto_mask: {len(acc)} accuracies, {len(cost)} costs"
                         + ("" if cost_noise is None else f" and {len(cost_noise)} noises"))
    if cost_noise is not None:
        return _noisy_pareto_mask(acc, cost, cost_noise)
    mask = [False] * len(acc)
    valid = [i for i in range(len(acc)) if finite(acc[i]) and finite(cost[i])]
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


def _noisy_pareto_mask(acc: Sequence[float], cost: Sequence[float], noise: Sequence[float]) -> list[bool]:
    valid = [i for i in range(len(acc)) if finite(acc[i]) and finite(cost[i])]
    tol = [float(n) if finite(n) and n > 0 else 0.0 for n in noise]
    mask = [False] * len(acc)
    for i in valid:
        mask[i] = not any(_dominates(acc[j], cost[j], acc[i], cost[i], max(tol[i], tol[j])) for j in valid if j != i)
    return mask


def _dominates(acc_a: float, cost_a: float, acc_b: float, cost_b: float, tie: float) -> bool:
    """a dominates b: as accurate, no costlier beyond `tie`, and more accurate or cheaper beyond `tie`."""
    return acc_a >= acc_b and cost_a <= cost_b + tie and (acc_a > acc_b or cost_a < cost_b - tie)


#: separate measurements of one model move by more than one measurement's IQR (benchmarks/latency_noise.py, in
#: the README): latencies closer than this fraction of their median are never told apart
LATENCY_RTOL = 0.05


def latency_noise_ms(latencies_ms: Sequence[float], iqrs_ms: Sequence[float]) -> float:
    """How far another latency must be from a model's measured ones to differ: the largest of the measurements'
    interquartile ranges, their spread and `LATENCY_RTOL` of their median; NaN without a measurement."""
    measured = sorted(float(v) for v in latencies_ms if finite(v))
    if not measured:
        return math.nan
    iqr = max((float(v) for v in iqrs_ms if finite(v)), default=0.0)
    return max(iqr, measured[-1] - measured[0], LATENCY_RTOL * statistics.median(measured))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (accuracy, cost) points on the front, in input order."""
    mask = pareto_mask([p[0] for p in points], [p[1] for p in points])
    return [i for i, on in enumerate(mask) if on]


# -- the spread over seeds, and how a row compares with the student alone --------------------------------------
#: the confidence of every interval and the level of every test the leaderboard shows
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n − 1); NaN for fewer than two values (one seed says nothing of the spread)."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Student-t confidence interval of the mean, (low, high); (NaN, NaN) for fewer than two values."""
    from scipy.special import stdtrit  # the t quantile; scipy.stats would add a second to every CLI call

    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean = sum(values) / n
    half = float(stdtrit(n - 1, (1 + confidence) / 2)) * sample_std(values) / math.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True)
class Paired:
    """A row against a reference over the seeds both ran: paired seeds share data order and initial weights."""

    diff: float  # mean of (row − reference) over the shared seeds; NaN when they share none
    n: int  # shared seeds
    p_value: float  # two-sided paired t-test; NaN with fewer than two shared seeds

    @property
    def distinguishable(self) -> bool | None:
        """p < ALPHA; None when there is no test (fewer than two shared seeds)."""
        return None if math.isnan(self.p_value) else bool(self.p_value < ALPHA)


def paired_test(values: Mapping[int, float], reference: Mapping[int, float]) -> Paired:
    """The paired t-test of `values` against `reference`, both keyed by seed, over the seeds both have.

    Differences that are all equal have no spread: p is 1 if they are zero
    and 0 otherwise (the t statistic is infinite), as the t-test's limit.
    """
    from scipy.special import stdtr  # the t distribution's CDF

    shared = sorted(set(values) & set(reference))
    diffs = [float(values[s]) - float(reference[s]) for s in shared]
    n = len(diffs)
    if n == 0:
        return Paired(math.nan, 0, math.nan)
    mean = sum(diffs) / n
    if n < 2:
        return Paired(mean, n, math.nan)
    sd = sample_std(diffs)
    if sd == 0:
        return Paired(mean, n, 1.0 if mean == 0 else 0.0)
    statistic = mean / (sd / math.sqrt(n))
    return Paired(mean, n, float(2 * stdtr(n - 1, -abs(statistic))))


# -- what "best" means -----------------------------------------------------------------------------------------
def best_first(val_acc: float | None, macs: float | None, seeds: int) -> tuple[float, float, int]:
    """The sort key of "best", shared by the leaderboard, `kdarena export` and a sweep's choice of finals.

    Best first when sorted ascending: the higher mean val_acc of the runs that
    stand (never test accuracy: the test set is only for reporting), then the
    lower cost in MACs, then more seeds. A missing val_acc sorts last, a
    missing cost after any known one.
    """
    val = float(val_acc) if finite(val_acc) else -math.inf
    cost = float(macs) if finite(macs) else math.inf
    return -val, cost, -int(seeds)


def tied_ranks(keys: Sequence[Hashable]) -> list[int]:
    """Competition ranks of keys already sorted best first: equal keys share a rank (1, 1, 3)."""
    ranks: list[int] = []
    for i, key in enumerate(keys):
        ranks.append(ranks[-1] if i and key == keys[i - 1] else i + 1)
    return ranks
