"""One teacher→student distillation, recorded in MLflow: what `kdarena train` runs.

Order matters for "nothing half-done": the config, the dataset, the models,
the method's fit to the pair and the tracking store are all checked before
any training; an MLflow run is opened only then, and closed as FAILED or
KILLED if anything goes wrong after.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from kdarena.methods import Distiller, get_method
from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import EpochResult, FitResult, eval_loader, evaluate, fit, pick_device
from kdarena.methods.execution import Execution
from kdarena.methods.recipe import Recipe
from kdarena.methods.teacher_logits import TeacherLogits, cacheable
from kdarena.zoo.cost import profile_cost
from kdarena.zoo.data import Dataset, load_dataset
from kdarena.zoo.errors import UserError
from kdarena.zoo.models import StagedModel

from .build import build_distiller, make_model, pair_info
from .config import DatasetConfig, TeacherConfig, TrainConfig, config_yaml, export_config
from .identity import dataset_tags, identity, mlflow_dataset, student_tags
from .logit_store import stored_teacher_logits
from .record import Artifact, Metric, Role, Status, Tag, cost_metrics, epoch_metrics
from .student_card import input_facts, student_card, write_card
from .teacher_store import StoredTeacher, default_cache_dir, get_teacher
from .tracking import ensure_experiment, flatten, source_commit, writes_allowed


@dataclass
class Callbacks:
    """What a caller (the CLI's progress bars) wants to see while training."""

    start: Callable[[str, int, int], None] = lambda label, epochs, steps: None
    batch: Callable[[int, int], None] = lambda done, total: None
    epoch: Callable[[str, EpochResult], None] = lambda label, result: None
    notice: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)


def teacher_cache_dir(configured: str | None) -> Path:
    return Path(configured).expanduser() if configured else default_cache_dir()


def _train_teacher(teacher_cfg: TeacherConfig, dataset_cfg: DatasetConfig, data: Dataset, experiment: str,
                   tracking_uri: str, callbacks: Callbacks, device: torch.device) -> Callable[[StagedModel], FitResult]:
    def train(model: StagedModel) -> FitResult:
        recipe: Recipe = teacher_cfg.recipe
        experiment_id = ensure_experiment(experiment, tracking_uri)
        distiller = Baseline(model, None, Baseline.Params(), pair_info(model, model, data))
        label = f"teacher {teacher_cfg.arch}"
        ident = identity(data, dataset_cfg.root)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"teacher-{teacher_cfg.arch}-{data.label}",
                              tags={Role.TAG: Role.TEACHER, Tag.TEACHER_LABEL: teacher_cfg.label,
                                    **dataset_tags(ident)}):
            mlflow.log_params(flatten("teacher", teacher_cfg.model_dump(exclude={"checkpoint", "sha256"}))
                              | {"dataset": dataset_cfg.name})
            mlflow.log_input(mlflow_dataset(ident), context="training")
            callbacks.start(label, recipe.epochs, 0)
            result = fit(distiller, data, recipe, device=device, on_batch=callbacks.batch,
                         on_epoch=lambda e: (_log_epoch(e), callbacks.epoch(label, e)))
            if result.test_acc is not None:
                mlflow.log_metric(Metric.TEST_ACC, result.test_acc)
            mlflow.set_tag(Tag.STATUS, result.status)
        model.eval()
        return result
    return train


