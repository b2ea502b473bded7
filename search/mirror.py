"""records.json → MLflow, idempotently: what lets a sweep outlive its tracking server.

Every trial event lands in `records.json` first. `Mirror` then brings the
trial's MLflow child run up to date: it creates the run once (finding it by
its trial key if a create's answer was lost), logs each epoch once under the
timestamp recorded with it (MLflow keeps one row per key, step, timestamp and
value, so a replay adds nothing), and finishes the run once. While the server
is unreachable the mirror stays offline and probes it now and then; whatever
waits is sent when it is back, at the end of the sweep or by `kdarena sync`.
"""

from __future__ import annotations

import copy
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kdarena.training.identity import dataset_tags, mlflow_dataset
from kdarena.training.record import Artifact, Metric as RecordMetric, Role, Status, Tag
from kdarena.training.student_card import student_card, write_card
from kdarena.training.student_runs import save_mlflow_model

from kdarena.training.config import config_yaml, export_config
from .records import SweepRecords, epochs_done
from kdarena.training.tracking import fail_fast_http, flatten

# what a down, restarting or refusing tracking server raises through MlflowClient
TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError)
PROBE_INTERVAL_S = 10.0
EPOCH_SYNC_INTERVAL_S = 5.0
# the teacher's scores every student run carries, from the sweep's record of its teacher
TEACHER_SCORES = {RecordMetric.TEACHER_VAL_ACC: RecordMetric.VAL_ACC, RecordMetric.TEACHER_TEST_ACC: RecordMetric.TEST_ACC}
# what syncing changes in a trial's record (the rest belongs to the driver's thread)
SYNC_FIELDS = ("run_id", "run_ready", "synced_epochs", "synced_final", "finished_ts_ms", "create_attempted")

