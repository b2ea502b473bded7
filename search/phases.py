"""A sweep's two Ray Tune experiments: the search (one Optuna study per method) and the final runs.

Each phase is one Tune experiment under `ray/` in the sweep folder, started
fresh or continued from its saved state (`--resume`): every checkpoint the
saved state restores from is put back first (`checkpoints.repair`), trials a
killed driver recorded but Ray never saved are dropped, and Optuna trials
such a driver left RUNNING are marked FAIL, so each phase ends with its
planned count of trials, each recorded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from ray import tune
from ray.tune.logger import JsonLoggerCallback

from kdarena.training.record import Metric, Status

from .checkpoints import heal_state_files, repair
from .constraints import CostBounds
from .data_parallel import TrainRunReaper, train_storage
from .mirror import TRACKING_ERRORS
from .per_method import MethodStudy, PerMethodASHA, PerMethodSearch
from .points import POINT, DefineByRun, Describe, final_point
from .recorder import MLflowRecorder
from .records import SweepPaths, epochs_done, final_stats, trial_id_of
from .session import DriverSession
from .sweep_config import SweepConfig, method_space
from .warm_start import WarmPoint


@dataclass
class Phase:
    """What both phases need of the running sweep."""

    sweep: SweepConfig
    paths: SweepPaths
    session: DriverSession
    trainable: Any  # `run_trial` with its resources and the data, teacher and teacher logits it shares
    tracking_uri: str
    experiment_id: str
    concurrency: int
    resume: bool
    bounds: CostBounds | None  # the sweep's constraints, priced on its data

    @property
    def reuse_actors(self) -> bool:
        """Whether Tune may hand a trial's actor to the next trial: not with data-parallel workers, whose Train run
        lives as long as the actor that started it (a stopped trial's actor is ended, and its Train run with it)."""
        return self.sweep.resources.workers == 1

    @property
    def describe(self) -> Describe:
        return Describe(self.sweep.model_dump(mode="json"))

    def recorder(self, phase: str) -> MLflowRecorder:
        return MLflowRecorder(self.tracking_uri, self.experiment_id, self.paths.records, phase, self.describe)

    def run_config(self, phase: str) -> tune.RunConfig:
        reaper = [] if self.reuse_actors else [TrainRunReaper(train_storage(self.paths))]
        return tune.RunConfig(name=self.paths.experiment(phase).name, storage_path=str(self.paths.ray),
                              callbacks=[self.recorder(phase), JsonLoggerCallback(), *reaper], verbose=0,
                              failure_config=tune.FailureConfig(max_failures=2),
                              # one per trial, and Tune saves its experiment state after each (checkpoints.py)
                              checkpoint_config=tune.CheckpointConfig(num_to_keep=1))

    def restore(self, phase: str) -> bool:
        """Continue the phase's experiment if it was started; False if there is none to continue."""
        folder = self.paths.experiment(phase)
        if not (self.resume and tune.Tuner.can_restore(str(folder))):
            return False
        recorded = {trial_id_of(key): epochs_done(r) for key, r in self.session.records.trials.items()
                    if r["phase"] == phase}
        for line in heal_state_files(folder) + repair(folder, recorded):
            self.session.notify(line)
        tune.Tuner.restore(str(folder), self.trainable, resume_unfinished=True, resume_errored=True).fit()
        drop_lost_trials(self.session, phase)
        return True

    def raise_if_interrupted(self, phase: str, planned: int) -> None:
        """Ray Tune returns normally from a Ctrl-C (it saves its state first); tell the caller it was cut short."""
        trials = self.session.records.trials.values()
        finished = sum(1 for r in trials if r["phase"] == phase and r["status"] in Status.FINISHED)
        if finished < planned:
            raise KeyboardInterrupt(f"{finished} of {planned} {phase} runs finished")


def search(phase: Phase, warm: dict[str, list[WarmPoint]] | None = None) -> None:
    """All methods' studies in one Tune experiment: each method's TPE study, its quota, its own ASHA rungs.

    `warm`: per method, the points its study runs first (`warm_start.warm_points`); a resumed search has them
    in its saved state already.
    """
    warm = warm or {}
    sweep = phase.sweep
    quota = sweep.trials_for()
    if phase.restore("trial"):
        fail_stale_optuna_trials(phase.paths, sweep.methods)
        phase.raise_if_interrupted("trial", quota * len(sweep.methods))
        return
    metrics = [m for m, _ in sweep.objectives]
    modes = [mode for _, mode in sweep.objectives]
    metric, mode = (metrics, modes) if len(metrics) > 1 else (metrics[0], modes[0])
    searchers = {}
    storage = study_storage(phase.paths)
    for method in sweep.methods:
        sampler = optuna.samplers.RandomSampler(seed=sweep.seed) if sweep.sampler == "random" else None
        searchers[method] = MethodStudy(
            DefineByRun(method, method_space(sweep, method), tuple(s.search for s in sweep.students), phase.bounds),
            metric=metric, mode=mode, study_name=method, storage=storage, seed=sweep.seed, sampler=sampler,
            points_to_evaluate=[w.point for w in warm.get(method, [])] or None)
    b = sweep.budget
    # the trial's own epoch, not Tune's iteration count: a trial restarted from another checkpoint re-reports epochs
    scheduler = PerMethodASHA(list(sweep.methods), time_attr="epoch", metric=Metric.VAL_ACC, mode="max",
                              max_t=b.epochs, grace_period=b.grace_period if b.early_stopping else b.epochs,
                              reduction_factor=b.reduction_factor)
    searcher = PerMethodSearch(searchers, quota, metric, mode,
                               {m: [(w.point, w.source) for w in ws] for m, ws in warm.items()})
    tune.Tuner(
        phase.trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=quota * len(searchers),
                                    max_concurrent_trials=phase.concurrency, reuse_actors=phase.reuse_actors),
        run_config=phase.run_config("trial"),
    ).fit()
    phase.raise_if_interrupted("trial", quota * len(searchers))