def resolve_teacher(teacher_cfg: TeacherConfig, dataset_cfg: DatasetConfig, data: Dataset, cache_dir: Path,
                    experiment: str, tracking_uri: str, callbacks: Callbacks, device: torch.device) -> StoredTeacher:
    """The teacher a config names, from the user's file or the store, trained (and recorded) if missing.

    MLflow is opened only to record a teacher being trained, so a bad
    checkpoint is refused before anything is written anywhere.
    """
    mlflow.set_tracking_uri(tracking_uri)
    teacher = get_teacher(teacher_cfg, dataset_cfg, data, cache_dir,
                          build=lambda: make_model(teacher_cfg, data, teacher_cfg.recipe.seed),
                          train=_train_teacher(teacher_cfg, dataset_cfg, data, experiment, tracking_uri, callbacks, device))
    if teacher_cfg.sha256 and teacher.sha256 != teacher_cfg.sha256:
        raise UserError(f"teacher.sha256: the config expects teacher {teacher_cfg.sha256[:16]}… but {teacher.path} is "
                        f"{teacher.sha256[:16]}…; point teacher.checkpoint at the original file or drop teacher.sha256")
    if teacher.val_acc is None:  # a user checkpoint: measure it, it is part of the record
        teacher.model.to(device)
        teacher.val_acc = evaluate(teacher.model, eval_loader(data.val, data, device))
        teacher.test_acc = evaluate(teacher.model, eval_loader(data.test, data, device))
    return teacher


def load_config_dataset(ds: DatasetConfig) -> Dataset:
    """The config's dataset; a line on stderr says when an image tree is streamed rather than held in memory."""
    data = load_dataset(ds.name, root=ds.root, val_fraction=ds.val_fraction, split_seed=ds.split_seed,
                        download=ds.download, label=ds.label, tree=ds.tree())
    if data.streamed:
        mib = len(data.train) * 3 * data.input_size ** 2 / 2**20
        why = "dataset.in_memory: false" if ds.in_memory is False else "past dataset.memory_budget_mb"
        workers = data.train.workers
        by = f"{workers} decoding worker{'s' if workers != 1 else ''}" if workers else "the training process"
        print(f"{data.label}: {len(data.train):,} training images at {data.input_size} px, streamed from disk by {by} "
              f"({mib:,.0f} MiB decoded; {why})", file=sys.stderr, flush=True)
    return data


def _log_epoch(e: EpochResult) -> None:
    mlflow.log_metrics(epoch_metrics(e), step=e.epoch + 1)


