"""A damaged records.json rebuilt from MLflow and Ray's own files (`kdarena sweep FILE --resume --rebuild-records`).

records.json maps each trial to its MLflow run and holds its epochs; when
it is cut short or overwritten, the same facts are still in two places:
MLflow (each trial's run, found by its trial key under the sweep's parent
run: status, epochs with their timestamps, final scores) and Ray Tune's
experiment folders (each trial's config in `params.json`, every reported
result in `result.json`, its checkpoints, and the saved state's status).
MLflow's epochs keep their recorded timestamps, so the mirror never logs
them twice; Ray's results fill in whatever never reached MLflow. The
damaged file is kept beside the new one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from kdarena.training.record import Metric, Role, Status, Tag, is_epoch_metric
from kdarena.zoo.errors import UserError

from .checkpoints import saved_trials
from .mirror import TRACKING_ERRORS
from .points import point_of
from .records import (PHASES, SweepPaths, add_epoch, ended_status, final_metrics, new_trial_record, reported_epoch,
                      trial_key)
from .sweep_config import SweepConfig


def rebuild(paths: SweepPaths, sweep: SweepConfig, describe: Callable[[dict[str, Any]], tuple[dict, dict]],
            uri: str) -> str:
    """Write a new records.json for the sweep at `paths`; return one line saying what it holds."""
    client = MlflowClient(uri)
    try:
        parent, runs = _mlflow_runs(client, sweep)
    except TRACKING_ERRORS as exc:
        raise UserError(f"cannot rebuild {paths.records}: MLflow at {uri} is unreachable "
                        f"({str(exc).splitlines()[0][:120]}); start the tracking server or pass --tracking-uri") from None
    trials: dict[str, dict[str, Any]] = {}
    from_ray = 0
    for phase in PHASES:
        experiment_dir = paths.experiment(phase)
        saved = saved_trials(experiment_dir) or []
        states = {t.trial_id: t.status for t in saved}
        ids = {t.folder.name: t.trial_id for t in saved}
        for trial_dir in sorted(experiment_dir.glob("run_trial_*")):
            record = _from_ray(trial_dir, phase, states, ids, describe)
            if record is None:
                continue
            run = runs.pop(record["key"], None)
            if run is not None:
                _merge_mlflow(record, client, run)
            else:
                from_ray += 1
            trials[record["key"]] = record
    if parent is None and not trials:
        raise UserError(f"cannot rebuild {paths.records}: neither MLflow ({uri}) nor {paths.ray} holds any trial of "
                        f"sweep '{sweep.name}'; start the sweep afresh under another name")
    data = {"parent_run_id": parent.info.run_id if parent else None, "trials": trials, "tracking_uri": uri,
            "experiment_id": parent.info.experiment_id if parent else None, "status": None,
            "rebuilt": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if parent is not None:
        tags, metrics = parent.data.tags, parent.data.metrics
        if Tag.TEACHER_SHA256 in tags:
            data["teacher"] = {"sha256": tags[Tag.TEACHER_SHA256], "key": None, Metric.VAL_ACC: None,
                               Metric.TEST_ACC: metrics.get(Metric.TEACHER_TEST_ACC)}
        if Tag.DATASET_FINGERPRINT in tags:
            data["dataset"] = {"name": tags.get(Tag.DATASET), "label": tags.get(Tag.DATASET_LABEL),
                               "fingerprint": tags[Tag.DATASET_FINGERPRINT], "root": None}
    if paths.records.exists():
        os.replace(paths.records, paths.records.with_name(f"{paths.records.name}.damaged-{int(time.time())}"))
    tmp = paths.records.with_name(paths.records.name + ".partial")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, paths.records)
    return (f"rebuilt {paths.records}: {len(trials)} trials ({len(trials) - from_ray} with their MLflow runs, "
            f"{from_ray} only in Ray's files)")


def _mlflow_runs(client: MlflowClient, sweep: SweepConfig):
    """The sweep's newest parent run and its child runs by trial key."""
    experiment = client.get_experiment_by_name(sweep.experiment)
    if experiment is None:
        return None, {}
    parents = client.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                 filter_string=f"tags.`{Tag.SWEEP}` = '{sweep.name}' and tags.`{Role.TAG}` = "
                                               f"'{Role.SWEEP}'")
    if not parents:
        return None, {}
    parent = parents[0]
    runs: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_runs([experiment.experiment_id], max_results=1000, page_token=token,
                                  filter_string=f"tags.`{Tag.PARENT}` = '{parent.info.run_id}'")
        for run in page:
            key = run.data.tags.get(Tag.TRIAL_KEY)
            if key and key not in runs:
                runs[key] = run
        token = page.token
        if not token:
            return parent, runs


