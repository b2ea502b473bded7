"""One sweep trial inside a Ray worker: build the trial's train config, train, report per epoch.

Trials never write to MLflow (the driver does): they report metrics and a
checkpoint to Ray every epoch, so a restarted trial continues from its last
epoch, and a slow or absent tracking server costs them nothing.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from kdarena.methods.engine import EpochResult, eval_loader, evaluate, fit, pick_device
from kdarena.methods.teacher_logits import TeacherLogits

from kdarena.training.build import build_distiller, make_model
from kdarena.training.record import Metric, Status, cost_metrics, epoch_metrics
from kdarena.zoo.cost import profile_cost
from kdarena.zoo.data import Dataset

from .checkpoints import CHECKPOINT_FILE, EPOCH_FILE
from .constraints import Shape, trial_refusal
from .points import split_trial_params
from .sweep_config import SweepConfig, trial_config



def run_trial(config: dict[str, Any], *, sweep_doc: dict[str, Any], data: Dataset,
              teacher_state: dict[str, torch.Tensor] | None, teacher_logits: TeacherLogits | None = None) -> None:
    sweep = SweepConfig.model_validate(sweep_doc)
    method, student_index, student_options, params, seed = split_trial_params(config)
    cfg = trial_config(sweep, method, student_index, student_options, params, seed=seed)
    device = pick_device()

    teacher = None
    if teacher_state is not None:
        teacher = make_model(cfg.teacher, data, cfg.teacher.recipe.seed)
        teacher.load_state_dict(teacher_state)
        teacher.eval()
    distiller = build_distiller(cfg, data, teacher)
    cost = profile_cost(distiller.student, in_channels=data.in_channels, input_size=data.input_size, latency=False)
    static = {**cost_metrics(cost), Metric.EXTRA_PARAMS: distiller.extra_params()}
    refusal = trial_refusal(sweep, distiller.student, Shape.of(data), cost)
    if refusal is not None:  # reported, not raised: Ray would retry an error, and a re-measured latency may pass
        tune.report({"epoch": 0, Metric.VAL_ACC: 0.0, "status": Status.FAILED, "reason": refusal, **static})
        return

    work = Path(tempfile.mkdtemp(prefix="kdarena-trial-"))
    ckpt_path = work / CHECKPOINT_FILE
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            saved = Path(folder) / CHECKPOINT_FILE
            if saved.exists():  # an empty checkpoint: the driver found it missing on storage; start from scratch
                shutil.copy(saved, ckpt_path)

    epochs = cfg.train.epochs

    def on_epoch(e: EpochResult) -> None:
        metrics: dict[str, Any] = {"epoch": e.epoch + 1, "status": Status.RUNNING, **epoch_metrics(e), **static}
        if e.epoch + 1 == epochs:  # full budget: the one place the test split is used
            metrics[Metric.TEST_ACC] = evaluate(distiller.student, eval_loader(data.test, data, device))
            metrics |= cost_metrics(profile_cost(distiller.student, in_channels=data.in_channels,
                                                 input_size=data.input_size))
            metrics["status"] = Status.COMPLETED
        (work / EPOCH_FILE).write_text(str(e.epoch + 1))  # beside trial.pt, which fit() has just written
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(work)))

    try:
        reported: list[int] = []
        result = fit(distiller, data, cfg.train, device=device, checkpoint_path=ckpt_path, evaluate_test=False,
                     on_epoch=lambda e: (on_epoch(e), reported.append(e.epoch)), teacher_logits=teacher_logits)
        if result.status == Status.COMPLETED and not reported:
            # restored from a checkpoint of the last epoch whose report the driver never processed (it was stopped
            # in between): the trial's completion, test accuracy included, is reported now
            on_epoch(result.history[-1])
        if result.status == Status.DIVERGED:
            last = result.history[-1].val_acc if result.history else 0.0
            tune.report({"epoch": len(result.history) + 1, Metric.VAL_ACC: last if math.isfinite(last) else 0.0,
                         "status": Status.DIVERGED, "reason": result.reason, **static})
    finally:
        shutil.rmtree(work, ignore_errors=True)
