"""Reading kdarena's runs from MLflow: one row per student run (`train`, `trial`, `final`), read in bulk.

A sqlite store is read directly, read-only, in a few SQL queries; any other
store (an MLflow server) in one paged `search_runs` pass; never one request
per run. The rows name a dataset by its identity (see `dataset_names`).
Nothing here writes to MLflow.
"""

from __future__ import annotations

import math
import sqlite3
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from kdarena.training.record import Metric, Param, Role, Status, Tag, config_key
from kdarena.training.tracking import store_missing


PAGE_SIZE = 10_000


# the scores a row holds, each in the column named after it
_METRICS = (*Metric.FINAL, Metric.EPOCHS_COMPLETED)
RUN_COLUMNS = ["run_id", "experiment", "role", "sweep", "parent_run_id", "dataset", "dataset_label",
               "dataset_fingerprint", "teacher", "student", "student_arch", "method", "status", "reason", *_METRICS,
               "seed", "start_time", "hparams",
               # the Optuna point under its own names (kd/temperature), the record key of a sweep run
               # (de-duplication after a resume), and a hash of the config minus its seed
               "searched", "trial_key", "config_key", "run_name",
               # where a warm-started trial's config came from ("sweep/trial (run id)"), else None
               "warm_start"]


# -- reading MLflow -------------------------------------------------------------------------------------------
def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


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
    out = {k.removeprefix(Param.METHOD_PARAMS_PREFIX): _value(v) for k, v in sorted(params.items())
           if k.startswith(Param.METHOD_PARAMS_PREFIX)}
    for short, name in (("lr", Param.LR), ("weight_decay", Param.WEIGHT_DECAY)):
        if name in params:
            out[short] = _value(params[name])
    return out


def _status(tags: dict[str, str], run_state: str) -> str:
    status = tags.get(Tag.STATUS)
    if status:
        return status
    if run_state in ("FAILED", "KILLED"):
        return Status.FAILED
    return Status.RUNNING if run_state in ("RUNNING", "SCHEDULED") else "unknown"


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
        c["role"].append(tags.get(Role.TAG))
        c["sweep"].append(tags.get(Tag.SWEEP))
        c["parent_run_id"].append(tags.get(Tag.PARENT))
        name = tags.get(Tag.DATASET) or params.get(Param.DATASET_NAME)
        c["dataset"].append(name)
        c["dataset_label"].append(tags.get(Tag.DATASET_LABEL) or name)
        c["dataset_fingerprint"].append(tags.get(Tag.DATASET_FINGERPRINT))
        c["teacher"].append(tags.get(Tag.TEACHER_LABEL, ""))
        c["student"].append(tags.get(Tag.STUDENT_LABEL) or tags.get(Tag.STUDENT))
        c["student_arch"].append(tags.get(Tag.STUDENT))
        c["method"].append(tags.get(Tag.METHOD) or params.get(Param.METHOD_NAME))
        c["status"].append(_status(tags, state))
        c["reason"].append(tags.get(Tag.REASON))
        for m in _METRICS:
            c[m].append(metrics.get(m, math.nan))
        seed = _value(params.get(Param.SEED))
        c["seed"].append(float(seed) if isinstance(seed, int) else math.nan)
        c["start_time"].append(start_time)
        c["hparams"].append(_hparams(params))
        c["searched"].append({k: _value(v) for k, v in params.items() if Param.SEARCHED_SEP in k})
        c["trial_key"].append(tags.get(Tag.TRIAL_KEY))
        c["config_key"].append(config_key)
        c["warm_start"].append(tags.get(Tag.WARM_START))

    def frame(self) -> pd.DataFrame:
        if not self.cols["run_id"]:
            return empty_runs()
        df = pd.DataFrame(self.cols)
        df["start_time"] = pd.to_datetime(df["start_time"], unit="ms", utc=True)
        df["dataset"] = dataset_names(df)
        df["dataset_label"] = df["dataset_label"].fillna(df["dataset"])
        return df


