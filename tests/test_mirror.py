"""The driver's MLflow mirror thread against a real sqlite store: a running trial's epochs go in batches, none lost."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from kdarena.search.mirror import Mirror, MirrorWorker
from kdarena.search.records import add_epoch, new_trial_record
from kdarena.search.records import SweepRecords
from kdarena.search.points import Describe
from kdarena.search.sweep_config import parse_sweep

DOC = {
    "name": "mirrored",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 8}},
    "students": [{"arch": "cnn", "options": {"channels": 4}}],
    "methods": {"kd": {}},
}
KEY = "trial/abc"


def _running_trial(tmp_path: Path, interval_s: float) -> tuple[MirrorWorker, MlflowClient, dict]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("mirror")
    records = SweepRecords(tmp_path / "records.json")
    records.data["parent_run_id"] = client.create_run(experiment_id).info.run_id
    point = {"method": "kd", "kd": {"temperature": 4.0}, "student": 0}
    config, tags = Describe(parse_sweep(DOC, "mirrored").model_dump(mode="json"))(point)
    record = new_trial_record(KEY, "abc", "trial", point, config, tags)
    records.trials[KEY] = record
    worker = MirrorWorker(Mirror(client, experiment_id, records), epoch_interval_s=interval_s)
    worker.submit(KEY)  # the trial's start: its run is made at once
    worker.drain()
    assert record["run_id"] is not None and record["run_ready"]
    return worker, client, record


def _epochs_in_mlflow(client: MlflowClient, record: dict) -> list[int]:
    return [m.step for m in client.get_metric_history(record["run_id"], "val_acc")]


def _report(worker: MirrorWorker, record: dict, epochs: range) -> None:
    for epoch in epochs:
        with worker.mirror.records.lock:
            add_epoch(record, epoch, {"val_acc": epoch / 10})
        worker.submit(KEY)


def test_epochs_wait_for_the_interval_and_drain_sends_them_all_once(tmp_path):
    worker, client, record = _running_trial(tmp_path, interval_s=3600)
    _report(worker, record, range(1, 6))
    time.sleep(1.0)  # the worker has seen all five submits by now
    assert _epochs_in_mlflow(client, record) == []  # within the hour: held back, to be sent in one batch
    worker.drain()
    assert _epochs_in_mlflow(client, record) == [1, 2, 3, 4, 5]
    worker.drain()  # nothing new: nothing sent twice
    assert _epochs_in_mlflow(client, record) == [1, 2, 3, 4, 5]


def test_a_running_trial_reaches_mlflow_within_the_interval_and_its_end_at_once(tmp_path):
    worker, client, record = _running_trial(tmp_path, interval_s=0.5)
    _report(worker, record, range(1, 4))
    deadline = time.time() + 20
    while _epochs_in_mlflow(client, record) != [1, 2, 3] and time.time() < deadline:
        time.sleep(0.2)
    assert _epochs_in_mlflow(client, record) == [1, 2, 3]  # no drain: the worker's own timer sent them

    worker.epoch_interval_s = 3600  # the end must not wait for any interval
    with worker.mirror.records.lock:
        add_epoch(record, 4, {"val_acc": 0.4})
        record["status"] = "completed"
        record["metrics"] = {"val_acc": 0.4, "epochs_completed": 4}
    worker.submit(KEY)
    deadline = time.time() + 20
    while client.get_run(record["run_id"]).info.status != "FINISHED" and time.time() < deadline:
        time.sleep(0.2)
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
    assert _epochs_in_mlflow(client, record) == [1, 2, 3, 4]
