"""The ranking: one row per (dataset, teacher, student, method) from finished full-budget runs.

Early-stopped, diverged and failed runs never rank. A group's figure is the
mean ± sample std of its final runs' test accuracy; without finals, of its
`kdarena train` runs; else the test accuracy of its best completed trial by
val_acc. `pareto` marks the rows on the front of accuracy against a cost
within each dataset and teacher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

from kdarena.training.record import Role, Status

from .stats import pareto_mask, sample_std
from .text import format_hparams


#: `by` values → leaderboard cost column ("latency" is the CLI's short name)
COSTS = {"macs": "macs", "params": "params", "latency": "latency_ms", "latency_ms": "latency_ms"}


LEADERBOARD_COLUMNS = ["rank", "dataset", "teacher", "student", "method", "test_acc_mean", "test_acc_std", "n_seeds",
                       "params", "macs", "latency_ms", "key_hparams", "source", "run_id", "pareto",
                       "flops", "student_arch", "sweep", "experiment", "run_ids", "reported",
                       # the dataset's identity: `dataset` is its label, made unique with a short fingerprint
                       "dataset_label", "dataset_fingerprint"]


# -- the leaderboard ------------------------------------------------------------------------------------------
def _as_set(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    return {value} if isinstance(value, str) else set(value)


def _filter(df: pd.DataFrame, **filters: str | Iterable[str] | None) -> pd.DataFrame:
    for column, value in filters.items():
        wanted = _as_set(value)
        if wanted is not None:
            df = df[df[column].isin(wanted)]
    return df


def _dataset_filter(df: pd.DataFrame, dataset: str | Iterable[str] | None) -> pd.DataFrame:
    """Runs of the named datasets: by the name shown, the label (every dataset that carries it) or a fingerprint prefix."""
    wanted = _as_set(dataset)
    if wanted is None or df.empty:
        return df
    prefixes = tuple(w for w in wanted if len(w) >= 6)
    by_fingerprint = df["dataset_fingerprint"].fillna("").astype(str).str.startswith(prefixes) if prefixes else False
    return df[df["dataset"].isin(wanted) | df["dataset_label"].isin(wanted) | by_fingerprint]


def cost_column(by: str) -> str:
    """`by` (macs | params | latency | latency_ms) → the leaderboard column it ranks cost by."""
    if by not in COSTS:
        raise ValueError(f"by={by!r}: choose one of macs, params, latency")
    return COSTS[by]


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """Completed full-budget runs with a test accuracy, de-duplicated (by run id, then by sweep trial key)."""
    if runs.empty:
        return runs
    df = runs[runs["role"].isin(Role.STUDENTS) & (runs["status"] == Status.COMPLETED) & runs["test_acc"].notna()]
    df = df.drop_duplicates("run_id")
    # a resumed sweep could leave two runs for one trial record: keep the latest
    keyed = df["trial_key"].notna() & df["sweep"].notna()
    latest = df[keyed].sort_values("start_time").drop_duplicates(["experiment", "sweep", "trial_key"], keep="last")
    return pd.concat([df[~keyed], latest])


def _pick(group: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs that stand for one (dataset, teacher, student, method): final seeds, else train runs, else a trial.

    Final and train runs are split by config (all params but the seed) and the
    config with the best mean test accuracy stands (so two sweeps' finals never
    mix); trials: the best completed one by val_acc (never chosen by test_acc).
    """
    for role in ("final", "train"):
        runs = group[group["role"] == role]
        if not runs.empty:
            best_key = max(runs.groupby("config_key")["test_acc"].agg(["mean", "size"]).itertuples(),
                           key=lambda r: (r.mean, r.size, r.Index)).Index
            return runs[runs["config_key"] == best_key], role
    trials = group.sort_values(["val_acc", "start_time"], ascending=[False, True], na_position="last")
    return trials.head(1), "trial"