def run_train(cfg: TrainConfig, tracking_uri: str, callbacks: Callbacks | None = None,
              source_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Distil one student as `cfg` says; return the summary `kdarena train --json` prints."""
    callbacks = callbacks or Callbacks()
    device = pick_device()
    data = load_config_dataset(cfg.dataset)
    method = get_method(cfg.method.name)
    build_distiller(cfg, data, None)  # the pair check, before any training or recording
    # the run and its experiment go through MLflow's fluent API: point it at this URI (not only when a teacher is
    # resolved), or a run without a teacher lands in whatever store the process used last, or the default one
    mlflow.set_tracking_uri(tracking_uri)
    with writes_allowed(tracking_uri, cfg.experiment, "record into an experiment of your own: --set experiment=NAME"):
        teacher: StoredTeacher | None = None
        if method.needs_teacher or cfg.teacher.checkpoint:
            teacher = resolve_teacher(cfg.teacher, cfg.dataset, data, teacher_cache_dir(cfg.cache_dir), cfg.experiment,
                                      tracking_uri, callbacks, device)
        distiller = build_distiller(cfg, data, teacher.model if teacher else None)
        teacher_logits = None
        if teacher is not None and cacheable(method, cfg.train, data):
            teacher_logits = stored_teacher_logits(teacher, cfg, data, Execution.default(device),
                                                   teacher_cache_dir(cfg.cache_dir), callbacks.notice)

        run_name = f"{cfg.method.name}-{cfg.student.arch}-{data.label}"
        experiment_id = ensure_experiment(cfg.experiment, tracking_uri)
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags={Role.TAG: Role.TRAIN}) as run:
            try:  # any other exception ends the run FAILED in start_run's own exit
                summary = _train_and_record(cfg, data, distiller, teacher, teacher_logits, device, callbacks,
                                            source_config)
            except KeyboardInterrupt:
                mlflow.end_run(status="KILLED")
                raise
    return {"run_id": run.info.run_id} | summary


def _train_and_record(cfg: TrainConfig, data: Dataset, distiller: Distiller, teacher: StoredTeacher | None,
                      teacher_logits: TeacherLogits | None, device: torch.device, callbacks: Callbacks,
                      source_config: dict[str, Any] | None) -> dict[str, Any]:
    resolved = cfg.model_dump(mode="json")
    resolved["method"]["params"] = distiller.params.model_dump(mode="json")
    mlflow.log_params(cfg.run_params(resolved=True))
    ident = identity(data, cfg.dataset.root)
    tags = student_tags(cfg, with_teacher=teacher is not None) | dataset_tags(ident)
    if teacher:
        tags |= {Tag.TEACHER_SHA256: teacher.sha256, Tag.TEACHER_KEY: teacher.key}
    commit = source_commit()
    if commit:
        tags[Tag.GIT_COMMIT] = commit
    mlflow.set_tags(tags)
    mlflow.log_input(mlflow_dataset(ident), context="training")
    # the config `kdarena export` would write: re-runnable with `kdarena train`, pinned to this teacher
    mlflow.log_text(config_yaml(export_config(resolved, teacher.sha256 if teacher else None)), "config.yaml")
    if source_config is not None:
        mlflow.log_dict(source_config, "config_source.json")

    label = f"{cfg.method.name} → {cfg.student.arch}"
    callbacks.start(label, cfg.train.epochs, 0)
    result = fit(distiller, data, cfg.train, device=device, on_batch=callbacks.batch,
                 on_epoch=lambda e: (_log_epoch(e), callbacks.epoch(label, e)), teacher_logits=teacher_logits)
    cost = profile_cost(distiller.student, in_channels=data.in_channels, input_size=data.input_size)
    final = {**cost_metrics(cost), Metric.EXTRA_PARAMS: distiller.extra_params(),
             Metric.EPOCHS_COMPLETED: len(result.history)}
    if result.val_acc is not None:
        final |= {Metric.FINAL_VAL_ACC: result.val_acc, Metric.BEST_VAL_ACC: result.best_val_acc}
    if result.test_acc is not None:
        final[Metric.TEST_ACC] = result.test_acc
    if teacher and teacher.val_acc is not None:
        final |= {Metric.TEACHER_VAL_ACC: teacher.val_acc, Metric.TEACHER_TEST_ACC: teacher.test_acc}
    mlflow.log_metrics({k: float(v) for k, v in final.items() if v is not None})
    mlflow.set_tag(Tag.STATUS, result.status)
    if result.reason:
        mlflow.set_tag(Tag.REASON, result.reason)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Artifact.STUDENT
        torch.save(distiller.student.state_dict(), path)
        mlflow.log_artifact(str(path))
        card = student_card(resolved, input_facts(data), ident, final, teacher.sha256 if teacher else None)
        mlflow.log_artifact(str(write_card(card, Path(tmp))))
    if result.status != Status.COMPLETED:
        mlflow.end_run(status="FAILED")

    return {
        "status": result.status, "reason": result.reason,
        "method": cfg.method.name, "student": cfg.student.arch, "teacher": cfg.teacher.arch if teacher else None,
        "dataset": cfg.dataset.name, "dataset_label": data.label, "dataset_fingerprint": data.fingerprint,
        Metric.VAL_ACC: result.val_acc, Metric.BEST_VAL_ACC: result.best_val_acc,
        Metric.TEST_ACC: result.test_acc, Metric.PARAMS: cost.params, Metric.FLOPS: cost.flops, Metric.MACS: cost.macs,
        Metric.LATENCY_MS: cost.latency_ms, Metric.EXTRA_PARAMS: final[Metric.EXTRA_PARAMS],
        "teacher_sha256": teacher.sha256 if teacher else None,
        Metric.TEACHER_VAL_ACC: teacher.val_acc if teacher else None,
        Metric.TEACHER_TEST_ACC: teacher.test_acc if teacher else None,
        "teacher_trained_now": teacher.trained_now if teacher else False,
        "method_params": distiller.params.model_dump(mode="json"),
    }
