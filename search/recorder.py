"""The driver's record of a sweep: a JSON file in the sweep directory, mirrored to MLflow.

The driver is the one writer. Every trial event lands first in
`records.json` (atomically replaced), then in MLflow: one parent run per
sweep, one child run per trial. The file maps each trial to its MLflow run
and remembers the last epoch logged, so a resumed sweep reopens the same
child runs and never logs an epoch twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from .export import config_yaml, export_config
from .records import SweepRecords
from .tracking import flatten

ROLE_TAG = "kdarena.role"
PARENT_TAG = "mlflow.parentRunId"
FULL_STATUSES = ("completed",)


def trial_key(phase: str, trial_id: str) -> str:
    return f"{phase}/{trial_id}"


# Live views by records file: Ray pickles callbacks into its experiment state,
# so a restored sweep gets a fresh recorder that finds the driver's view here.
LIVE_VIEWS: dict[str, Callable[[str, str, dict[str, Any]], None]] = {}


class MLflowRecorder(Callback):
    """A Ray Tune callback, run in the driver, that records each trial as a child run.

    It holds only paths, URIs and plain data, so it survives Ray's pickling
    of the experiment and works again after `Tuner.restore`. `describe`
    (a module-level function) gives a trial's resolved train config and tags.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, records_path: Path, phase: str,
                 describe: Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, str]]]):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.records_path = records_path
        self.phase = phase
        self.describe = describe
        self._client: MlflowClient | None = None
        self._records: SweepRecords | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_records": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def records(self) -> SweepRecords:
        if self._records is None:
            self._records = SweepRecords.open(self.records_path)
        return self._records

    def on_event(self, kind: str, key: str, record: dict[str, Any]) -> None:
        view = LIVE_VIEWS.get(str(self.records_path))
        if view is not None:
            view(kind, key, record)

    # -- Ray Tune callback hooks ---------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        key = trial_key(self.phase, trial.trial_id)
        record = self.records.trials.get(key)
        if record is None:
            config, tags = self.describe(trial.config)
            record = {"trial_name": str(trial), "phase": self.phase, "method": config["method"]["name"],
                      "trial_config": trial.config.get("point", trial.config),
                      "student": config["student"], "config": config, "tags": tags, "epochs_logged": 0,
                      "status": "running", "metrics": {}, "run_id": None, "started": time.time()}
            self.records.trials[key] = record
        record["status"] = "running"
        if record["run_id"] is None:
            record["run_id"] = self._create_run(key, record)
        self.records.save()
        self.on_event("start", key, record)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        key = trial_key(self.phase, trial.trial_id)
        record = self.records.trials[key]
        epoch = int(result.get("epoch", 0))
        record["last_result"] = _scalars(result)
        if epoch > record["epochs_logged"] and result.get("status") != "diverged":
            metrics = {k: v for k, v in _scalars(result).items() if k in _PER_EPOCH or k.startswith(("train_", "diag_"))}
            now = int(time.time() * 1000)
            self.client.log_batch(record["run_id"], metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
            record["epochs_logged"] = epoch
        if result.get("status") in ("completed", "diverged"):
            record["status"] = result["status"]
            record["reason"] = result.get("reason")
        self.records.save()
        self.on_event("result", key, record)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        key = trial_key(self.phase, trial.trial_id)
        record = self.records.trials[key]
        last = record.get("last_result", {})
        if record["status"] == "running":  # ended before the full budget and not diverged: ASHA stopped it
            record["status"] = "early-stopped"
        final = {k: last[k] for k in ("val_acc", "test_acc", "params", "macs", "flops", "latency_ms", "extra_params")
                 if k in last and (k != "test_acc" or record["status"] == "completed")}
        final["epochs_completed"] = record["epochs_logged"]
        record["metrics"] = final
        checkpoint = trial.checkpoint  # the last epoch's (one kept per trial)
        record["checkpoint"] = checkpoint.path if checkpoint is not None else None
        self._finish(record, "FINISHED" if record["status"] != "diverged" else "FAILED")
        self.on_event("complete", key, record)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        key = trial_key(self.phase, trial.trial_id)
        record = self.records.trials.get(key)
        if record is None:
            return
        record["status"] = "failed"
        record["reason"] = _error_text(trial)
        record["metrics"] = {"epochs_completed": record["epochs_logged"]}
        self._finish(record, "FAILED")
        self.on_event("error", key, record)

    # -- MLflow ----------------------------------------------------------------------
    def _create_run(self, key: str, record: dict[str, Any]) -> str:
        teacher_sha = self.records.data.get("teacher", {}).get("sha256")
        tags = {PARENT_TAG: self.records.data["parent_run_id"], ROLE_TAG: self.phase, "kdarena.trial_key": key,
                **record["tags"], **({"kdarena.teacher_sha256": teacher_sha} if teacher_sha else {})}
        run = self.client.create_run(self.experiment_id, run_name=record["trial_name"], tags=tags)
        # the config `kdarena export` would write for this trial, so any run can be re-run from MLflow alone
        self.client.log_text(run.info.run_id, config_yaml(export_config(record["config"], teacher_sha)), "config.yaml")
        params = flatten("", record["config"])
        # the searched point under Optuna's own (method-prefixed) names, e.g. kd/temperature
        params |= flatten("", record["trial_config"], sep="/")
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run.info.run_id

    def _finish(self, record: dict[str, Any], run_status: str) -> None:
        now = int(time.time() * 1000)
        # val_acc is already there, one value per epoch: its last value is the final one
        metrics = [Metric(k, float(v), now, 0) for k, v in record["metrics"].items()
                   if isinstance(v, (int, float)) and k not in _PER_EPOCH]
        tags = [RunTag("kdarena.status", record["status"])]
        if record.get("reason"):
            tags.append(RunTag("kdarena.reason", str(record["reason"])[:5000]))
        self.client.log_batch(record["run_id"], metrics=metrics, tags=tags)
        self.client.set_terminated(record["run_id"], run_status)
        self.records.save()


_PER_EPOCH = {"val_acc", "train_acc", "lr", "epoch_seconds"}


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
            and k not in ("trial_id", "date", "hostname", "node_ip", "experiment_tag")}


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the trial failed (no error text)"
