"""The driver's Ray Tune callback: every trial event into records.json, then into MLflow.

The driver is the one writer. Every trial event lands first in
`records.json` (atomically replaced), then, through `Mirror`, in MLflow: one
parent run per sweep, one child run per trial. The file maps each trial to
its MLflow run and holds every epoch's metrics, so a resumed sweep reopens
the same child runs, never logs an epoch twice, and results that could not
reach a down tracking server are sent later.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kdarena.training.record import Metric, Status, is_epoch_metric

from .points import point_of
from .records import (SweepRecords, add_epoch, ended_status, epochs_done, final_metrics, new_trial_record,
                      reported_epoch, trial_key)
from .session import DriverSession, session_for


def _holding_records_lock(hook):
    """A hook changes records the MLflow mirror's thread copies: never half-way through a change."""
    @functools.wraps(hook)
    def locked(self, *args, **kwargs):
        with self.records.lock:
            return hook(self, *args, **kwargs)
    return locked


class MLflowRecorder(Callback):
    """A Ray Tune callback, run in the driver, that records each trial as a child run.

    It holds only paths, URIs and plain data, so it survives Ray's pickling
    of the experiment and works again after `Tuner.restore`; the running
    driver's records, mirror and live view are its session's. `describe`
    (a module-level function) gives a trial's resolved train config and tags.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, records_path: Path, phase: str,
                 describe: Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, str]]]):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.records_path = records_path
        self.phase = phase
        self.describe = describe

    @property
    def session(self) -> DriverSession:
        return session_for(self.records_path)

    @property
    def records(self) -> SweepRecords:
        return self.session.records

    def _event(self, kind: str, key: str, record: dict[str, Any]) -> None:
        """The record on disk before Ray goes on (so it is never behind Ray's own saved state); MLflow after."""
        session = self.session
        session.records.save()
        session.worker.submit(key)
        if session.view is not None:
            session.view(kind, key, record)

    def _record(self, trial) -> tuple[str, dict[str, Any] | None]:
        """The trial's record; None for a trial this sweep already finished (a restore may replay one)."""
        key = trial_key(self.phase, trial.trial_id)
        record = self.records.trials.get(key)
        return key, (None if record is not None and record["status"] in Status.FINISHED else record)

    # -- Ray Tune callback hooks ---------------------------------------------------
    @_holding_records_lock
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        key = trial_key(self.phase, trial.trial_id)
        record = self.records.trials.get(key)
        if record is None:
            config, tags = self.describe(trial.config)
            record = new_trial_record(key, str(trial), self.phase, point_of(trial.config), config, tags)
            self.records.trials[key] = record
        elif record["status"] == Status.FAILED:  # an errored trial that a resume runs again (resume_errored)
            record.update(status=Status.RUNNING, reason=None, synced_final=False, metrics={})
            record.pop("finished_ts_ms", None)
        elif record["status"] in Status.FINISHED:
            return
        record["status"] = Status.RUNNING
        self._event("start", key, record)

    @_holding_records_lock
    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        key, record = self._record(trial)
        if record is None:
            return
        record["last_result"] = _scalars(result)
        epoch = reported_epoch(result)
        if epoch is not None:
            add_epoch(record, epoch, {k: float(v) for k, v in _scalars(result).items() if is_epoch_metric(k)})
        self._event("result", key, record)

    @_holding_records_lock
    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        key, record = self._record(trial)
        if record is None:
            return
        last = record.get("last_result", {})
        record["status"] = ended_status(last.get("status"))
        record["reason"] = last.get("reason")
        record["metrics"] = final_metrics(last, record["status"], record)
        checkpoint = trial.checkpoint  # the last epoch's (one kept per trial)
        record["checkpoint"] = checkpoint.path if checkpoint is not None else None
        self._event("complete", key, record)

    @_holding_records_lock
    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        key, record = self._record(trial)
        if record is None:
            return
        record["status"] = Status.FAILED
        record["reason"] = _error_text(trial)
        record["metrics"] = {Metric.EPOCHS_COMPLETED: epochs_done(record)}
        self._event("error", key, record)


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
            and k not in ("trial_id", "date", "hostname", "experiment_tag")}


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the trial failed (no error text)"
