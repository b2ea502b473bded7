"""One sweep trial inside a Ray worker: build the trial's train config, train, report per epoch.

Trials never write to MLflow (the driver does): they report metrics and a
checkpoint to Ray every epoch, so a restarted trial continues from its last
epoch, and a slow or absent tracking server costs them nothing. A trial with
`resources.workers` > 1 trains the same way on several workers at once
(`data_parallel.py`); what it reports is the same.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import tune

from kdarena.methods.base import Distiller
from kdarena.methods.engine import EpochResult, eval_loader, evaluate, fit, pick_device
from kdarena.methods.replica import Replica
from kdarena.methods.teacher_logits import TeacherLogits

from kdarena.training.build import build_distiller, make_model
from kdarena.training.config import TrainConfig
from kdarena.training.record import Metric, Status, cost_metrics, epoch_metrics
from kdarena.zoo.cost import Cost, profile_cost
from kdarena.zoo.data import Dataset

from .checkpoints import CHECKPOINT_FILE, EPOCH_FILE
from .constraints import Shape, trial_refusal
from .points import split_trial_params
from .sweep_config import SweepConfig, trial_config

# what a trial hands Ray each epoch: its metrics, and the folder holding its checkpoint (None: no checkpoint)
Report = Callable[[dict[str, Any], Path | None], None]


@dataclass
class Trial:
    """One trial's run, built from its point: what it trains and what every report of it carries."""

    sweep: SweepConfig
    cfg: TrainConfig
    distiller: Distiller
    cost: Cost  # the student before training, latency not measured
    static: dict[str, Any]  # costs measured before training, in every report

    @classmethod
    def build(cls, config: dict[str, Any], sweep_doc: dict[str, Any], data: Dataset,
              teacher_state: dict[str, torch.Tensor] | None) -> Trial:
        sweep = SweepConfig.model_validate(sweep_doc)
        method, student_index, student_options, params, seed = split_trial_params(config)
        cfg = trial_config(sweep, method, student_index, student_options, params, seed=seed)
        teacher = None
        if teacher_state is not None:
            teacher = make_model(cfg.teacher, data, cfg.teacher.recipe.seed)
            teacher.load_state_dict(teacher_state)
            teacher.eval()
        distiller = build_distiller(cfg, data, teacher)
        cost = profile_cost(distiller.student, in_channels=data.in_channels, input_size=data.input_size, latency=False)
        return cls(sweep, cfg, distiller, cost, {**cost_metrics(cost), Metric.EXTRA_PARAMS: distiller.extra_params()})

    def refusal(self, data: Dataset) -> dict[str, Any] | None:
        """The report of a trial whose student is over the sweep's constraints (measured here), or None.

        Reported, not raised: Ray would retry an error, and a re-measured latency may pass."""
        reason = trial_refusal(self.sweep, self.distiller.student, Shape.of(data), self.cost)
        if reason is None:
            return None
        return {"epoch": 0, Metric.VAL_ACC: 0.0, "status": Status.FAILED, "reason": reason, **self.static}

    def train(self, data: Dataset, restored: tune.Checkpoint | None, report: Report,
              teacher_logits: TeacherLogits | None, replica: Replica | None = None) -> None:
        """Train from `restored` (or from scratch), reporting every epoch run now, and a divergence.

        With a `replica`, every replica reports (Ray Train's reports are collective) and only the chief's
        report, the one with a checkpoint and the test accuracy, is kept."""
        device = pick_device()
        chief = replica is None or replica.chief
        work = Path(tempfile.mkdtemp(prefix="kdarena-trial-"))
        ckpt_path = work / CHECKPOINT_FILE
        if restored is not None:
            with restored.as_directory() as folder:
                saved = Path(folder) / CHECKPOINT_FILE
                if saved.exists():  # an empty checkpoint: the driver found it missing on storage; start from scratch
                    shutil.copy(saved, ckpt_path)
        epochs = self.cfg.train.epochs
        student = self.distiller.student

        def on_epoch(e: EpochResult) -> None:
            metrics: dict[str, Any] = {"epoch": e.epoch + 1, "status": Status.RUNNING, **epoch_metrics(e), **self.static}
            if e.epoch + 1 == epochs:  # full budget: the one place the test split is used
                metrics["status"] = Status.COMPLETED
                if chief:
                    metrics[Metric.TEST_ACC] = evaluate(student, eval_loader(data.test, data, device))
                    metrics |= cost_metrics(profile_cost(student, in_channels=data.in_channels,
                                                         input_size=data.input_size))
            if chief:
                (work / EPOCH_FILE).write_text(str(e.epoch + 1))  # beside trial.pt, which fit() has just written
            report(metrics, work if chief else None)

        try:
            reported: list[int] = []
            result = fit(self.distiller, data, self.cfg.train, device=device, checkpoint_path=ckpt_path,
                         evaluate_test=False, on_epoch=lambda e: (on_epoch(e), reported.append(e.epoch)),
                         teacher_logits=teacher_logits, replica=replica)
            if result.status == Status.COMPLETED and not reported:
                # restored from a checkpoint of the last epoch whose report the driver never processed (it was
                # stopped in between): the trial's completion, test accuracy included, is reported now
                on_epoch(result.history[-1])
            if result.status == Status.DIVERGED:
                last = result.history[-1].val_acc if result.history else 0.0
                report({"epoch": len(result.history) + 1, Metric.VAL_ACC: last if math.isfinite(last) else 0.0,
                        "status": Status.DIVERGED, "reason": result.reason, **self.static}, None)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def report_to_tune(metrics: dict[str, Any], folder: Path | None) -> None:
    tune.report(metrics, checkpoint=None if folder is None else tune.Checkpoint.from_directory(str(folder)))


def run_trial(config: dict[str, Any], *, sweep_doc: dict[str, Any], data: Dataset,
              teacher_state: dict[str, torch.Tensor] | None, teacher_logits: TeacherLogits | None = None) -> None:
    """The Tune function of a one-worker trial."""
    trial = Trial.build(config, sweep_doc, data, teacher_state)
    refused = trial.refusal(data)
    if refused is not None:
        tune.report(refused)
        return
    trial.train(data, tune.get_checkpoint(), report_to_tune, teacher_logits)
