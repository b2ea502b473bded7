"""Pure queries over the MLflow records a sweep or `kdarena train` writes: the leaderboard and its parts.

No Streamlit and no Ray here: the dashboard pages and `kdarena leaderboard`
call these functions, so both show one ranking. Everything reads MLflow;
nothing writes to it.

- `load_runs`: one row per train / trial / final run, read in bulk (a few
  read-only SQL queries on a sqlite store, else one paged `search_runs`
  pass; no per-run requests).
- `leaderboard`: finished full-budget runs grouped by (dataset, teacher,
  student, method); mean ± std test accuracy over seeds; Pareto marks.
  A dataset is its content fingerprint, shown by its label: two datasets
  with one label are shown apart (`label · 1a2b3c4d`), runs recorded before
  kdarena fingerprinted data are of unknown identity and never merged with
  fingerprinted ones.
- `reference_rows`: the published results of `kdarena.leaderboards`, in the
  leaderboard's columns, flagged as reported (not reproduced).
- `sweeps`, `sweep_trials`, `run_detail`: the Sweeps and Run pages.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from kdarena.training.record import Param, Tag

from .pareto import pareto_mask

QUICKSTART_COMMAND = "kdarena sweep --preset quickstart"
RUN_ROLES = ("train", "trial", "final")
STATUSES = ("completed", "early-stopped", "diverged", "failed")
#: `by` values → leaderboard cost column ("latency" is the CLI's short name)
COSTS = {"macs": "macs", "params": "params", "latency": "latency_ms", "latency_ms": "latency_ms"}
PAGE_SIZE = 10_000

RUN_COLUMNS = ["run_id", "experiment", "role", "sweep", "parent_run_id", "dataset", "dataset_label",
               "dataset_fingerprint", "teacher", "student", "student_arch",
               "method", "status", "reason", "test_acc", "val_acc", "params", "macs", "flops", "latency_ms",
               "extra_params", "epochs_completed", "seed", "start_time", "hparams",
               # beyond the brief: the Optuna point under its own names (kd/temperature), the record key of a
               # sweep run (de-duplication after a resume), and a hash of the config minus its seed
               "searched", "trial_key", "config_key", "run_name"]
LEADERBOARD_COLUMNS = ["rank", "dataset", "teacher", "student", "method", "test_acc_mean", "test_acc_std", "n_seeds",
                       "params", "macs", "latency_ms", "key_hparams", "source", "run_id", "pareto",
                       "flops", "student_arch", "sweep", "experiment", "run_ids", "reported",
                       # the dataset's identity: `dataset` is its label, made unique with a short fingerprint
                       "dataset_label", "dataset_fingerprint"]
REFERENCE_EXTRA = ["variant", "test_errors", "test_size", "note", "table", "citation"]
SWEEP_COLUMNS = ["name", "dataset", "teacher", "trials", "completed", "early_stopped", "diverged", "failed",
                 "running", "final_runs", "methods", "experiment", "parent_run_id", "start_time"]
TRIAL_COLUMNS = ["order", "run_id", "method", "student", "status", "reason", "val_acc", "test_acc", "epochs_completed",
                 "hparams", "searched", "params", "macs", "start_time", "run_name"]

_METRICS = ("test_acc", "val_acc", "params", "macs", "flops", "latency_ms", "extra_params", "epochs_completed")
# params that say where or how fast a run ran, not what it computed: ignored when comparing configs
_RUNTIME_PARAMS = {"train.seed", "seed", "cache_dir", "experiment", "dataset.root", "dataset.download",
                   "train.num_threads", "teacher.checkpoint", "teacher.sha256", "teacher.recipe.num_threads"}


# -- reading MLflow -------------------------------------------------------------------------------------------
def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def store_missing(tracking_uri: str) -> bool:
    """A sqlite store whose file does not exist yet (or is empty): no runs, and reading must not create it."""
    if not tracking_uri.startswith("sqlite:///"):
        return False
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    return not path.is_file() or path.stat().st_size == 0


def _value(text: str | None) -> Any:
    """An MLflow param string back to the number / bool / None it was logged from."""
    if text is None or text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _hparams(params: dict[str, str]) -> dict[str, Any]:
    """method.params.* and the common training knobs, short names: {temperature: 4.0, alpha: 0.9, lr: 0.05, ...}."""
    out = {k.removeprefix("method.params."): _value(v) for k, v in sorted(params.items())
           if k.startswith("method.params.")}
    for k in ("lr", "weight_decay"):
        if f"train.{k}" in params:
            out[k] = _value(params[f"train.{k}"])
    return out


def _status(tags: dict[str, str], run_state: str) -> str:
    status = tags.get("kdarena.status")
    if status:
        return status
    if run_state in ("FAILED", "KILLED"):
        return "failed"
    return "running" if run_state in ("RUNNING", "SCHEDULED") else "unknown"


def empty_runs() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in _METRICS or c == "seed" else "object")
                         for c in RUN_COLUMNS})


class _Runs:
    """Column lists for `load_runs`, filled one run at a time by either reader."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {c: [] for c in RUN_COLUMNS}

    def add(self, run_id: str, run_name: str | None, state: str, start_time: int | None, experiment: str,
            tags: dict[str, str], params: dict[str, str], metrics: dict[str, float], config_key: str | None) -> None:
        c = self.cols
        c["run_id"].append(run_id)
        c["run_name"].append(run_name)
        c["experiment"].append(experiment)
        c["role"].append(tags.get("kdarena.role"))
        c["sweep"].append(tags.get("kdarena.sweep"))
        c["parent_run_id"].append(tags.get("mlflow.parentRunId"))
        name = tags.get(Tag.DATASET) or params.get(Param.DATASET_NAME)
        c["dataset"].append(name)
        c["dataset_label"].append(tags.get(Tag.DATASET_LABEL) or name)
        c["dataset_fingerprint"].append(tags.get(Tag.DATASET_FINGERPRINT))
        c["teacher"].append(tags.get("kdarena.teacher_label", ""))
        c["student"].append(tags.get("kdarena.student_label") or tags.get("kdarena.student"))
        c["student_arch"].append(tags.get("kdarena.student"))
        c["method"].append(tags.get("kdarena.method") or params.get("method.name"))
        c["status"].append(_status(tags, state))
        c["reason"].append(tags.get("kdarena.reason"))
        for m in _METRICS:
            c[m].append(metrics.get(m, math.nan))
        seed = _value(params.get("train.seed"))
        c["seed"].append(float(seed) if isinstance(seed, int) else math.nan)
        c["start_time"].append(start_time)
        c["hparams"].append(_hparams(params))
        c["searched"].append({k: _value(v) for k, v in params.items() if "/" in k})
        c["trial_key"].append(tags.get("kdarena.trial_key"))
        c["config_key"].append(config_key)

    def frame(self) -> pd.DataFrame:
        if not self.cols["run_id"]:
            return empty_runs()
        df = pd.DataFrame(self.cols)
        df["start_time"] = pd.to_datetime(df["start_time"], unit="ms", utc=True)
        df["dataset"] = dataset_names(df)
        df["dataset_label"] = df["dataset_label"].fillna(df["dataset"])
        return df