class Mirror:
    """Brings MLflow up to date with a sweep's records; offline (and cheap) while the server is down."""

    def __init__(self, client: MlflowClient, experiment_id: str, records: SweepRecords,
                 warn=lambda text: print(text, file=sys.stderr, flush=True)):
        self.client = client
        self.experiment_id = experiment_id
        self.records = records
        self.warn = warn
        self.offline_since: float | None = None
        self._last_probe = 0.0

    # -- one trial -------------------------------------------------------------------
    def trial(self, record: dict[str, Any]) -> bool:
        """Sync one trial if the server is reachable; False (and offline) if it is not."""
        if self.offline_since is not None and not self._probe():
            return False
        try:
            self._sync_trial(record)
            return True
        except TRACKING_ERRORS as exc:
            self._went_offline(exc)
            return False

    def _sync_trial(self, live: dict[str, Any]) -> None:
        """Works on a copy, so the driver's thread may go on changing the record; progress is copied back."""
        with self.records.lock:
            record = copy.deepcopy(live)
        try:
            self._sync_copy(record, live)
        finally:
            self._commit(record, live)

    def _commit(self, record: dict[str, Any], live: dict[str, Any]) -> None:
        with self.records.lock:
            live.update({f: record[f] for f in SYNC_FIELDS if f in record})
            self.records.save()

    def _sync_copy(self, record: dict[str, Any], live: dict[str, Any]) -> None:
        if record["run_id"] is None:
            record["run_id"] = self._find_or_create_run(record, live)
        if not record["run_ready"]:
            self._describe_run(record)
            record["run_ready"] = True
        new = [h for h in record["history"] if h["epoch"] > record["synced_epochs"]]
        if new:
            metrics = [Metric(k, float(v), h["ts_ms"], h["epoch"]) for h in new for k, v in h["metrics"].items()]
            for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
                self.client.log_batch(record["run_id"], metrics=metrics[i:i + 1000])
            record["synced_epochs"] = new[-1]["epoch"]
        if record["status"] in Status.FINISHED and not record["synced_final"]:
            self._finish_run(record)
            record["synced_final"] = True

    def run_of(self, record: dict[str, Any]) -> str | None:
        """The trial's MLflow run: its recorded id, else one a create reached the server with though its answer
        did not (or the driver was killed before it was written down), found by the trial key."""
        if record.get("run_id") or not record.get("create_attempted"):
            return record.get("run_id")
        parent = self.records.data["parent_run_id"]
        found = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.`{Tag.TRIAL_KEY}` = '{record['key']}' and tags.`{Tag.PARENT}` = '{parent}'")
        return found[0].info.run_id if found else None

    def _find_or_create_run(self, record: dict[str, Any], live: dict[str, Any]) -> str:
        found = self.run_of(record)
        if found:
            return found
        parent = self.records.data["parent_run_id"]
        record["create_attempted"] = True
        self._commit(record, live)  # on disk before the run exists: no run is ever left without its record
        teacher_sha = self.records.data.get("teacher", {}).get("sha256")
        dataset = self.records.data.get("dataset")
        commit = self.records.data.get("git_commit")
        tags = {Tag.PARENT: parent, Role.TAG: record["phase"], Tag.TRIAL_KEY: record["key"], **record["tags"],
                **({Tag.TEACHER_SHA256: teacher_sha} if teacher_sha else {}),
                **(dataset_tags(dataset) if dataset else {}), **({Tag.GIT_COMMIT: commit} if commit else {})}
        run = self.client.create_run(self.experiment_id, run_name=record["trial_name"], tags=tags,
                                     start_time=int(record["started"] * 1000))
        return run.info.run_id

    def _describe_run(self, record: dict[str, Any]) -> None:
        teacher_sha = self.records.data.get("teacher", {}).get("sha256")
        # the config `kdarena export` would write for this trial, so any run can be re-run from MLflow alone
        self.client.log_text(record["run_id"], config_yaml(export_config(record["config"], teacher_sha)), "config.yaml")
        params = flatten("", record["config"])
        # the searched point under Optuna's own (method-prefixed) names, e.g. kd/temperature
        params |= flatten("", record["trial_config"], sep="/")
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's log_batch limit for params
            self.client.log_batch(record["run_id"], params=items[i:i + 100])
        dataset = self.records.data.get("dataset")
        if dataset:  # MLflow's own dataset record: the UI's Dataset column (replays add nothing: same digest)
            entity = mlflow_dataset(dataset)._to_mlflow_entity()
            self.client.log_inputs(record["run_id"], [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, "training")])])

    def _finish_run(self, record: dict[str, Any]) -> None:
        ts = record.setdefault("finished_ts_ms", int(time.time() * 1000))
        # val_acc is already there, one value per epoch: its last value is the final one
        teacher = self.records.data.get("teacher") or {}
        scores = record["metrics"] | {name: teacher.get(key) for name, key in TEACHER_SCORES.items()}
        metrics = [Metric(k, float(v), ts, 0) for k, v in scores.items()
                   if isinstance(v, (int, float)) and k not in RecordMetric.PER_EPOCH]
        tags = [RunTag(Tag.STATUS, record["status"])]
        if record.get("reason"):
            tags.append(RunTag(Tag.REASON, str(record["reason"])[:5000]))
        self.client.log_batch(record["run_id"], metrics=metrics, tags=tags)
        self.client.set_terminated(record["run_id"], "FAILED" if record["status"] in Status.NO_SCORE else "FINISHED",
                                   end_time=ts)

    # -- the whole sweep ---------------------------------------------------------------
    def pending(self) -> list[dict[str, Any]]:
        with self.records.lock:
            return [r for r in self.records.trials.values() if is_pending(r)]

    def all(self) -> int:
        """Sync every trial, the best students and the parent run's end; how many trials still wait (0: all there)."""
        self.offline_since = None  # a caller asking for everything wants one real attempt
        for record in self.pending():
            if not self.trial(record):
                return len(self.pending())
        try:
            while self.records.data.get("runs_to_delete"):  # runs of trials a killed driver lost
                self.client.delete_run(self.records.data["runs_to_delete"][0])
                self.records.data["runs_to_delete"].pop(0)
            self._students()
            status = self.records.data.get("status")
            if status and self.records.data.get("parent_synced") != status:
                self.client.set_terminated(self.records.data["parent_run_id"], status)
                self.records.data["parent_synced"] = status
        except TRACKING_ERRORS as exc:
            self._went_offline(exc)
            return max(1, len(self.pending()))
        finally:
            self.records.save()
        return len(self.pending())

    def _students(self) -> None:
        """The students the sweep finishes with — each method's best trial and each completed final run — as
        `student.pt` (a plain state_dict), its card `student.json` and the MLflow model `student-model` (pytorch
        flavour, normalisation included) in their runs; the overall best's weights and card also in the parent."""
        import tempfile

        import torch

        from kdarena.training.deploy import normalised
        from kdarena.training.student_card import build_student

        from .checkpoints import CHECKPOINT_FILE

        best = sorted((self.records.trials[key] for key in self.records.data.get("best", {}).values()),
                      key=lambda r: -r["metrics"]["val_acc"])
        finals = [r for r in self.records.trials.values() if r["phase"] == Role.FINAL and r["status"] == Status.COMPLETED]
        for record in best + finals:
            source = Path(record.get("checkpoint") or "") / CHECKPOINT_FILE
            if record.get("student_logged") or not source.is_file() or not record.get("run_id"):
                continue
            state = torch.load(source, map_location="cpu", weights_only=True)["distiller"]
            student = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Artifact.STUDENT
                torch.save(student, path)
                files = [path]
                if self.records.data.get("student_input"):  # else a sweep started before model cards: weights alone
                    card = self._card(record)
                    files.append(write_card(card, Path(tmp)))
                    model = save_mlflow_model(normalised(build_student(card, path), card), card, Path(tmp))
                    self.client.log_artifacts(record["run_id"], str(model), artifact_path=Artifact.MODEL)
                for file in files:
                    self.client.log_artifact(record["run_id"], str(file))
                if best and record is best[0]:
                    parent = self.records.data["parent_run_id"]
                    for file in files:
                        self.client.log_artifact(parent, str(file))
                    self.client.set_tag(parent, Tag.BEST_RUN_ID, record["run_id"])
            record["student_logged"] = True
            self.records.save()

    def _card(self, record: dict[str, Any]) -> dict[str, Any]:
        """The trial's student card, from its config, the sweep's data and teacher, and its final scores."""
        return student_card(record["config"], self.records.data["student_input"], self.records.data.get("dataset"),
                            record["metrics"], (self.records.data.get("teacher") or {}).get("sha256"))

    # -- reachability --------------------------------------------------------------------
    def _went_offline(self, exc: BaseException) -> None:
        if self.offline_since is None:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.warn(f"MLflow at {self.client.tracking_uri} is unreachable ({first[:200]}); trial results are kept in "
                      f"{self.records.path} and sent when it is back (or with `kdarena sync {self.records.path.parent}`)")
        self.offline_since = time.time()
        self._last_probe = time.time()

    def _probe(self) -> bool:
        if time.time() - self._last_probe < PROBE_INTERVAL_S:
            return False
        self._last_probe = time.time()
        try:
            self.client.get_experiment(self.experiment_id)
        except TRACKING_ERRORS:
            return False
        self.offline_since = None
        self.warn(f"MLflow at {self.client.tracking_uri} is back; sending the waiting trial results")
        for record in self.pending():  # everything that waited, oldest first
            try:
                self._sync_trial(record)
            except TRACKING_ERRORS as exc:
                self._went_offline(exc)
                return False
        return True


