"""One Ray Tune experiment, one Optuna study and one set of ASHA rungs per method.

Each method has its own space, so each gets its own TPE study (its own
history, its own budget); its ASHA rungs compare it only with itself, so a
method that starts slowly still reaches the full budget with its best
configs. Running all methods in one Tune experiment lets every worker be
reused across methods and trials of all methods run side by side. Each
study is told how its trials ended as records.json says it (`MethodStudy`).
"""

from __future__ import annotations

import pickle
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from kdarena.training.record import Metric, Status, Tag

from .points import WARM_START, flat_point
from .records import ended_status, reported_epoch, trial_key

# kdarena's status of a finished trial -> the state its Optuna trial ends in
OPTUNA_STATE = {Status.COMPLETED: TrialState.COMPLETE, Status.EARLY_STOPPED: TrialState.PRUNED,
                Status.DIVERGED: TrialState.FAIL, Status.FAILED: TrialState.FAIL}


class MethodStudy(OptunaSearch):
    """A method's Optuna study, told each trial's end as kdarena records it.

    Ray's OptunaSearch tells COMPLETE whenever the last result holds the
    objective, so ASHA-stopped and diverged trials would look complete to
    TPE, Optuna's importances and optuna-dashboard. Here each epoch's
    val_acc is the trial's intermediate value at step = epoch, and its end
    follows `records.ended_status`: completed -> COMPLETE with the objective
    values, early-stopped -> PRUNED, diverged or failed -> FAIL. Each Optuna
    trial carries its record's key (its user attribute named `Tag.TRIAL_KEY`).
    """

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        if config is not None:  # the record's key on the Optuna trial: optuna-dashboard's trial is records.json's
            self._ot_trials[trial_id].set_user_attr(Tag.TRIAL_KEY, trial_key("trial", trial_id))
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._keep_epoch(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        if result:  # the report ASHA stopped the trial on, or its last: Tune gives it to on_trial_complete alone
            self._keep_epoch(trial_id, result)
        status = Status.FAILED if error else ended_status((result or {}).get("status"))
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [float(result[m]) for m in metrics] if status == Status.COMPLETED else None
        # skip_if_finished: the replayed trial of a resumed sweep, as in _keep_epoch
        self._ot_study.tell(self._ot_trials[trial_id], values, state=OPTUNA_STATE[status], skip_if_finished=True)
        self._completed_trials.add(trial_id)

    def _keep_epoch(self, trial_id: str, result: dict) -> None:
        """The reported epoch's val_acc as the trial's intermediate value at step = epoch."""
        epoch = reported_epoch(result)
        if epoch is None:
            return
        try:
            # through the storage, not Trial.report: Optuna takes no reports in a multi-objective study, and an
            # epoch a restored trial runs again replaces its value (as in records.json) where report keeps the first
            self._storage.set_trial_intermediate_value(self._ot_trials[trial_id]._trial_id, epoch,
                                                       float(result[Metric.VAL_ACC]))
        except UpdateFinishedTrialError:
            # a resumed sweep replays a trial that finished after Ray last saved its state; its Optuna trial
            # already holds the outcome (the replay recomputes the same values)
            pass


class PerMethodSearch(Searcher):
    """Round-robin over the methods' studies, `quota` trials each.

    `warm` holds each method's enqueued points and their sources: a
    suggestion that is one of them carries its source in the trial config
    (`WARM_START`), so the trial's run says where its config came from.
    """

    def __init__(self, searchers: dict[str, MethodStudy], quota: int, metric: str | list[str], mode: str | list[str],
                 warm: dict[str, list[tuple[dict[str, Any], str]]] | None = None):
        super().__init__(metric=metric, mode=mode)
        self.searchers = searchers
        self.quota = quota
        self.warm = {m: list(points) for m, points in (warm or {}).items()}
        self.suggested = dict.fromkeys(searchers, 0)
        self.owner: dict[str, str] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # each study was given its metric and mode when it was made

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        open_methods = [m for m in self.searchers if self.suggested[m] < self.quota]
        if not open_methods:
            return Searcher.FINISHED
        method = min(open_methods, key=lambda m: self.suggested[m])
        config = self.searchers[method].suggest(trial_id)
        if config is None:
            return None
        self.suggested[method] += 1
        self.owner[trial_id] = method
        flat = flat_point(config)
        for i, (point, source) in enumerate(self.warm.get(method, [])):
            if all(flat.get(k) == v for k, v in point.items()):
                del self.warm[method][i]
                return config | {WARM_START: source}
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class PerMethodASHA(FIFOScheduler):
    """ASHA rungs kept per method (by the trial config's `method`)."""

    def __init__(self, methods: list[str], **asha: Any):
        super().__init__()
        self.asha = {m: ASHAScheduler(**asha) for m in methods}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def _of(self, trial) -> ASHAScheduler:
        return self.asha[trial.config["method"]]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        sub = self._of(trial)
        if trial.trial_id in sub._trial_info:
            sub.on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial)._trial_info.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        return "\n".join(f"{m}: {s.debug_string()}" for m, s in self.asha.items())