def final_seeds(sweep: SweepConfig, seeds: int) -> list[int]:
    """The final runs' seeds, one list for every method: seed i of each method shares data order and initial student."""
    return [sweep.train.seed + i for i in range(seeds)]


def final_runs(phase: Phase, best: dict[str, dict[str, Any]], seeds: int) -> dict[str, dict[str, Any]]:
    """Each method's best config on the same `final_seeds`: the test accuracies the leaderboard pairs by seed."""
    if not phase.restore("final"):
        points = [final_point(record["trial_config"], seed)
                  for record in best.values() for seed in final_seeds(phase.sweep, seeds)]
        if not points:
            return {}
        tune.Tuner(
            phase.trainable,
            param_space={POINT: tune.grid_search(points)},
            tune_config=tune.TuneConfig(max_concurrent_trials=phase.concurrency, reuse_actors=phase.reuse_actors),
            run_config=phase.run_config("final"),
        ).fit()
    phase.raise_if_interrupted("final", seeds * len(best))
    return final_stats(phase.session.records)


def drop_lost_trials(session: DriverSession, phase: str) -> None:
    """Trials a killed driver recorded but Ray's last saved state never knew: Ray ran others in their place.

    A restored experiment has run every trial it knows, so a record still
    running is one of these. It leaves the records and its MLflow run is
    deleted (found by its trial key if the killed driver never wrote its id
    down), so the sweep keeps its planned count and no duplicate runs.
    """
    session.worker.drain()  # no run is being created for a trial that is about to go
    mirror, records = session.mirror, session.records
    lost = [key for key, r in records.trials.items() if r["phase"] == phase and r["status"] not in Status.FINISHED]
    for key in lost:
        record = records.trials.pop(key)
        records.data.setdefault("lost_trials", []).append(key)
        try:
            run_id = mirror.run_of(record)
            if run_id is not None:
                mirror.client.delete_run(run_id)
        except TRACKING_ERRORS:
            if record.get("run_id"):
                records.data.setdefault("runs_to_delete", []).append(record["run_id"])
    records.save()


def clear_stale_study_lock(paths: SweepPaths) -> bool:
    """Remove the lock a killed driver left on the sweep's Optuna journal; True if there was one.

    Only under the driver lock (`driver_lock`): no other driver of this sweep can be writing, so the lock is
    stale, and Optuna would wait its 30-s grace period on it at every resume. The name is Optuna's
    `JournalFileSymlinkLock`'s: the journal's path and `.lock`.
    """
    lock = paths.studies.with_name(paths.studies.name + ".lock")
    if not lock.is_symlink() and not lock.exists():
        return False
    lock.unlink()
    return True


def study_storage(paths: SweepPaths) -> optuna.storages.JournalStorage:
    """The sweep's Optuna storage: one journal file in the sweep directory, one study per method, so a resume
    continues every study and `optuna-dashboard` opened once on it shows them all."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(paths.studies)))


def fail_stale_optuna_trials(paths: SweepPaths, methods) -> None:
    """Optuna trials still RUNNING once every Ray trial ended were asked for by a killed driver: mark them FAIL."""
    storage = study_storage(paths)
    for method in methods:
        study = optuna.load_study(study_name=method, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