def is_pending(record: dict[str, Any]) -> bool:
    """Something of this trial has not reached MLflow yet."""
    return (record["run_id"] is None or not record["run_ready"] or record["synced_epochs"] < epochs_done(record)
            or (record["status"] in Status.FINISHED and not record["synced_final"]))


class MirrorWorker:
    """A Mirror in a thread of its own, so MLflow's latency never holds up Ray Tune's loop (and so the trials,
    whose reports wait for the driver). One per running sweep (its session's).

    A running trial's new epochs are sent at most every `epoch_interval_s`, in one batch: each MLflow write
    costs the driver tens of milliseconds of CPU, taken from the cores the trials run on. A trial's start
    and end, and `drain()`, are sent at once.
    """

    _FLUSH = "\0flush"
    _STOP = "\0stop"

    def __init__(self, mirror: Mirror, epoch_interval_s: float = EPOCH_SYNC_INTERVAL_S):
        self.mirror = mirror
        self.epoch_interval_s = epoch_interval_s
        self._queue: queue.Queue[str] = queue.Queue()
        self._due: dict[str, float] = {}  # trials whose new epochs wait, and when they go (monotonic seconds)
        self._last_sync: dict[str, float] = {}
        threading.Thread(target=self._run, name="kdarena-mirror", daemon=True).start()

    def submit(self, key: str) -> None:
        self._queue.put(key)

    def close(self) -> None:
        """Stop the thread once what was submitted is handled (call `drain()` first to send what waits)."""
        self._queue.put(self._STOP)

    def drain(self) -> None:
        """Wait until every submitted trial has been synced, waiting epochs included (or found the server down)."""
        self._queue.put(self._FLUSH)
        self._queue.join()

    def _run(self) -> None:
        while True:
            wait = max(0.0, min(self._due.values()) - time.monotonic()) if self._due else None
            try:
                key = self._queue.get(timeout=wait)
            except queue.Empty:
                now = time.monotonic()
                for due in [k for k, t in self._due.items() if t <= now]:
                    self._sync(due)
                continue
            if key == self._STOP:
                self._queue.task_done()
                return
            try:
                if key == self._FLUSH:
                    for due in list(self._due):
                        self._sync(due)
                elif self._only_epochs_wait(key) and key in self._last_sync:
                    self._due.setdefault(key, self._last_sync[key] + self.epoch_interval_s)
                else:
                    self._sync(key)
            finally:
                self._queue.task_done()

    def _only_epochs_wait(self, key: str) -> bool:
        with self.mirror.records.lock:
            record = self.mirror.records.trials.get(key)
            return (record is not None and record["run_id"] is not None and record["run_ready"]
                    and record["status"] not in Status.FINISHED)

    def _sync(self, key: str) -> None:
        self._due.pop(key, None)
        self._last_sync[key] = time.monotonic()
        try:
            with self.mirror.records.lock:
                record = self.mirror.records.trials.get(key)
                pending = record is not None and is_pending(record)
            if pending:
                self.mirror.trial(record)
        except Exception as exc:  # a bug here must not kill the thread and hang drain(); the records keep all
            self.mirror.warn(f"could not record trial {key} in MLflow: {exc!r}; `kdarena sync` retries it")


def sync_sweep(sweep_dir: Path, tracking_uri: str | None = None, warn=None) -> int:
    """`kdarena sync`: send what waits in a sweep's records to MLflow; how many trials were waiting."""
    from kdarena.zoo.errors import UserError

    from .records import RECORDS_FILE

    fail_fast_http()
    records = SweepRecords(sweep_dir / RECORDS_FILE)
    uri = tracking_uri or records.data.get("tracking_uri")
    if uri is None or records.data.get("experiment_id") is None or records.data.get("parent_run_id") is None:
        raise UserError(f"{sweep_dir} records no MLflow parent run yet (the sweep stopped before it was created); "
                        "run the sweep again with --resume")
    mirror = Mirror(MlflowClient(uri), records.data["experiment_id"], records, warn=warn or (lambda text: None))
    waiting = len(mirror.pending())
    left = mirror.all()
    if left:
        raise UserError(f"MLflow at {uri} is unreachable: {left} trial(s) still wait in {records.path}; start the "
                        "tracking server (or pass --tracking-uri) and run `kdarena sync` again")
    return waiting
