"""The ranking: one row per (dataset, teacher, student, method) from finished full-budget runs.

Early-stopped, diverged and failed runs never rank. A group stands on its
final runs (one per seed); without finals, on its `kdarena train` runs; else
on its best completed trial. Rows rank by `stats.best_first` (mean val_acc,
then MACs, then seeds: never test accuracy) with ties sharing a rank; they
show test accuracy's mean, std and 95 % CI, and the paired difference from
the student alone. `pareto` marks the rows on the front of test accuracy
against a cost within each dataset and teacher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

from kdarena.training.record import Metric, Role, Status

from .stats import best_first, finite, latency_noise_ms, paired_test, pareto_mask, sample_std, t_interval, tied_ranks
from .text import format_hparams


#: `by` values → leaderboard cost column ("latency" is the CLI's short name)
COSTS = {"macs": "macs", "params": "params", "latency": "latency_ms", "latency_ms": "latency_ms"}


#: the student trained alone: every other row is compared with it
STUDENT_ALONE = "baseline"

LEADERBOARD_COLUMNS = ["rank", "dataset", "teacher", "student", "method", "test_acc_mean", "test_acc_std", "n_seeds",
                       "test_acc_ci_low", "test_acc_ci_high", "val_acc_mean",
                       # the paired difference from the student alone (see `_versus_student_alone`)
                       "vs_student_diff", "vs_student_n", "vs_student_p", "distinguishable",
                       "seeds", "test_accs", "params", "macs", "latency_ms", "key_hparams", "source", "run_id", "pareto",
                       # how far another row's latency must be to differ (zoo.cost.latency_noise_ms)
                       "latency_noise_ms", "flops", "student_arch", "sweep", "experiment", "run_ids", "reported",
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


def _one_run_per_seed(df: pd.DataFrame) -> pd.DataFrame:
    """Final and train runs: the latest run per config and seed; a repeat is the same evidence, not another seed."""
    repeats = df["role"].isin(_CONFIG_ROLES) & df["seed"].notna()
    latest = df[repeats].sort_values("start_time").drop_duplicates(
        ["dataset", "teacher", "student", "method", "role", "config_key", "seed"], keep="last")
    return pd.concat([df[~repeats], latest])


_CONFIG_ROLES = ("final", "train")


def _mean(values: list[float]) -> float:
    """The mean of the known values (as pandas' mean skips NaN); NaN if none is."""
    known = [v for v in values if finite(v)]
    return sum(known) / len(known) if known else math.nan


def _pick(group: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs that stand for one (dataset, teacher, student, method): final seeds, else train runs, else a trial.

    Final and train runs are split by config (all params but the seed), so
    two sweeps' finals never mix; the config that stands is the best by
    `best_first` (mean val_acc, then MACs, then seeds; never test accuracy),
    then the earlier. Trials: the best one by the same key, one seed each.
    """
    for role in _CONFIG_ROLES:
        runs = group[group["role"] == role]
        if not runs.empty:
            # config -> [val_accs, macs, first start], in plain Python: pandas' agg per group took seconds on 10,000 runs
            configs: dict[str, list] = {}
            for config, val, macs, start in zip(runs["config_key"], runs["val_acc"], runs["macs"], runs["start_time"]):
                entry = configs.setdefault(config, [[], macs, start])
                entry[0].append(val)
                entry[1] = entry[1] if finite(entry[1]) else macs
                entry[2] = min(entry[2], start)
            best = min(configs, key=lambda c: (best_first(_mean(configs[c][0]), configs[c][1], len(configs[c][0])),
                                               configs[c][2]))
            return runs[runs["config_key"] == best], role
    keys = [(best_first(v, m, 1), t) for v, m, t in zip(group["val_acc"], group["macs"], group["start_time"])]
    return group.iloc[[min(range(len(keys)), key=keys.__getitem__)]], "trial"


def _row(key: tuple[str, str, str, str], runs: pd.DataFrame, source: str) -> dict[str, Any]:
    runs = runs.sort_values(["seed", "start_time"], na_position="last")
    first = runs.iloc[0]
    accs = runs["test_acc"].astype(float).tolist()
    low, high = t_interval(accs)
    dataset, teacher, student, method = key
    return {"rank": 0, "dataset": dataset, "teacher": teacher, "student": student, "method": method,
            "test_acc_mean": sum(accs) / len(accs), "test_acc_std": sample_std(accs), "n_seeds": len(accs),
            "test_acc_ci_low": low, "test_acc_ci_high": high, "val_acc_mean": float(runs["val_acc"].mean()),
            "vs_student_diff": math.nan, "vs_student_n": 0, "vs_student_p": math.nan, "distinguishable": None,
            "seeds": [int(s) for s in runs["seed"] if not math.isnan(s)], "test_accs": accs,
            "params": runs["params"].dropna().iloc[0] if runs["params"].notna().any() else math.nan,
            "macs": runs["macs"].dropna().iloc[0] if runs["macs"].notna().any() else math.nan,
            "latency_ms": float(runs["latency_ms"].median()) if runs["latency_ms"].notna().any() else math.nan,
            "key_hparams": format_hparams(first["hparams"]), "source": source, "run_id": first["run_id"],
            "pareto": False,
            "latency_noise_ms": latency_noise_ms(runs["latency_ms"].astype(float).tolist(),
                                                 runs["latency_iqr_ms"].astype(float).tolist()),
            "flops": runs["flops"].dropna().iloc[0] if runs["flops"].notna().any() else math.nan,
            "student_arch": first["student_arch"], "sweep": first["sweep"], "experiment": first["experiment"],
            "run_ids": runs["run_id"].tolist(), "reported": False, "dataset_label": first["dataset_label"],
            "dataset_fingerprint": first["dataset_fingerprint"]}


def _versus_student_alone(rows: list[dict[str, Any]]) -> None:
    """Each row's paired difference in test accuracy from the student alone, filled in place.

    The reference is the `baseline` row of the same dataset and student under
    the same teacher, else the one with no teacher (a `kdarena train` run).
    The test pairs the runs by seed (a seed fixes the data order and the
    student's initial weights); fewer than two shared seeds: no p-value, and
    `distinguishable` is None.
    """
    alone = {(r["dataset"], r["teacher"], r["student"]): r for r in rows if r["method"] == STUDENT_ALONE}
    for row in rows:
        if row["method"] == STUDENT_ALONE:
            continue
        ref = alone.get((row["dataset"], row["teacher"], row["student"])) or alone.get((row["dataset"], "", row["student"]))
        if ref is None:
            continue
        test = paired_test(dict(zip(row["seeds"], row["test_accs"])), dict(zip(ref["seeds"], ref["test_accs"])))
        row |= {"vs_student_diff": test.diff, "vs_student_n": test.n, "vs_student_p": test.p_value,
                "distinguishable": test.distinguishable}


def empty_leaderboard() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in _FLOAT_COLUMNS else "object") for c in LEADERBOARD_COLUMNS})


_FLOAT_COLUMNS = ("test_acc_mean", "test_acc_std", "test_acc_ci_low", "test_acc_ci_high", "val_acc_mean",
                  "vs_student_diff", "vs_student_p", "params", "macs", "latency_ms", "latency_noise_ms", "flops")


def leaderboard(runs: pd.DataFrame, *, dataset: str | Iterable[str] | None = None,
                teacher: str | Iterable[str] | None = None, method: str | Iterable[str] | None = None,
                student: str | Iterable[str] | None = None, max_macs: float | None = None,
                max_params: float | None = None, by: str = "macs") -> pd.DataFrame:
    """The ranking: one row per (dataset, teacher, student, method) from finished full-budget runs.

    Early-stopped, diverged and failed runs never rank. A group stands on its
    final runs, one per seed (source "final"); without finals, on its
    `kdarena train` runs ("train"); else on its best completed trial ("trial",
    n=1); `_pick` chooses by val_acc, never by test accuracy. Each row: test
    accuracy's mean, sample std and 95 % Student-t CI (NaN for one seed),
    mean val_acc, and the paired difference from the student alone (see
    `_versus_student_alone`, computed before the filters). Filters (one value
    or several) apply next; `pareto` marks the rows on the front of
    test_acc_mean vs `by` (macs | params | latency) within each dataset +
    teacher. Sorted by dataset, then best first by `stats.best_first` (mean
    val_acc, then MACs, then seeds); `rank` counts within the dataset and
    rows with equal keys share a rank (1, 1, 3).
    """
    cost = cost_column(by)
    df = _dataset_filter(finished(runs), dataset)
    if df.empty:
        return empty_leaderboard()
    keys = ["dataset", "teacher", "student", "method"]
    df = _one_run_per_seed(df.assign(teacher=df["teacher"].fillna("")))
    rows = [_row(key, *_pick(group)) for key, group in df.groupby(keys, sort=True, dropna=False)]
    _versus_student_alone(rows)
    board = _filter(pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS), teacher=teacher, method=method, student=student)
    if max_macs is not None:
        board = board[board["macs"] <= max_macs]
    if max_params is not None:
        board = board[board["params"] <= max_params]
    if board.empty:
        return empty_leaderboard()
    board = board.copy()
    board["pareto"] = False
    for idx in board.groupby(["dataset", "teacher"], sort=False).groups.values():
        noise = board.loc[idx, "latency_noise_ms"].tolist() if cost == Metric.LATENCY_MS else None
        mask = pareto_mask(board.loc[idx, "test_acc_mean"].tolist(), board.loc[idx, cost].tolist(), noise)
        board.loc[idx, "pareto"] = mask
    key = ["_val", "_cost", "_seeds"]
    board[key] = [best_first(v, m, n) for v, m, n in zip(board["val_acc_mean"], board["macs"], board["n_seeds"])]
    board = board.sort_values(["dataset", *key, "student", "method"]).reset_index(drop=True)
    board["rank"] = 0
    for idx in board.groupby("dataset", sort=False).groups.values():
        board.loc[idx, "rank"] = tied_ranks(list(board.loc[idx, key].itertuples(index=False, name=None)))
    board["pareto"] = board["pareto"].astype(bool)
    board["n_seeds"] = board["n_seeds"].astype(int)
    board["vs_student_n"] = board["vs_student_n"].astype(int)
    return board.drop(columns=key)


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
