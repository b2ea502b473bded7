"""A trial trained data-parallel (`resources.workers` > 1): a Ray Train `TorchTrainer` inside the Tune trial.

The trial's Tune function starts a Train run of `workers` workers (gloo on
CPU, NCCL on GPU: Train's `TorchConfig` default); each worker builds the
trial, joins as a `Replica` (`methods/replica.py`) and runs the same
`Trial.train` a one-worker trial runs, reporting to Train each epoch, rank 0
with its checkpoint.

Why a relay instead of Ray's own bridge: `ray.tune.integration.ray_train.
TuneReportCallback` (Ray 2.60) hands Tune rank 0's metrics with the
checkpoint's path among them, but no Tune checkpoint, so a Tune trial
restarted by a dead node or by the sweep's `--resume` would have nothing to
resume from and `checkpoints.repair` nothing to repair. Here a Train callback
(`EpochRelay`, run in Train's controller) puts each of rank 0's reports and
its persisted checkpoint on a queue, and the Tune function reports it to Tune
with that checkpoint: ASHA, `records.json` and the MLflow mirror see what a
one-worker trial reports, and a restarted Tune trial hands its checkpoint to
a fresh Train run. Within one Train run, Train's `FailureConfig` restarts a
dead worker group from the run's latest checkpoint (`ray.train.get_checkpoint`).

Why a reaper: a Train run's controller is an actor of the trial's Tune actor,
and dies with it when Tune ends a trial (ASHA stops it, or it reports its
last epoch) before the run has shut down; the run's placement group, which
the controller removes on a clean shutdown, would then hold its CPUs for the
rest of the sweep (Ray's own cleaner for this asks the State API, which a
Ray without its dashboard lacks). Rank 0 writes the group's id into the run's
folder, and `TrainRunReaper`, a Tune callback in the driver, removes the
groups and folders of a trial's runs when the trial ends or is restarted.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray import tune
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.util import get_current_placement_group, placement_group_table
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.queue import Empty, Queue

from kdarena.methods.replica import Replica
from kdarena.methods.teacher_logits import TeacherLogits
from kdarena.zoo.data import Dataset

from .records import SweepPaths
from .sweep_config import Resources
from .trial import Trial

TRAIN_RUNS = "train"  # in the sweep's ray/ folder: the Train runs of data-parallel trials, each while it runs
PLACEMENT_GROUP_FILE = "placement-group"  # in a Train run's folder: the hex id of its workers' placement group
TRAIN_FAILURES = 2  # worker-group restarts within one Train run: what Tune's FailureConfig allows a trial
POLL_S = 0.5  # how often the Tune function looks for a report while the Train run goes on


def train_storage(paths: SweepPaths) -> Path:
    """Where a sweep's data-parallel trials keep their Train runs."""
    return paths.ray / TRAIN_RUNS


def tune_resources(resources: Resources) -> dict[str, float]:
    """What a trial's Tune actor holds: everything with one worker; with several, next to nothing: its function only
    waits on the Train run (whose controller holds no CPU either) while each worker holds `cpu` and `gpu`. Ray Tune
    refuses a trial that holds nothing at all, so it holds one byte of memory."""
    if resources.workers == 1:
        return {"cpu": resources.cpu, "gpu": resources.gpu}
    return {"cpu": 0, "gpu": 0, "memory": 1}


class EpochRelay(UserCallback):
    """In Train's controller: each report of rank 0, with the checkpoint Train persisted, onto the Tune function's
    queue."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint: ray.train.Checkpoint | None):
        self.queue.put((metrics[0], checkpoint))


def report_to_train(metrics: dict[str, Any], folder: Path | None) -> None:
    ray.train.report(metrics, checkpoint=None if folder is None else ray.train.Checkpoint.from_directory(str(folder)))


def train_worker(loop: dict[str, Any]) -> None:
    """One worker of a data-parallel trial: the trial from its point, resumed from the Train run's latest checkpoint,
    else from the Tune trial's."""
    replica = Replica.of_process_group()
    group = get_current_placement_group()
    if replica.chief and group is not None:  # for `TrainRunReaper`, should the run outlive its controller
        folder = Path(loop["run_folder"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PLACEMENT_GROUP_FILE).write_text(group.id.hex())
    trial = Trial.build(loop["config"], loop["sweep_doc"], loop["data"], loop["teacher_state"])
    restored = ray.train.get_checkpoint() or loop["restored"]
    trial.train(loop["data"], restored, report_to_train, loop["teacher_logits"], replica)


def run_data_parallel_trial(config: dict[str, Any], *, sweep_doc: dict[str, Any], data: Dataset,
                            teacher_state: dict[str, torch.Tensor] | None, train_storage: str,
                            teacher_logits: TeacherLogits | None = None) -> None:
    """The Tune function of a trial with `resources.workers` > 1; its Train runs live under `train_storage` while
    they run."""
    trial = Trial.build(config, sweep_doc, data, teacher_state)
    refused = trial.refusal(data)
    if refused is not None:
        tune.report(refused)
        return
    r = trial.sweep.resources
    queue = Queue(actor_options={"num_cpus": 0})
    name = f"{tune.get_context().get_trial_id()}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "sweep_doc": sweep_doc, "data": data, "teacher_state": teacher_state,
                           "teacher_logits": teacher_logits, "restored": tune.get_checkpoint(),
                           "run_folder": str(Path(train_storage) / name)},
        scaling_config=ray.train.ScalingConfig(num_workers=r.workers, use_gpu=r.gpu > 0,
                                               resources_per_worker={"CPU": r.cpu, "GPU": r.gpu}),
        run_config=ray.train.RunConfig(name=name, storage_path=train_storage,
                                       failure_config=ray.train.FailureConfig(max_failures=TRAIN_FAILURES),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                                       callbacks=[EpochRelay(queue)]),
    )
    failure: list[BaseException] = []

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # handed to the Tune function, which raises it: Tune's FailureConfig applies
            failure.append(exc)

    runner = threading.Thread(target=run, name="kdarena-train-run", daemon=True)
    runner.start()
    while runner.is_alive() or not queue.empty():
        try:
            metrics, checkpoint = queue.get(timeout=POLL_S)
        except Empty:
            continue
        if checkpoint is None:
            tune.report(metrics)
        else:
            with checkpoint.as_directory() as folder:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    runner.join()
    shutil.rmtree(Path(train_storage) / name, ignore_errors=True)  # ended cleanly; the Tune trial holds the checkpoints
    if failure:
        raise failure[0]


class TrainRunReaper(tune.Callback):
    """In the driver: when a trial ends or is restarted, the placement groups of its Train runs are removed (a no-op
    for a run that shut down cleanly) and their folders deleted."""

    def __init__(self, storage: Path):
        self.storage = storage

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.reap(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.reap(trial.trial_id)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self.reap(trial.trial_id)

    def reap(self, trial_id: str) -> None:
        live = {pg_id for pg_id, state in placement_group_table().items() if state["state"] != "REMOVED"}
        for folder in self.storage.glob(f"{trial_id}-*"):
            saved = folder / PLACEMENT_GROUP_FILE
            group_id = saved.read_text().strip() if saved.exists() else None
            if group_id in live:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
            shutil.rmtree(folder, ignore_errors=True)