def load_runs(tracking_uri: str, experiment_names: list[str] | None = None) -> pd.DataFrame:
    """One row per kdarena run with role train, trial or final, from every experiment (or the named ones).

    A sqlite store is read directly, read-only, in a few SQL queries (MLflow's
    own `search_runs` builds an ORM object per param, metric and tag: ~30 s
    for 10,000 runs here); any other store (an MLflow server) in one paged
    `search_runs` pass. No per-run requests either way. A sqlite store that
    does not exist yet reads as empty and is not created.

    Columns: `RUN_COLUMNS`. Metrics are floats, NaN when absent (`test_acc`
    exists only for completed full-budget runs; `val_acc` is the last
    epoch's); `hparams` (method.params.* and lr / weight_decay, short names)
    and `searched` (the Optuna point, e.g. {"kd/temperature": 3.2}) are dicts;
    `start_time` is a UTC timestamp; `config_key` (final and train runs
    only) hashes the run's config minus its seed.
    """
    if store_missing(tracking_uri):
        return empty_runs()
    if tracking_uri.startswith("sqlite:///"):
        try:
            return _load_runs_sqlite(Path(tracking_uri.removeprefix("sqlite:///")), experiment_names)
        except sqlite3.Error:  # an unexpected schema: MLflow's own reader below knows every version
            pass
    return _load_runs_client(tracking_uri, experiment_names)