def _row(key: tuple[str, str, str, str], runs: pd.DataFrame, source: str) -> dict[str, Any]:
    runs = runs.sort_values(["seed", "start_time"], na_position="last")
    first = runs.iloc[0]
    accs = runs["test_acc"].astype(float).tolist()
    dataset, teacher, student, method = key
    return {"rank": 0, "dataset": dataset, "teacher": teacher, "student": student, "method": method,
            "test_acc_mean": sum(accs) / len(accs), "test_acc_std": sample_std(accs), "n_seeds": len(accs),
            "params": runs["params"].dropna().iloc[0] if runs["params"].notna().any() else math.nan,
            "macs": runs["macs"].dropna().iloc[0] if runs["macs"].notna().any() else math.nan,
            "latency_ms": float(runs["latency_ms"].median()) if runs["latency_ms"].notna().any() else math.nan,
            "key_hparams": format_hparams(first["hparams"]), "source": source, "run_id": first["run_id"],
            "pareto": False,
            "flops": runs["flops"].dropna().iloc[0] if runs["flops"].notna().any() else math.nan,
            "student_arch": first["student_arch"], "sweep": first["sweep"], "experiment": first["experiment"],
            "run_ids": runs["run_id"].tolist(), "reported": False, "dataset_label": first["dataset_label"],
            "dataset_fingerprint": first["dataset_fingerprint"]}


def empty_leaderboard() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("test_acc_mean", "test_acc_std", "params", "macs",
                                                                "latency_ms", "flops") else "object")
                         for c in LEADERBOARD_COLUMNS})


def leaderboard(runs: pd.DataFrame, *, dataset: str | Iterable[str] | None = None,
                teacher: str | Iterable[str] | None = None, method: str | Iterable[str] | None = None,
                student: str | Iterable[str] | None = None, max_macs: float | None = None,
                max_params: float | None = None, by: str = "macs") -> pd.DataFrame:
    """The ranking: one row per (dataset, teacher, student, method) from finished full-budget runs.

    Early-stopped, diverged and failed runs never rank. A group's figure is
    the mean ± sample std of its final runs' test accuracy (source "final");
    without finals, of its `kdarena train` runs ("train"); else the test
    accuracy of its best completed trial by val_acc, n=1 ("trial"). Filters
    (one value or several) apply first; then `pareto` marks the rows on the
    front of test_acc_mean vs `by` (macs | params | latency) within each
    dataset + teacher. Sorted by dataset, then test_acc_mean (best first);
    `rank` counts within the dataset.
    """
    cost = cost_column(by)
    df = _filter(_dataset_filter(finished(runs), dataset), teacher=teacher, method=method, student=student)
    if df.empty:
        return empty_leaderboard()
    keys = ["dataset", "teacher", "student", "method"]
    df = df.assign(teacher=df["teacher"].fillna(""))
    rows = []
    for key, group in df.groupby(keys, sort=True, dropna=False):
        chosen, source = _pick(group)
        rows.append(_row(key, chosen, source))
    board = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    if max_macs is not None:
        board = board[board["macs"] <= max_macs]
    if max_params is not None:
        board = board[board["params"] <= max_params]
    if board.empty:
        return empty_leaderboard()
    board = board.copy()
    board["pareto"] = False
    for idx in board.groupby(["dataset", "teacher"], sort=False).groups.values():
        mask = pareto_mask(board.loc[idx, "test_acc_mean"].tolist(), board.loc[idx, cost].tolist())
        board.loc[idx, "pareto"] = mask
    board = board.sort_values(["dataset", "test_acc_mean", cost, "student", "method"],
                              ascending=[True, False, True, True, True], na_position="last")
    board["rank"] = board.groupby("dataset").cumcount() + 1
    board["pareto"] = board["pareto"].astype(bool)
    board["n_seeds"] = board["n_seeds"].astype(int)
    return board.reset_index(drop=True)


def check_filters(runs: pd.DataFrame, dataset: str | None, teacher: str | None) -> None:
    """A UserError naming the filter that matches neither our finished runs nor a published result, and the known values."""
    from kdarena.zoo.errors import UserError

    from .references import reference_rows

    done = finished(runs)
    refs = reference_rows()
    known_ds = sorted(set(done["dataset"].dropna()) | set(done["dataset_label"].dropna()) | set(refs["dataset"]))
    known_t = sorted(set(done["teacher"].dropna()) - {""} | set(refs["teacher"]))
    parts = []
    if dataset is not None and dataset not in known_ds:
        parts.append(f"--dataset {dataset!r} has no finished runs or published results; known: {', '.join(known_ds)}")
    if teacher is not None and teacher not in known_t:
        parts.append(f"--teacher {teacher!r} has no finished runs or published results; known: {', '.join(known_t)}")
    if not parts:
        parts.append(f"no finished runs or published results for --dataset {dataset} with --teacher {teacher}")
    raise UserError("; ".join(parts))
