"""The dashboard's sweep pages: each sweep's trials and how they ended."""

from __future__ import annotations

import pandas as pd

from kdarena.training.record import Role, Status




def count_column(status: str) -> str:
    """The sweeps table's column counting a sweep's trials that ended so (`early-stopped` -> `early_stopped`)."""
    return status.replace("-", "_")


SWEEP_COLUMNS = ["name", "dataset", "teacher", "trials", *(count_column(s) for s in Status.FINISHED), Status.RUNNING,
                 "final_runs", "methods", "experiment", "parent_run_id", "start_time"]


TRIAL_COLUMNS = ["order", "run_id", "method", "student", "status", "reason", "val_acc", "test_acc", "epochs_completed",
                 "hparams", "searched", "params", "macs", "start_time", "run_name", "warm_start"]


# -- sweeps and runs -------------------------------------------------------------------------------------------
def sweeps(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per sweep: name, dataset, teacher, trials and how they ended (plus final runs, methods)."""
    if runs.empty:
        return pd.DataFrame(columns=SWEEP_COLUMNS)
    swept = runs[runs["sweep"].notna()]
    rows = []
    for name, group in swept.groupby("sweep", sort=True):
        trials = group[group["role"] == Role.TRIAL]
        status = trials["status"].value_counts()
        rows.append({"name": name, "dataset": group["dataset"].iloc[0], "teacher": group["teacher"].iloc[0],
                     "trials": len(trials), **{count_column(s): int(status.get(s, 0)) for s in Status.FINISHED},
                     Status.RUNNING: int(len(trials) - status.reindex(list(Status.FINISHED), fill_value=0).sum()),
                     "final_runs": int((group["role"] == Role.FINAL).sum()),
                     "methods": sorted(group["method"].dropna().unique().tolist()),
                     "experiment": group["experiment"].iloc[0], "parent_run_id": group["parent_run_id"].dropna().iloc[0]
                     if group["parent_run_id"].notna().any() else None, "start_time": group["start_time"].min()})
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


def sweep_trials(runs: pd.DataFrame, sweep: str) -> pd.DataFrame:
    """A sweep's trial runs in start order (`order` 1, 2, …), every status included."""
    if runs.empty:
        return pd.DataFrame(columns=TRIAL_COLUMNS)
    trials = runs[(runs["sweep"] == sweep) & (runs["role"] == Role.TRIAL)].sort_values(["start_time", "run_id"])
    trials = trials.assign(order=range(1, len(trials) + 1))
    return trials.reindex(columns=TRIAL_COLUMNS).reset_index(drop=True)