def _load_runs_client(tracking_uri: str, experiment_names: list[str] | None) -> pd.DataFrame:
    from mlflow.entities import ViewType

    client = _client(tracking_uri)
    experiments: dict[str, str] = {}
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        experiments |= {e.experiment_id: e.name for e in page if experiment_names is None or e.name in experiment_names}
        token = page.token
        if not token:
            break
    out = _Runs()
    if not experiments:
        return out.frame()
    token = None
    while True:
        page = client.search_runs(list(experiments), filter_string="tags.`kdarena.role` != 'sweep'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE, page_token=token)
        for run in page:
            tags = run.data.tags
            role = tags.get("kdarena.role")
            if role not in RUN_ROLES:
                continue
            params = run.data.params
            key = _config_key(sorted(params.items())) if role in _CONFIG_ROLES else None
            out.add(run.info.run_id, run.info.run_name, run.info.status, run.info.start_time,
                    experiments.get(run.info.experiment_id, run.info.experiment_id), tags, params, run.data.metrics, key)
        token = page.token
        if not token:
            break
    return out.frame()


_CONFIG_ROLES = ("final", "train")


def _config_key(sorted_params: Iterable[tuple[str, str]]) -> str:
    text = "\n".join(f"{k}={v}" for k, v in sorted_params if k not in _RUNTIME_PARAMS and "/" not in k)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _load_runs_sqlite(db: Path, experiment_names: list[str] | None) -> pd.DataFrame:
    """The same rows as `_load_runs_client`, from MLflow's tables (runs, experiments, tags, params, latest_metrics)."""
    roles = ", ".join(f"'{r}'" for r in RUN_ROLES)
    con = sqlite3.connect(f"file:{quote(str(db.resolve()))}?mode=ro", uri=True)
    try:
        exps = {str(i): n for i, n in con.execute("SELECT experiment_id, name FROM experiments "
                                                  "WHERE lifecycle_stage = 'active'")
                if experiment_names is None or n in experiment_names}
        selected = f"SELECT run_uuid FROM tags WHERE key = 'kdarena.role' AND value IN ({roles})"
        runs = con.execute("SELECT run_uuid, name, status, start_time, experiment_id FROM runs "
                           f"WHERE run_uuid IN ({selected}) AND lifecycle_stage = 'active' "
                           "ORDER BY start_time, run_uuid").fetchall()
        tags: dict[str, dict[str, str]] = {}
        for run, key, value in con.execute(
                f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({selected}) "
                "AND (key LIKE 'kdarena.%' OR key = 'mlflow.parentRunId')"):
            tags.setdefault(run, {})[key] = value
        metrics: dict[str, dict[str, float]] = {}
        names = ", ".join(f"'{m}'" for m in _METRICS)
        for run, key, value, is_nan in con.execute(
                f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({selected}) "
                f"AND key IN ({names})"):
            metrics.setdefault(run, {})[key] = math.nan if is_nan else float(value)
        params: dict[str, dict[str, str]] = {}
        for run, key, value in con.execute(
                f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({selected}) "
                "AND (key LIKE 'method.params.%' OR instr(key, '/') > 0 OR key IN "
                "('train.seed', 'train.lr', 'train.weight_decay', 'dataset.name', 'method.name'))"):
            params.setdefault(run, {})[key] = value
        configs: dict[str, list[tuple[str, str]]] = {}
        config_roles = ", ".join(f"'{r}'" for r in _CONFIG_ROLES)
        for run, key, value in con.execute(
                f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN (SELECT run_uuid FROM tags WHERE "
                f"key = 'kdarena.role' AND value IN ({config_roles}))"):
            configs.setdefault(run, []).append((key, value))
    finally:
        con.close()
    out = _Runs()
    for run_id, name, state, start, exp_id in runs:
        exp = exps.get(str(exp_id))
        if exp is None:
            continue
        run_tags = tags.get(run_id, {})
        key = _config_key(sorted(configs[run_id])) if run_id in configs else None
        out.add(run_id, name, state, start, exp, run_tags, params.get(run_id, {}), metrics.get(run_id, {}), key)
    return out.frame()


def dataset_names(runs: pd.DataFrame) -> pd.Series:
    """The name each run's dataset is shown by: one name per dataset identity, never one name for two.

    The identity is the content fingerprint; a run without one (recorded
    before kdarena fingerprinted data) is of unknown identity, one per label.
    An identity is named by its latest run's label; a label that names one
    identity is the name, a label shared by several is followed by the
    fingerprint's first 8 characters (`unknown data` for the runs of unknown
    identity), so they rank apart.
    """
    if runs.empty:
        return pd.Series([], index=runs.index, dtype="object")
    given = runs["dataset_label"].fillna(runs["dataset"]).fillna("").astype(str)
    identity = runs["dataset_fingerprint"].where(runs["dataset_fingerprint"].notna(), "unknown:" + given)
    latest = given.groupby(identity).agg(lambda labels: labels.loc[runs.loc[labels.index, "start_time"].idxmax()])
    labels = identity.map(latest)
    shared = identity.groupby(labels).nunique()
    shared_labels = set(shared[shared > 1].index)
    short = runs["dataset_fingerprint"].fillna("").astype(str).str[:8].replace("", "unknown data")
    return labels.where(~labels.isin(shared_labels), labels + " · " + short)


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
    df = runs[runs["role"].isin(RUN_ROLES) & (runs["status"] == "completed") & runs["test_acc"].notna()]
    df = df.drop_duplicates("run_id")
    # a resumed sweep could leave two runs for one trial record: keep the latest
    keyed = df["trial_key"].notna() & df["sweep"].notna()
    latest = df[keyed].sort_values("start_time").drop_duplicates(["experiment", "sweep", "trial_key"], keep="last")
    return pd.concat([df[~keyed], latest])


def format_hparams(hparams: dict[str, Any] | None, limit: int | None = None) -> str:
    """`temperature=4 alpha=0.9 lr=0.05`: method knobs first, then lr and weight decay."""
    if not hparams:
        return ""
    items = [(k, v) for k, v in hparams.items() if k not in ("lr", "weight_decay")]
    items += [(k, hparams[k]) for k in ("lr", "weight_decay") if k in hparams]
    shown = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items]
    return " ".join(shown[:limit] if limit else shown)


def _sample_std(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


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
            "test_acc_mean": sum(accs) / len(accs), "test_acc_std": _sample_std(accs), "n_seeds": len(accs),
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


# -- published results ----------------------------------------------------------------------------------------
REPORTED = "reported (not reproduced): "


def reference_rows(dataset: str | None = None, teacher: str | Iterable[str] | None = None) -> pd.DataFrame:
    """Published results in the leaderboard's columns, flagged: source = "reported (not reproduced): <citation>".

    test_acc_mean is the published value (a fraction); n_seeds, test_acc_std,
    latency_ms and rank are NaN (references never rank); pareto is False;
    `reported` is True. Extra columns: variant, test_errors, test_size,
    note, table, citation. `teacher` (beyond the brief) filters like the
    leaderboard's.
    """
    from kdarena.leaderboards import load_references

    refs = load_references(dataset)
    wanted = _as_set(teacher)
    rows = []
    for r in refs:
        if wanted is not None and r["teacher"] not in wanted:
            continue
        rows.append({"rank": math.nan, "dataset": r["dataset"], "teacher": r["teacher"], "student": r["student"],
                     "method": r["method"], "test_acc_mean": r["test_acc"], "test_acc_std": math.nan,
                     "n_seeds": math.nan, "params": r["params"], "macs": r["macs"], "latency_ms": math.nan,
                     "key_hparams": r["key_hparams"], "source": REPORTED + r["source"], "run_id": None,
                     "pareto": False, "flops": r["flops"], "student_arch": None, "sweep": None, "experiment": None,
                     "run_ids": [], "reported": True, "dataset_label": r["dataset"], "dataset_fingerprint": None,
                     "variant": r["variant"], "test_errors": r["test_errors"],
                     "test_size": r["test_size"], "note": r["note"], "table": r["table"], "citation": r["source"]})
    return pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS + REFERENCE_EXTRA)


def with_references(board: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """Our rows, then the reference rows of the same dataset label, label by label (for tables and exports)."""
    labels = list(dict.fromkeys(board["dataset_label"].tolist() + references["dataset"].tolist()))
    parts = []
    for label in labels:
        ours = board[board["dataset_label"] == label]
        parts.append(ours)
        refs = references[references["dataset"] == label]
        shown = ours["dataset"].unique()
        if len(shown) == 1:  # one dataset of ours carries the label: its published results join its table
            refs = refs.assign(dataset=shown[0])
        parts.append(refs)
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS + REFERENCE_EXTRA)
    return pd.concat(parts, ignore_index=True).reindex(columns=LEADERBOARD_COLUMNS + REFERENCE_EXTRA)


# -- rendering (shared by the CLI's table and its Markdown export) ---------------------------------------------
def _num(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def human(v: Any) -> str:
    """12345678 → 12.3M; missing → —."""
    if not _num(v):
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def accuracy_text(row: dict[str, Any] | pd.Series) -> str:
    """`95.12 ± 0.43 % (2 seeds)`, `94.40 % (trial)`, `64.54 % reported`."""
    mean = row["test_acc_mean"]
    if not _num(mean):
        return "—"
    if row.get("reported"):
        return f"{100 * mean:.2f} % reported"
    n = int(row["n_seeds"])
    if row["source"] == "trial":
        return f"{100 * mean:.2f} % (best trial)"
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    return f"{100 * mean:.2f} ± {100 * row['test_acc_std']:.2f} % ({seeds})"


def display_rows(rows: pd.DataFrame) -> list[dict[str, str]]:
    """Each row as the strings the terminal table and the Markdown export show."""
    out = []
    for row in rows.to_dict("records"):
        reported = bool(row.get("reported"))
        method = row["method"] + (f" ({row['variant']})" if reported and row.get("variant") else "")
        latency = row["latency_ms"]
        out.append({"rank": "ref" if reported else str(int(row["rank"])), "teacher": row["teacher"] or "—",
                    "student": row["student"], "method": method, "test_acc": accuracy_text(row),
                    "params": human(row["params"]),
                    "macs": human(row["macs"]) if _num(row["macs"]) or not _num(row.get("flops"))
                    else f"{human(row['flops'])} FLOPs",
                    "latency": f"{latency:.3f} ms" if _num(latency) else "—", "hparams": row["key_hparams"] or "",
                    "pareto": "★" if row["pareto"] else "", "source": row["source"]})
    return out


DISPLAY_HEADERS = {"rank": "rank", "teacher": "teacher", "student": "student", "method": "method",
                   "test_acc": "test_acc", "params": "params", "macs": "MACs", "latency": "latency",
                   "hparams": "key hyper-parameters", "pareto": "Pareto", "source": "source"}


def markdown_table(rows: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of leaderboard (and reference) rows."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(DISPLAY_HEADERS.values()) + " |", "|" + "---|" * len(DISPLAY_HEADERS)]
    for r in display_rows(rows):
        lines.append("| " + " | ".join(cell(r[k]) for k in DISPLAY_HEADERS) + " |")
    return "\n".join(lines)


def markdown_report(rows: pd.DataFrame, *, by: str = "macs", title: str | None = None) -> str:
    """Markdown for one or more datasets: a section per dataset, ours ranked, then the reported rows."""
    cost = {"macs": "MACs", "params": "parameters", "latency_ms": "latency"}[cost_column(by)]
    parts = [f"# {title}\n"] if title else []
    for ds in dict.fromkeys(rows["dataset"].tolist()):
        part = rows[rows["dataset"] == ds]
        parts.append(f"## {ds}\n\n{markdown_table(part)}\n")
    parts.append(f"★ = on the Pareto front of test accuracy vs {cost} (per dataset and teacher). test_acc is the "
                 "mean ± sample std over final seeds, else one `kdarena train` run or the best full-budget trial "
                 f"(chosen by val_acc). Rows marked `ref` are {REPORTED.rstrip(': ')}: published figures, never "
                 "ranked among ours.\n")
    return "\n".join(parts)


# -- sweeps and runs -------------------------------------------------------------------------------------------
def sweeps(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per sweep: name, dataset, teacher, trials and how they ended (plus final runs, methods)."""
    if runs.empty:
        return pd.DataFrame(columns=SWEEP_COLUMNS)
    swept = runs[runs["sweep"].notna()]
    rows = []
    for name, group in swept.groupby("sweep", sort=True):
        trials = group[group["role"] == "trial"]
        status = trials["status"].value_counts()
        rows.append({"name": name, "dataset": group["dataset"].iloc[0], "teacher": group["teacher"].iloc[0],
                     "trials": len(trials), "completed": int(status.get("completed", 0)),
                     "early_stopped": int(status.get("early-stopped", 0)), "diverged": int(status.get("diverged", 0)),
                     "failed": int(status.get("failed", 0)),
                     "running": int(len(trials) - status.reindex(list(STATUSES), fill_value=0).sum()),
                     "final_runs": int((group["role"] == "final").sum()),
                     "methods": sorted(group["method"].dropna().unique().tolist()),
                     "experiment": group["experiment"].iloc[0], "parent_run_id": group["parent_run_id"].dropna().iloc[0]
                     if group["parent_run_id"].notna().any() else None, "start_time": group["start_time"].min()})
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


def sweep_trials(runs: pd.DataFrame, sweep: str) -> pd.DataFrame:
    """A sweep's trial runs in start order (`order` 1, 2, …), every status included."""
    if runs.empty:
        return pd.DataFrame(columns=TRIAL_COLUMNS)
    trials = runs[(runs["sweep"] == sweep) & (runs["role"] == "trial")].sort_values(["start_time", "run_id"])
    trials = trials.assign(order=range(1, len(trials) + 1))
    return trials.reindex(columns=TRIAL_COLUMNS).reset_index(drop=True)


def run_detail(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """Everything the Run page shows about one run.

    {run_id, run_name, experiment_id, state, start_time, end_time (ms), tags,
    params, metrics (latest values), histories {name: [(step, value), ...]},
    config_yaml (the run's config.yaml artifact text, None if absent)}.
    Raises LookupError when the store has no such run.
    """
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bar in the server's console
    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise LookupError(f"no run {run_id} in {tracking_uri}") from exc
    histories = {}
    for key in sorted(run.data.metrics):
        points = client.get_metric_history(run_id, key)
        histories[key] = sorted((m.step, m.value) for m in points)
    config_text = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
            config_text = Path(path).read_text()
    except (MlflowException, OSError):
        config_text = None
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
            "state": run.info.status, "start_time": run.info.start_time, "end_time": run.info.end_time,
            "tags": dict(run.data.tags), "params": dict(run.data.params), "metrics": dict(run.data.metrics),
            "histories": histories, "config_yaml": config_text}
