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
from kdarena.zoo.cost import profile_cost
from kdarena.zoo.data import Dataset

from .checkpoints import CHECKPOINT_FILE
from .sweep_config import SweepConfig, trial_config
from .build import build_distiller, make_model



def split_trial_params(config: dict[str, Any]) -> tuple[str, int, dict[str, Any], dict[str, Any], int | None]:
    """Ray's trial config → (method, student index, student options, method params, seed or None).

    Search trials carry Optuna's unflattened point; final runs carry one
    such point (plus a seed) under "point" of a grid.
    """
    config = config.get("point", config)
    method = config["method"]
    student_index = int(config.get("student", 0))
    student_options = dict(config.get(f"student{student_index}", {}))
    params = dict(config.get(method, {}))
    return method, student_index, student_options, params, config.get("seed")


def run_trial(config: dict[str, Any], *, sweep_doc: dict[str, Any], data: Dataset,
              teacher_state: dict[str, torch.Tensor] | None) -> None:
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
    cost = profile_cost(distiller.student, in_channels=data.in_channels, input_size=data.input_size, latency_repeats=0)
    static = {"params": cost.params, "macs": cost.macs, "flops": cost.flops, "extra_params": distiller.extra_params()}

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
        metrics: dict[str, Any] = {"epoch": e.epoch + 1, "val_acc": e.val_acc, "train_acc": e.train_acc, "lr": e.lr,
                                   "epoch_seconds": e.seconds, "status": "running", **static}
        metrics |= {f"train_{k}": v for k, v in e.losses.items()}
        metrics |= {f"diag_{k}": v for k, v in e.diagnostics.items()}
        if e.epoch + 1 == epochs:  # full budget: the one place the test split is used
            metrics["test_acc"] = evaluate(distiller.student, eval_loader(data.test, data, device))
            metrics["latency_ms"] = profile_cost(distiller.student, in_channels=data.in_channels,
                                                 input_size=data.input_size).latency_ms
            metrics["status"] = "completed"
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(work)))

    try:
        result = fit(distiller, data, cfg.train, device=device, checkpoint_path=ckpt_path, evaluate_test=False,
                     on_epoch=on_epoch)
        if result.status == "diverged":
            last = result.history[-1].val_acc if result.history else 0.0
            tune.report({"epoch": len(result.history) + 1, "val_acc": last if math.isfinite(last) else 0.0,
                         "status": "diverged", "reason": result.reason, **static})
    finally:
        shutil.rmtree(work, ignore_errors=True)
