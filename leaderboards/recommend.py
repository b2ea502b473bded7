"""`kdarena recommend`: the best student + method + config within a cost budget, from the leaderboard's evidence.

The candidates are the leaderboard's rows for the dataset (and teacher, if
given) whose cost is within the budget; the first in the leaderboard's own
order is the recommendation and the next ones are the runner-ups, so
`recommend` and `leaderboard` never disagree on what is best. Each entry
says what it stands on (sweep, seeds, mean and its 95 % interval) and how
far it is from the same student trained alone on the same teacher's pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from kdarena.training.record import Metric

from .board import leaderboard

#: budget option → the leaderboard column it limits
BUDGET_COLUMNS = {"max_macs": Metric.MACS, "max_params": Metric.PARAMS, "max_latency_ms": Metric.LATENCY_MS}
BASELINE = "baseline"  # the student trained alone
# what an entry of the answer carries, from its leaderboard row
ENTRY_FIELDS = ("dataset", "teacher", "student", "method", "key_hparams", "val_acc_mean", "test_acc_mean", "test_acc_std",
                "n_seeds",
                Metric.MACS, Metric.PARAMS, Metric.LATENCY_MS, "sweep", "source", "run_id")


@dataclass(frozen=True)
class Budget:
    """At most one cost limit: `kind` is a key of BUDGET_COLUMNS, or None for no limit."""

    kind: str | None = None
    limit: float | None = None

    @property
    def column(self) -> str | None:
        return BUDGET_COLUMNS[self.kind] if self.kind else None

    def describe(self) -> str:
        return f"{self.kind.replace('_', '-')} {self.limit:g}" if self.kind else "no cost limit"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


def _entry(row: pd.Series, alone: pd.Series | None) -> dict[str, Any]:
    entry = {k: (_number(row[k]) if isinstance(row[k], float) else row[k]) for k in ENTRY_FIELDS}
    entry["n_seeds"] = int(row["n_seeds"])
    entry["rank"] = int(row["rank"])  # shared by ties
    low, high = _number(row["test_acc_ci_low"]), _number(row["test_acc_ci_high"])
    entry["ci95"] = None if low is None else [low, high]
    if alone is None or row["method"] == BASELINE:
        entry["vs_student_alone"] = None
    else:
        p_value = _number(row["vs_student_p"])
        entry["vs_student_alone"] = {
            "student_alone_test_acc": _number(alone["test_acc_mean"]),
            # over the seeds both share when there are any (paired), else the difference of the means
            "difference": _number(row["vs_student_diff"]) if _number(row["vs_student_diff"]) is not None
            else _number(row["test_acc_mean"] - alone["test_acc_mean"]),
            "paired_seeds": int(row["vs_student_n"]) if _number(row["vs_student_n"]) is not None else 0,
            "p_value": p_value, "distinguishable": bool(row["distinguishable"]) if p_value is not None else None}
    return entry


def recommend(runs: pd.DataFrame, dataset: str, teacher: str | None = None, budget: Budget = Budget(),
              runner_ups: int = 3) -> dict[str, Any]:
    """{dataset, teacher, budget, recommendation (None when there is no evidence), runner_ups, reason}.

    `reason` says why there is no recommendation: no finished runs on the
    dataset (and teacher), or none within the budget (naming the cheapest).
    """
    board = leaderboard(runs, dataset=dataset, teacher=teacher, by=budget.column or "macs")
    answer: dict[str, Any] = {"dataset": dataset, "teacher": teacher, "budget": budget.describe(),
                              "recommendation": None, "runner_ups": [], "reason": None}
    if board.empty:
        answer["reason"] = (f"no finished full-budget run on dataset {dataset!r}"
                            + (f" with teacher {teacher!r}" if teacher else "") + " in the store")
        return answer
    fits = board if budget.kind is None else board[board[budget.column] <= budget.limit]
    if fits.empty:
        cheapest = board.sort_values(budget.column).iloc[0]
        known = _number(cheapest[budget.column])
        answer["reason"] = (f"no student within {budget.describe()}: the cheapest with evidence is "
                            f"{cheapest['student']} at {'unmeasured' if known is None else f'{known:g}'} "
                            f"{budget.column}")
        return answer
    alone = {(r["dataset"], r["teacher"], r["student"]): r for _, r in board[board["method"] == BASELINE].iterrows()}
    # the student alone on the same pair, else the same student trained alone without a teacher (as the board pairs)
    entries = [_entry(row, alone.get((row["dataset"], row["teacher"], row["student"]),
                                     alone.get((row["dataset"], "", row["student"]))))
               for _, row in fits.head(1 + runner_ups).iterrows()]
    # ranks within the budget (ties kept): the first row of each leaderboard rank among those that fit
    first_at = {}
    for position, rank in enumerate(fits["rank"].tolist(), start=1):
        first_at.setdefault(rank, position)
    for entry in entries:
        entry["rank"] = first_at[entry["rank"]]
    answer["recommendation"], answer["runner_ups"] = entries[0], entries[1:]
    return answer


def model_of_label(label: str) -> dict[str, Any]:
    """A model label (`cnn(channels=16)`, `resnet56`) back to {arch, options}: the form sweep files take."""
    import yaml

    if "(" not in label or not label.endswith(")"):
        return {"arch": label}
    arch, inner = label[:-1].split("(", 1)
    options = {}
    for part in filter(None, inner.split(",")):
        key, _, value = part.partition("=")
        options[key.strip()] = yaml.safe_load(value)
    return {"arch": arch, "options": options}


def gather_sweep(dataset: dict[str, Any], teacher: str | None, budget: Budget) -> dict[str, Any]:
    """A sweep document that would gather the missing evidence: the leading methods, a searched student, the budget.

    `dataset` is the sweep's `dataset:` entry (the caller knows which names kdarena loads itself).
    """
    label = dataset.get("label") or dataset["name"]
    doc: dict[str, Any] = {
        "name": "gather-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in str(label))[:60],
        "dataset": dataset,
        "teacher": model_of_label(teacher) if teacher else {"arch": "cnn", "options": {"channels": 32}},
        "students": [{"arch": "cnn", "search": {"channels": [2, 32]}}],
        "methods": {m: {} for m in ("baseline", "kd", "dkd", "dist", "crd")},
        "budget": {"trials_per_method": 8, "epochs": 10},
        "final": {"seeds": 3},
    }
    if budget.kind is not None:
        doc["constraints"] = {budget.kind: budget.limit}
    return doc
