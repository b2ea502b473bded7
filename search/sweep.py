"""The sweep driver: Ray Tune runs one Optuna study per method, ASHA stops weak trials.

Order of work: take the sweep folder's lock (one driver per sweep) →
validate everything that can be validated (config, data and its identity,
every method against every student, storage, tracking server, Ray cluster
and its resources) → open the MLflow parent run → train or load the
teacher once, and its logits on the training split where a method can take
them from a cache → put the dataset, the teacher's weights and those logits
in Ray's object store once → the search (`phases.search`) → final multi-seed runs of each
method's best config (`phases.final_runs`) → the outcome. SIGTERM stops it
the way Ctrl-C does; `resume` continues it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from kdarena.methods import get_method
from kdarena.methods.engine import pick_device
from kdarena.methods.execution import Execution
from kdarena.methods.teacher_logits import TeacherLogits, cacheable
from kdarena.training.identity import dataset_tags, identity
from kdarena.training.logit_store import stored_teacher_logits
from kdarena.training.record import Metric, Role, Tag
from kdarena.training.student_card import input_facts
from kdarena.training.teacher_store import StoredTeacher, check_writable
from kdarena.training.tracking import (ensure_experiment, fail_fast_http, resolve_tracking_uri, source_commit,
                                       writes_allowed)
from kdarena.training.train_job import Callbacks, build_distiller, load_config_dataset, resolve_teacher, teacher_cache_dir
from kdarena.leaderboards.runs import read_runs
from kdarena.training.build import make_model
from kdarena.zoo.cost import profile_cost
from kdarena.zoo.data import Dataset
from kdarena.zoo.errors import UserError

from . import phases
from .constraints import LATENCY_MARGIN, CostBounds, Shape, check_students
from .cluster import check_resources, connect_ray, quiet_tune
from .data_parallel import run_data_parallel_trial, train_storage, tune_resources
from .driver_lock import driver_lock
# DefineByRun and Describe were defined here: Ray's saved state of a sweep started before names them here
from .points import DefineByRun, Describe  # noqa: F401
from .rebuild import rebuild
from .records import SWEEP_FILE, SweepPaths, SweepRecords, best_trials, read_records, sweep_paths
from .session import View, driver_session
from .signals import sigterm_as_ctrl_c
from .sweep_config import SweepConfig, option_value, trial_config
from .trial import run_trial
from .warm_start import WarmPoint, check_named_sweeps, per_method_quota, warm_points
from .warm_start import describe as describe_warm


@dataclass(frozen=True)
class SweepOptions:
    """How to run a sweep, beside what its file says (the command line's options)."""

    address: str | None = None  # a Ray cluster; default RAY_ADDRESS, else a local Ray
    resume: bool = False
    storage: str | None = None  # where the sweep folder goes; default the file's, else ./kdarena-sweeps
    tracking_uri: str | None = None
    max_concurrent: int | None = None
    final_seeds: int | None = None  # default the file's final.seeds
    rebuild_records: bool = False  # with resume: rebuild a damaged records.json first
    num_cpus: int | None = None  # a local Ray's CPUs; default all


@dataclass
class SweepOutcome:
    paths: SweepPaths
    parent_run_id: str
    tracking_uri: str
    best: dict[str, dict[str, Any]]  # method -> record of its best full-budget trial
    finals: dict[str, dict[str, Any]]  # method -> {"mean", "std", "n", "test_accs"}
    final_seeds: int = 0  # planned per method
    warm_started: dict[str, list[str]] | None = None  # method -> the runs its first trials' configs came from

    def missing_finals(self) -> dict[str, int]:
        """Methods whose final mean stands on fewer seeds than planned (diverged or failed seeds): method -> n."""
        if not self.final_seeds:
            return {}
        return {m: self.finals.get(m, {}).get("n", 0) for m in self.best
                if self.finals.get(m, {}).get("n", 0) < self.final_seeds}


def run_sweep(sweep: SweepConfig, raw: Any, options: SweepOptions = SweepOptions(), *, view: View | None = None,
              callbacks: Callbacks | None = None) -> SweepOutcome:
    """Run (or, with `options.resume`, continue) a sweep; `raw` is the document as the user wrote it."""
    quiet_tune()
    fail_fast_http()
    uri = resolve_tracking_uri(options.tracking_uri or sweep.tracking_uri)
    paths = sweep_paths(sweep, options.storage)
    # writable and not full before the lock file is written into it: one clear message, not an OSError
    check_writable(paths.root, "storage", "pass --storage DIR or set storage: in the sweep file")
    with driver_lock(paths.root, say=lambda text: print(text, file=sys.stderr, flush=True)):
        phases.clear_stale_study_lock(paths)
        data, ident = _check(sweep, paths, uri, options)
        cache_dir = teacher_cache_dir(sweep.cache_dir)
        check_writable(cache_dir)
        connect_ray(options.address, options.num_cpus)
        with sigterm_as_ctrl_c():
            return _run(sweep, raw, paths, uri, data, ident, cache_dir, options, view, callbacks)


def _check(sweep: SweepConfig, paths: SweepPaths, uri: str, options: SweepOptions) -> tuple[Dataset, dict[str, Any]]:
    """Everything about the sweep's folder and data that can be refused before any work."""
    check_storage(paths, options.resume)
    if options.resume:
        saved = yaml.safe_load((paths.root / SWEEP_FILE).read_text())
        if SweepConfig.model_validate(saved) != sweep:
            raise UserError(f"the sweep file changed since {paths.root} was started; resume with the same file, "
                            "or give the changed sweep a new name")
    if options.rebuild_records:
        if not options.resume:
            raise UserError("--rebuild-records rebuilds a sweep's records.json to continue it: use it with --resume")
        print(rebuild(paths, sweep, Describe(sweep.model_dump(mode="json")), uri), file=sys.stderr, flush=True)
    data = load_config_dataset(sweep.dataset)
    ident = identity(data, sweep.dataset.root)
    if options.resume:
        check_same_data(paths, ident)
    check_pairs(sweep, data)
    check_students(sweep, data)
    if isinstance(sweep.warm_start, list):
        check_named_sweeps(sweep.warm_start, read_runs(uri))
    return data, ident


def student_macs(sweep: SweepConfig, data: Dataset) -> list[float]:
    """Each student's MACs at its searched options' low ends: how warm starts measure a pair's nearness."""
    macs = []
    for index, spec in enumerate(sweep.students):
        options = {k: option_value(k, lo) for k, (lo, _) in spec.search.items()}
        cfg = trial_config(sweep, next(iter(sweep.methods)), index, options, {})
        student = make_model(cfg.student, data, cfg.train.seed)
        macs.append(float(profile_cost(student, in_channels=data.in_channels, input_size=data.input_size,
                                       latency=False).macs))
    return macs


def plan_warm_start(sweep: SweepConfig, uri: str, data: Dataset, ident: dict[str, Any], records: SweepRecords,
                    say) -> dict[str, list[WarmPoint]]:
    """The points each method's study starts from, recorded once (a resumed search has them in its saved state)."""
    if "warm_start" in records.data or sweep.warm_start == "off":
        return {}
    bounds = CostBounds.of(sweep, Shape.of(data))
    points = warm_points(sweep, read_runs(uri), ident["fingerprint"], student_macs(sweep, data),
                         per_method_quota(sweep.trials_for()),
                         None if bounds is None else lambda student, options: not bounds.over(student, options, LATENCY_MARGIN))
    records.data["warm_start"] = {m: [w.source for w in ws] for m, ws in points.items()}
    records.save()
    for line in describe_warm(points) or ["warm start: no finished runs on this data in the store yet; a cold start"]:
        say(line)
    return points


def trials_teacher_logits(sweep: SweepConfig, teacher: StoredTeacher, data: Dataset, cache_dir: Path,
                          say: Callable[[str], None]) -> TeacherLogits | None:
    """The teacher's logits as the sweep's trials compute them, from the store or computed once here; None when no
    method of the sweep can take them from a cache."""
    for method in sweep.methods:
        cfg = trial_config(sweep, method, 0, {}, {})
        if cacheable(get_method(method), cfg.train, data):
            return stored_teacher_logits(teacher, cfg, data, Execution.default(pick_device()), cache_dir, say)
    return None


def check_pairs(sweep: SweepConfig, data: Dataset) -> None:
    """Every method against every student, with default parameters: fails now, not in trial 37."""
    for method in sweep.methods:
        for index in range(len(sweep.students)):
            options = {k: option_value(k, lo) for k, (lo, _) in sweep.students[index].search.items()}
            build_distiller(trial_config(sweep, method, index, options, {}), data, None)


def check_same_data(paths: SweepPaths, ident: dict[str, Any]) -> None:
    """A resumed sweep trains on the data it started with: files changed underneath are refused, not mixed in."""
    started = read_records(paths.records).get("dataset")
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
    if resume and (older := paths.older_studies()):
        # Ray's saved searcher holds each study in its own journal: continuing it would split the sweep's studies
        raise UserError(f"sweep '{paths.root.name}' was started by an older kdarena that kept one Optuna journal per "
                        f"method ({', '.join(p.name for p in older)}); this one keeps every method's study in "
                        f"{paths.studies.name} and cannot continue it. Its finished trials stay in {paths.records} "
                        "and MLflow; run the sweep again under another name (or move the folder away) to start afresh")


def _run(sweep: SweepConfig, raw: Any, paths: SweepPaths, uri: str, data: Dataset, ident: dict[str, Any], cache_dir,
         options: SweepOptions, view: View | None, callbacks: Callbacks | None) -> SweepOutcome:
    cpus, _ = check_resources(sweep)
    concurrency = options.max_concurrent or sweep.max_concurrent or max(1, int(cpus // sweep.resources.per_trial[0]))
    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / SWEEP_FILE).write_text(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    records = SweepRecords(paths.records)
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
                     "student_input": input_facts(data), "git_commit": source_commit()}
    records.save()
    parent_id = records.data["parent_run_id"]
    seeds = options.final_seeds if options.final_seeds is not None else sweep.final.seeds
    with driver_session(records, uri, experiment_id, view) as session:
        try:
            teacher_state = teacher_logits = None
            if any(get_method(m).needs_teacher for m in sweep.methods) or sweep.teacher.checkpoint:
                teacher = resolve_teacher(sweep.teacher, sweep.dataset, data, cache_dir, sweep.experiment, uri,
                                          callbacks or Callbacks(), pick_device())
                teacher_state = {k: v.cpu() for k, v in teacher.model.state_dict().items()}
                client.set_tag(parent_id, Tag.TEACHER_SHA256, teacher.sha256)
                if teacher.test_acc is not None:
                    client.log_metric(parent_id, Metric.TEACHER_TEST_ACC, teacher.test_acc)
                records.data["teacher"] = {"sha256": teacher.sha256, "key": teacher.key,
                                           Metric.VAL_ACC: teacher.val_acc, Metric.TEST_ACC: teacher.test_acc}
                records.save()
                teacher_logits = trials_teacher_logits(sweep, teacher, data, cache_dir, session.notify)
            shared = {"sweep_doc": sweep.model_dump(mode="json"), "data": data, "teacher_state": teacher_state,
                      "teacher_logits": teacher_logits}
            function = (tune.with_parameters(run_trial, **shared) if sweep.resources.workers == 1 else
                        tune.with_parameters(run_data_parallel_trial, train_storage=str(train_storage(paths)),
                                             **shared))
            trainable = tune.with_resources(function, tune_resources(sweep.resources))
            phase = phases.Phase(sweep, paths, session, trainable, uri, experiment_id, concurrency, options.resume,
                                 CostBounds.of(sweep, Shape.of(data)))
            phases.search(phase, plan_warm_start(sweep, uri, data, ident, records, session.notify))
            best = best_trials(records, sweep.budget.epochs)
            records.data["best"] = {method: record["key"] for method, record in best.items()}
            finals = phases.final_runs(phase, best, seeds) if seeds else {}
            records.data["status"] = "FINISHED"
        except KeyboardInterrupt:
            records.data["status"] = "KILLED"
            raise
        finally:
            records.save()
            session.worker.drain()
            waiting = session.mirror.all()
            if waiting:
                session.notify(f"{waiting} trial(s) are not in MLflow yet: they wait in {paths.records}; "
                               f"`kdarena sync {paths.root}` sends them once the tracking server is back")
    return SweepOutcome(paths, parent_id, uri, best, finals, seeds, records.data.get("warm_start") or {})