def read_runs(tracking_uri: str) -> pd.DataFrame:
    """`load_runs` of every experiment, with a store that cannot be read as one UserError naming it."""
    from mlflow.exceptions import MlflowException

    from kdarena.zoo.errors import UserError

    try:
        return load_runs(tracking_uri)
    except MlflowException as exc:
        raise UserError(f"cannot read runs from {tracking_uri}: {str(exc).splitlines()[0]}; check --tracking-uri") from None


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
        page = client.search_runs(list(experiments), filter_string=f"tags.`{Role.TAG}` != '{Role.SWEEP}'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE, page_token=token)
        for run in page:
            tags = run.data.tags
            role = tags.get(Role.TAG)
            if role not in Role.STUDENTS:
                continue
            params = run.data.params
            key = config_key(params) if role in _CONFIG_ROLES else None
            out.add(run.info.run_id, run.info.run_name, run.info.status, run.info.start_time,
                    experiments.get(run.info.experiment_id, run.info.experiment_id), tags, params, run.data.metrics, key)
        token = page.token
        if not token:
            break
    return out.frame()


_CONFIG_ROLES = (Role.FINAL, Role.TRAIN)


def _load_runs_sqlite(db: Path, experiment_names: list[str] | None) -> pd.DataFrame:
    """The same rows as `_load_runs_client`, from MLflow's tables (runs, experiments, tags, params, latest_metrics)."""
    roles = ", ".join(f"'{r}'" for r in Role.STUDENTS)
    con = sqlite3.connect(f"file:{quote(str(db.resolve()))}?mode=ro", uri=True)
    try:
        exps = {str(i): n for i, n in con.execute("SELECT experiment_id, name FROM experiments "
                                                  "WHERE lifecycle_stage = 'active'")
                if experiment_names is None or n in experiment_names}
        selected = f"SELECT run_uuid FROM tags WHERE key = '{Role.TAG}' AND value IN ({roles})"
        runs = con.execute("SELECT run_uuid, name, status, start_time, experiment_id FROM runs "
                           f"WHERE run_uuid IN ({selected}) AND lifecycle_stage = 'active' "
                           "ORDER BY start_time, run_uuid").fetchall()
        tags: dict[str, dict[str, str]] = {}
        for run, key, value in con.execute(
                f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({selected}) "
                f"AND (key LIKE 'kdarena.%' OR key = '{Tag.PARENT}')"):
            tags.setdefault(run, {})[key] = value
        metrics: dict[str, dict[str, float]] = {}
        names = ", ".join(f"'{m}'" for m in _METRICS)
        for run, key, value, is_nan in con.execute(
                f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({selected}) "
                f"AND key IN ({names})"):
            metrics.setdefault(run, {})[key] = math.nan if is_nan else float(value)
        params: dict[str, dict[str, str]] = {}
        read_params = ", ".join(f"'{p}'" for p in (Param.SEED, Param.LR, Param.WEIGHT_DECAY, Param.DATASET_NAME,
                                                   Param.METHOD_NAME))
        for run, key, value in con.execute(
                f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({selected}) "
                f"AND (key LIKE '{Param.METHOD_PARAMS_PREFIX}%' OR instr(key, '{Param.SEARCHED_SEP}') > 0 OR key IN "
                f"({read_params}))"):
            params.setdefault(run, {})[key] = value
        configs: dict[str, list[tuple[str, str]]] = {}
        config_roles = ", ".join(f"'{r}'" for r in _CONFIG_ROLES)
        for run, key, value in con.execute(
                f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN (SELECT run_uuid FROM tags WHERE "
                f"key = '{Role.TAG}' AND value IN ({config_roles}))"):
            configs.setdefault(run, []).append((key, value))
    finally:
        con.close()
    out = _Runs()
    for run_id, name, state, start, exp_id in runs:
        exp = exps.get(str(exp_id))
        if exp is None:
            continue
        run_tags = tags.get(run_id, {})
        key = config_key(dict(configs[run_id])) if run_id in configs else None
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


def run_detail(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """Everything the Run page shows about one run.

    {run_id, run_name, experiment_id, state, start_time, end_time (ms), tags,
    params, metrics (latest values), histories {name: [(step, value), ...]},
    config_yaml (the run's config.yaml artifact text, None if absent)}.
    Raises LookupError when the store has no such run.
    """
    from mlflow.exceptions import MlflowException

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