def _results(trial_dir: Path) -> list[dict[str, Any]]:
    results = []
    try:
        lines = (trial_dir / "result.json").read_text().splitlines()
    except OSError:
        return results
    for line in lines:
        try:
            results.append(json.loads(line))
        except ValueError:  # a last line cut short by the kill
            break
    return results


def _from_ray(trial_dir: Path, phase: str, states: dict[str, str], ids: dict[str, str],
              describe) -> dict[str, Any] | None:
    try:
        config = json.loads((trial_dir / "params.json").read_text())
    except (OSError, ValueError):
        return None
    results = _results(trial_dir)
    # Tune's own id of the trial, as its results carry it (ids of grid trials hold an underscore: `1a2b3_00004`)
    trial_id = next((str(r["trial_id"]) for r in results if "trial_id" in r), ids.get(trial_dir.name))
    if trial_id is None:  # neither a result nor the saved state: the trial never ran
        return None
    resolved, tags = describe(config)
    record = new_trial_record(trial_key(phase, trial_id), f"run_trial_{trial_id}", phase, point_of(config), resolved, tags)
    for r in results:
        epoch = reported_epoch(r)
        if epoch is None:
            continue
        metrics = {k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and is_epoch_metric(k)}
        add_epoch(record, epoch, metrics, ts_ms=int(r.get("timestamp", time.time()) * 1000))
    last = results[-1] if results else {}
    record["last_result"] = {k: v for k, v in last.items() if isinstance(v, (int, float, str))
                             and not isinstance(v, bool)}
    record["started"] = results[0]["timestamp"] if results and "timestamp" in results[0] else time.time()
    state = states.get(trial_id)
    if state == "TERMINATED":
        record["status"] = ended_status(last.get("status"))
    elif state == "ERROR":
        record["status"] = Status.FAILED
    if record["status"] in Status.FINISHED:
        record["reason"] = last.get("reason")
        record["metrics"] = final_metrics(last, record["status"], record)
    checkpoints = sorted(trial_dir.glob("checkpoint_*"))
    record["checkpoint"] = str(checkpoints[-1]) if checkpoints else None
    return record


def _merge_mlflow(record: dict[str, Any], client: MlflowClient, run) -> None:
    """What MLflow has of the trial wins: its run, its statuses, and each epoch under the timestamp it was logged with."""
    record.update(run_id=run.info.run_id, run_ready=True, create_attempted=True,
                  started=run.info.start_time / 1000 if run.info.start_time else record["started"])
    logged: dict[int, dict[str, Any]] = {}
    for key in run.data.metrics:
        if not is_epoch_metric(key):
            continue
        for m in client.get_metric_history(run.info.run_id, key):
            entry = logged.setdefault(m.step, {"epoch": m.step, "ts_ms": m.timestamp, "metrics": {}})
            entry["metrics"][key] = m.value
    if logged:
        kept = [h for h in record["history"] if h["epoch"] not in logged]
        record["history"] = sorted(kept + list(logged.values()), key=lambda h: h["epoch"])
        record["synced_epochs"] = max(logged)
    status = run.data.tags.get(Tag.STATUS)
    if status in Status.FINISHED:
        record["status"] = status
        record["reason"] = run.data.tags.get(Tag.REASON)
        record["metrics"] = {k: v for k, v in run.data.metrics.items()
                             if k in Metric.FINAL + (Metric.EPOCHS_COMPLETED, Metric.BEST_VAL_ACC)}
        record["synced_final"] = True
        record["finished_ts_ms"] = run.info.end_time
