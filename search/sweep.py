"""The sweep driver: Ray Tune runs one Optuna study per method, ASHA stops weak trials.

Order of work: validate everything that can be validated (config, data,
every method against every student, storage, tracking server, Ray cluster
and its resources) → open the MLflow parent run → train or load the
teacher once → put the dataset and the teacher's weights in Ray's object
store once → one Tune experiment with an Optuna study per method (persisted in the
sweep directory, its own ASHA brackets) → final multi-seed runs of each
method's best config → summary.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
import optuna
import ray
import yaml
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.search.optuna import OptunaSearch

from kdarena.methods import get_method
from kdarena.methods.engine import pick_device
from kdarena.methods.space import Choice, Dimension, IntRange
from kdarena.zoo.errors import UserError

from .checkpoints import repair
from .driver_lock import driver_lock
from .rebuild import rebuild
from .signals import sigterm_as_ctrl_c
from . import ray_reaper
from .per_method import PerMethodASHA, PerMethodSearch
from kdarena.training.identity import dataset_tags, identity
from kdarena.training.record import Role, Tag

from .mirror import FINISHED, TRACKING_ERRORS, MirrorWorker, mirror_worker
from .recorder import LIVE_VIEWS, MLflowRecorder, notify
from .records import SWEEP_FILE, SweepPaths, SweepRecords, sweep_paths
from .sweep_config import SEARCHABLE_OPTIONS, SweepConfig, method_space, trial_config
from .teacher_store import check_writable
from .tracking import resolve_tracking_uri, source_commit, writes_allowed
from .train_job import (Callbacks, build_distiller, ensure_experiment, load_config_dataset, resolve_teacher,
                        teacher_cache_dir)
from .trial import run_trial, split_trial_params

# Ray's own console reporter would interleave with kdarena's live view: the old
# reporter at verbosity 0 prints nothing.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# small sweeps checkpoint often by design; Ray's "syncing took long" advice is noise here
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Tune's CSV and TensorBoard loggers repeat what MLflow records, on the path every report waits on (~8 ms
# an epoch); the JSON log (result.json, what Tune's own analysis reads) is kept in _run_config.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
optuna.logging.set_verbosity(optuna.logging.WARNING)

@dataclass(frozen=True)
class DefineByRun:
    """One method's Optuna space, define-by-run so a student's searched options depend on the student.

    A plain picklable object: Ray checkpoints the searcher, space included.
    """

    method: str
    space: dict[str, Dimension]
    student_search: tuple[dict[str, list[float]], ...]

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        student = trial.suggest_categorical("student", list(range(len(self.student_search)))) if len(self.student_search) > 1 else 0
        for option, (low, high) in self.student_search[student].items():
            name = f"student{student}/{option}"
            if SEARCHABLE_OPTIONS[option] is int:
                trial.suggest_int(name, int(low), int(high))
            else:
                trial.suggest_float(name, low, high)
        for name, dim in self.space.items():
            key = f"{self.method}/{name}"
            if isinstance(dim, Choice):
                trial.suggest_categorical(key, list(dim.choices))
            elif isinstance(dim, IntRange):
                trial.suggest_int(key, dim.low, dim.high, log=dim.log)
            else:
                trial.suggest_float(key, dim.low, dim.high, log=dim.log)
        return {"method": self.method, "student": student}


@dataclass(frozen=True)
class Describe:
    """Trial config (Ray's) → (resolved train config as a dict, MLflow tags). Picklable for Ray."""

    sweep_doc: dict[str, Any]

    def __call__(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        sweep = SweepConfig.model_validate(self.sweep_doc)
        method, index, options, params, seed = split_trial_params(config)
        cfg = trial_config(sweep, method, index, options, params, seed=seed)
        tags = {Tag.METHOD: method, Tag.STUDENT: cfg.student.arch, Tag.TEACHER: sweep.teacher.arch,
                Tag.SWEEP: sweep.name, Tag.STUDENT_LABEL: cfg.student.label, Tag.TEACHER_LABEL: sweep.teacher.label}
        return cfg.model_dump(mode="json"), tags


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Attach to a cluster (`--address`, `RAY_ADDRESS`) or start Ray locally; an unreachable address is a UserError."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR", "configure_logging": True}
    if address and address != "auto":
        host_port = address.removeprefix("ray://").split("/")[0]
        host, _, port = host_port.rpartition(":")
        try:
            socket.create_connection((host or host_port, int(port or 6379)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise UserError(f"Ray cluster at {address} is unreachable ({exc}); start one with `ray start --head` "
                            "or fix --address / RAY_ADDRESS") from None
    try:
        # Ray starts workers at nice 15, so every burst of the driver or Ray's own daemons preempts a trial:
        # its epochs ran 5-10 % slower than the same loop at nice 0. Here the trials are the work.
        local = {"num_cpus": num_cpus, "_system_config": {"worker_niceness": 0}}
        if address:
            ray.init(address=address, **kwargs)
        else:
            context = ray.init(**local, **kwargs)
            ray_reaper.start(context.address_info["session_dir"])  # no Ray process outlives a killed driver
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = ("; a cluster with token authentication needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN "
                "(or ~/.ray/auth_token)")
        raise UserError(f"cannot connect to Ray at {address}: {str(exc).splitlines()[0]}{hint}") from None


def check_resources(sweep: SweepConfig) -> tuple[float, float]:
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if sweep.resources.cpu > cpus:
        raise UserError(f"resources.cpu is {sweep.resources.cpu} per trial but the Ray cluster has {cpus:g} CPUs; lower it")
    if sweep.resources.gpu > gpus:
        raise UserError(f"resources.gpu is {sweep.resources.gpu} per trial but the Ray cluster has {gpus:g} GPUs; "
                        "set resources.gpu: 0 or add GPU nodes")
    return cpus, gpus


def check_pairs(sweep: SweepConfig, data) -> None:
    """Every method against every student, with default parameters: fails now, not in trial 37."""
    for method in sweep.methods:
        for index in range(len(sweep.students)):
            options = {k: lo for k, (lo, _) in sweep.students[index].search.items()}
            options = {k: (int(v) if SEARCHABLE_OPTIONS[k] is int else v) for k, v in options.items()}
            cfg = trial_config(sweep, method, index, options, {})
            build_distiller(cfg, data, None)


def check_same_data(paths: SweepPaths, ident: dict[str, Any]) -> None:
    """A resumed sweep trains on the data it started with: files changed underneath are refused, not mixed in."""
    started = SweepRecords.open(paths.records).data.get("dataset")
    if started and started.get("fingerprint") != ident["fingerprint"]:
        raise UserError(f"the dataset changed since sweep '{paths.root.name}' started (content fingerprint "
                        f"{started['fingerprint'][:12]}… is now {ident['fingerprint'][:12]}…): files were added, removed "
                        "or replaced. Restore the data to resume, or start a new sweep (another name) on the new data")


def check_storage(paths: SweepPaths, resume: bool) -> None:
    exists = paths.records.exists()
    if exists and not resume:
        raise UserError(f"sweep '{paths.root.name}' already has results in {paths.root}; pass --resume to continue it, "
                        "or give the sweep another name")
    if resume and not exists:
        raise UserError(f"nothing to resume: no sweep results in {paths.root}; run without --resume to start it")


@dataclass
class SweepOutcome:
    paths: SweepPaths
    parent_run_id: str
    tracking_uri: str
    best: dict[str, dict[str, Any]]  # method -> record of its best full-budget trial
    finals: dict[str, dict[str, Any]]  # method -> {"mean", "std", "n", "test_accs"}
    final_seeds: int = 0  # planned per method

    def missing_finals(self) -> dict[str, int]:
        """Methods whose final mean stands on fewer seeds than planned (diverged or failed seeds): method -> n."""
        if not self.final_seeds:
            return {}
        return {m: self.finals.get(m, {}).get("n", 0) for m in self.best
                if self.finals.get(m, {}).get("n", 0) < self.final_seeds}


def run_sweep(sweep: SweepConfig, raw: Any, *, address: str | None = None, resume: bool = False,
              storage: str | None = None, tracking_uri: str | None = None, max_concurrent: int | None = None,
              num_cpus: int | None = None, view: Callable[[str, str, dict[str, Any]], None] | None = None,
              callbacks: Callbacks | None = None, final_seeds: int | None = None,
              rebuild_records: bool = False) -> SweepOutcome:
    """Run (or, with `resume`, continue) a sweep; one driver per sweep directory, SIGTERM handled as Ctrl-C."""
    uri = resolve_tracking_uri(tracking_uri or sweep.tracking_uri)
    paths = sweep_paths(sweep, storage)
    # writable and not full before the lock file is written into it: one clear message, not an OSError
    check_writable(paths.root, "storage", "pass --storage DIR or set storage: in the sweep file")
    with driver_lock(paths.root, say=lambda text: print(text, file=sys.stderr, flush=True)):
        return _run_sweep(sweep, raw, paths, uri, address=address, resume=resume, max_concurrent=max_concurrent,
                          num_cpus=num_cpus, view=view, callbacks=callbacks, final_seeds=final_seeds,
                          rebuild_records=rebuild_records)


def _run_sweep(sweep: SweepConfig, raw: Any, paths: SweepPaths, uri: str, *, address: str | None, resume: bool,
               max_concurrent: int | None, num_cpus: int | None, view, callbacks: Callbacks | None,
               final_seeds: int | None, rebuild_records: bool) -> SweepOutcome:
    check_storage(paths, resume)
    if resume:
        saved = yaml.safe_load((paths.root / SWEEP_FILE).read_text())
        if SweepConfig.model_validate(saved) != sweep:
            raise UserError(f"the sweep file changed since {paths.root} was started; resume with the same file, "
                            "or give the changed sweep a new name")
    if rebuild_records:
        if not resume:
            raise UserError("--rebuild-records rebuilds a sweep's records.json to continue it: use it with --resume")
        print(rebuild(paths, sweep, Describe(sweep.model_dump(mode="json")), uri), file=sys.stderr, flush=True)
    data = load_config_dataset(sweep.dataset)
    ident = identity(data, sweep.dataset.root)
    if resume:
        check_same_data(paths, ident)
    check_pairs(sweep, data)
    cache_dir = teacher_cache_dir(sweep.cache_dir)
    check_writable(cache_dir)
    connect_ray(address, num_cpus)
    with sigterm_as_ctrl_c():
        return _sweep_work(sweep, raw, paths, uri, data, ident, cache_dir, max_concurrent=max_concurrent, view=view,
                           callbacks=callbacks, final_seeds=final_seeds, resume=resume)


def _sweep_work(sweep: SweepConfig, raw: Any, paths: SweepPaths, uri: str, data, ident: dict[str, Any], cache_dir,
                *, max_concurrent: int | None, view, callbacks: Callbacks | None, final_seeds: int | None,
                resume: bool) -> SweepOutcome:
    cpus, _ = check_resources(sweep)
    concurrency = max_concurrent or sweep.max_concurrent or max(1, int(cpus // sweep.resources.cpu))

    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / SWEEP_FILE).write_text(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    records = SweepRecords.open(paths.records)
    with writes_allowed(uri, sweep.experiment, "set `experiment:` in the sweep file to an experiment of your own"):
        experiment_id = ensure_experiment(sweep.experiment, uri)
        if records.data["parent_run_id"] is None:
            parent = client.create_run(experiment_id, run_name=f"sweep-{sweep.name}",
                                       tags={Role.TAG: Role.SWEEP, Tag.SWEEP: sweep.name, Tag.TEACHER: sweep.teacher.arch,
                                             **dataset_tags(ident)})
            records.data["parent_run_id"] = parent.info.run_id
            records.save()
            client.log_text(parent.info.run_id, yaml.safe_dump(raw, sort_keys=False), "sweep.yaml")
    records.data |= {"tracking_uri": uri, "experiment_id": experiment_id, "status": None, "dataset": ident,
                     "git_commit": source_commit()}
    records.save()
    parent_id = records.data["parent_run_id"]
    if view is not None:
        LIVE_VIEWS[str(paths.records)] = view
    worker = mirror_worker(records, uri, experiment_id, warn=lambda text: notify(paths.records, text))
    mirror = worker.mirror

    try:
        needs_teacher = any(get_method(m).needs_teacher for m in sweep.methods)
        teacher_state = None
        if needs_teacher or sweep.teacher.checkpoint:
            teacher = resolve_teacher(sweep.teacher, sweep.dataset, data, cache_dir, sweep.experiment, uri,
                                      callbacks or Callbacks(), pick_device())
            teacher_state = {k: v.cpu() for k, v in teacher.model.state_dict().items()}
            client.set_tag(parent_id, Tag.TEACHER_SHA256, teacher.sha256)
            if teacher.test_acc is not None:
                client.log_metric(parent_id, "teacher_test_acc", teacher.test_acc)
            records.data["teacher"] = {"sha256": teacher.sha256, "key": teacher.key, "val_acc": teacher.val_acc,
                                       "test_acc": teacher.test_acc}
            records.save()
        sweep_doc = sweep.model_dump(mode="json")
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, sweep_doc=sweep_doc, data=data, teacher_state=teacher_state),
            {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu})
        _search(sweep, trainable, paths, uri, experiment_id, concurrency, resume, sweep_doc, worker)
        best = best_trials(records, sweep.budget.epochs)
        records.data["best"] = {method: record["key"] for method, record in best.items()}
        seeds = final_seeds if final_seeds is not None else sweep.final.seeds
        finals = _final_runs(sweep, best, seeds, trainable, paths, uri, experiment_id, concurrency, resume, sweep_doc,
                             worker) if seeds else {}
        records.data["status"] = "FINISHED"
    except KeyboardInterrupt:
        records.data["status"] = "KILLED"
        raise
    finally:
        records.save()
        worker.drain()
        waiting = mirror.all()
        if waiting:
            mirror.warn(f"{waiting} trial(s) are not in MLflow yet: they wait in {paths.records}; "
                        f"`kdarena sync {paths.root}` sends them once the tracking server is back")
        LIVE_VIEWS.pop(str(paths.records), None)
    return SweepOutcome(paths, parent_id, uri, best, finals, seeds)


def _search(sweep: SweepConfig, trainable, paths: SweepPaths, uri: str, experiment_id: str, concurrency: int,
            resume: bool, sweep_doc: dict[str, Any], worker: MirrorWorker) -> None:
    """All methods' studies in one Tune experiment (`ray/search`), resumable from its directory."""
    experiment_dir = paths.ray / "search"
    if resume and tune.Tuner.can_restore(str(experiment_dir)):
        _restore(experiment_dir, trainable, paths)
        _drop_lost_trials("trial", worker)
        _fail_stale_optuna_trials(paths, sweep.methods)
        _raise_if_interrupted(paths, "trial", sweep.trials_for() * len(sweep.methods))
        return
    metrics = [m for m, _ in sweep.objectives]
    modes = [mode for _, mode in sweep.objectives]
    metric, mode = (metrics, modes) if len(metrics) > 1 else (metrics[0], modes[0])
    searchers = {}
    for method in sweep.methods:
        storage = study_storage(paths, method)
        sampler = optuna.samplers.RandomSampler(seed=sweep.seed) if sweep.sampler == "random" else None
        searchers[method] = OptunaSearch(
            DefineByRun(method, method_space(sweep, method), tuple(s.search for s in sweep.students)),
            metric=metric, mode=mode, study_name=method, storage=storage, seed=sweep.seed, sampler=sampler)
    quota = sweep.trials_for()
    b = sweep.budget
    # the trial's own epoch, not Tune's iteration count: a trial restarted from an older checkpoint re-reports epochs
    scheduler = PerMethodASHA(list(sweep.methods), time_attr="epoch", metric="val_acc", mode="max",
                              max_t=b.epochs, grace_period=b.grace_period if b.early_stopping else b.epochs,
                              reduction_factor=b.reduction_factor)
    recorder = MLflowRecorder(uri, experiment_id, paths.records, "trial", Describe(sweep_doc))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=PerMethodSearch(searchers, quota, metric, mode), scheduler=scheduler,
                                    num_samples=quota * len(searchers), max_concurrent_trials=concurrency,
                                    reuse_actors=True),
        run_config=_run_config("search", paths, recorder),
    )
    tuner.fit()
    _raise_if_interrupted(paths, "trial", quota * len(searchers))


def _restore(experiment_dir, trainable, paths: SweepPaths) -> None:
    """Continue a Tune experiment from its saved state, every checkpoint that state names put back first."""
    for line in repair(experiment_dir):
        notify(paths.records, line)
    tune.Tuner.restore(str(experiment_dir), trainable, resume_unfinished=True, resume_errored=True).fit()


def _raise_if_interrupted(paths: SweepPaths, phase: str, planned: int) -> None:
    """Ray Tune returns normally from a Ctrl-C (it saves its state first); tell the caller it was cut short."""
    records = SweepRecords.open(paths.records)
    finished = sum(1 for r in records.trials.values() if r["phase"] == phase and r["status"] in FINISHED)
    if finished < planned:
        raise KeyboardInterrupt(f"{finished} of {planned} {phase} runs finished")


def _drop_lost_trials(phase: str, worker: MirrorWorker) -> None:
    """Trials a killed driver recorded but Ray's last saved state never knew: Ray ran others in their place.

    A restored experiment has run every trial it knows, so a record still
    running is one of these. It leaves the records and its MLflow run is
    deleted, so the sweep keeps its planned count and no duplicate runs.
    """
    worker.drain()  # no run is being created for a trial that is about to go
    mirror = worker.mirror
    records = mirror.records
    lost = [key for key, r in records.trials.items() if r["phase"] == phase and r["status"] not in FINISHED]
    for key in lost:
        record = records.trials.pop(key)
        records.data.setdefault("lost_trials", []).append(key)
        try:
            run_id = mirror.run_of(record)  # a run may exist that the killed driver never wrote down
            if run_id is not None:
                mirror.client.delete_run(run_id)
        except TRACKING_ERRORS:
            if record.get("run_id"):
                records.data.setdefault("runs_to_delete", []).append(record["run_id"])
    records.save()


def study_storage(paths: SweepPaths, method: str) -> optuna.storages.JournalStorage:
    """A method's Optuna study: a journal file in the sweep directory, so a resume continues it."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(paths.study(method))))


def _fail_stale_optuna_trials(paths: SweepPaths, methods) -> None:
    """Optuna trials still RUNNING once every Ray trial ended were asked for by a killed driver: mark them FAIL."""
    for method in methods:
        storage = study_storage(paths, method)
        study = optuna.load_study(study_name=method, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def _run_config(name: str, paths: SweepPaths, recorder: MLflowRecorder) -> tune.RunConfig:
    return tune.RunConfig(name=name, storage_path=str(paths.ray), callbacks=[recorder, JsonLoggerCallback()], verbose=0,
                          failure_config=tune.FailureConfig(max_failures=2),
                          # one per trial, and Tune saves its experiment state after each (search/checkpoints.py)
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


def best_trials(records: SweepRecords, epochs: int, phase: str = "trial") -> dict[str, dict[str, Any]]:
    """Per method, the full-budget trial with the highest val_acc (ASHA-stopped trials never rank)."""
    best: dict[str, dict[str, Any]] = {}
    for record in records.trials.values():
        if record["phase"] != phase or record["status"] != "completed":
            continue
        if record["metrics"].get("epochs_completed", 0) < epochs:
            continue
        current = best.get(record["method"])
        if current is None or record["metrics"]["val_acc"] > current["metrics"]["val_acc"]:
            best[record["method"]] = record
    return best


def _final_runs(sweep: SweepConfig, best: dict[str, dict[str, Any]], seeds: int, trainable, paths: SweepPaths,
                uri: str, experiment_id: str, concurrency: int, resume: bool,
                sweep_doc: dict[str, Any], worker: MirrorWorker) -> dict[str, dict[str, Any]]:
    """Each method's best config on `seeds` seeds: the mean ± std test accuracy the leaderboard ranks."""
    experiment_dir = paths.ray / "final"
    planned = seeds * len(best)
    if resume and tune.Tuner.can_restore(str(experiment_dir)):
        _restore(experiment_dir, trainable, paths)
        _drop_lost_trials("final", worker)
    else:
        points = []
        for method, record in best.items():
            cfg = record["config"]
            base_seed = cfg["train"]["seed"]
            for i in range(seeds):
                points.append(record["trial_config"] | {"seed": base_seed + i})
        if not points:
            return {}
        recorder = MLflowRecorder(uri, experiment_id, paths.records, "final", Describe(sweep_doc))
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=_run_config("final", paths, recorder),
        )
        tuner.fit()
    _raise_if_interrupted(paths, "final", planned)
    return final_stats(SweepRecords.open(paths.records))


def final_stats(records: SweepRecords) -> dict[str, dict[str, Any]]:
    by_method: dict[str, list[float]] = {}
    for record in records.trials.values():
        if record["phase"] == "final" and record["status"] == "completed":
            by_method.setdefault(record["method"], []).append(record["metrics"]["test_acc"])
    stats = {}
    for method, accs in by_method.items():
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        stats[method] = {"mean": mean, "std": std, "n": len(accs), "test_accs": accs}
    return stats

