"""The MLflow record's vocabulary: every role, status, tag, metric and param name kdarena writes or reads.

Writers (`kdarena train`, the sweep's recorder and mirror) and readers (the
leaderboard, the dashboard, export) import these names; none spells one out.
Renaming a tag here renames it everywhere, and a test scans the source for
stray literals.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

from typing import Final


class Role:
    """`kdarena.role`: what a run is."""

    TAG: Final = "kdarena.role"
    SWEEP: Final = "sweep"  # a sweep's parent run
    TRIAL: Final = "trial"  # one search trial
    FINAL: Final = "final"  # one seed of a method's best config
    TRAIN: Final = "train"  # a `kdarena train` run
    TEACHER: Final = "teacher"  # a teacher trained for the store
    STUDENTS: Final = (TRAIN, TRIAL, FINAL)  # the runs that hold a student


class Status:
    """`kdarena.status`: how a student run ended."""

    COMPLETED: Final = "completed"
    EARLY_STOPPED: Final = "early-stopped"
    DIVERGED: Final = "diverged"
    FAILED: Final = "failed"
    RUNNING: Final = "running"
    FINISHED: Final = (COMPLETED, EARLY_STOPPED, DIVERGED, FAILED)
    NO_SCORE: Final = (DIVERGED, FAILED)  # ended without a usable val_acc


class Tag:
    STATUS: Final = "kdarena.status"
    REASON: Final = "kdarena.reason"
    SWEEP: Final = "kdarena.sweep"
    TRIAL_KEY: Final = "kdarena.trial_key"
    METHOD: Final = "kdarena.method"
    STUDENT: Final = "kdarena.student"  # the architecture
    STUDENT_LABEL: Final = "kdarena.student_label"  # architecture and options, e.g. cnn(channels=8)
    TEACHER: Final = "kdarena.teacher"
    TEACHER_LABEL: Final = "kdarena.teacher_label"
    TEACHER_SHA256: Final = "kdarena.teacher_sha256"
    TEACHER_KEY: Final = "kdarena.teacher_key"
    DATASET: Final = "kdarena.dataset"  # the dataset's kind: digits, cifar100, imagefolder, …
    DATASET_LABEL: Final = "kdarena.dataset_label"  # the name shown: the folder's name for imagefolder
    DATASET_FINGERPRINT: Final = "kdarena.dataset_fingerprint"  # its content hash: what identifies the data
    GIT_COMMIT: Final = "kdarena.git_commit"
    BEST_RUN_ID: Final = "kdarena.best_run_id"
    WARM_START: Final = "kdarena.warm_start"  # the run a warm-started trial's config came from
    PARENT: Final = "mlflow.parentRunId"


class Metric:
    VAL_ACC: Final = "val_acc"
    TRAIN_ACC: Final = "train_acc"
    TEST_ACC: Final = "test_acc"
    LR: Final = "lr"
    EPOCH_SECONDS: Final = "epoch_seconds"
    BEST_VAL_ACC: Final = "best_val_acc"
    FINAL_VAL_ACC: Final = "final_val_acc"
    PARAMS: Final = "params"
    MACS: Final = "macs"
    FLOPS: Final = "flops"
    LATENCY_MS: Final = "latency_ms"
    LATENCY_IQR_MS: Final = "latency_iqr_ms"  # the latency measurement's noise (zoo/cost.py)
    EXTRA_PARAMS: Final = "extra_params"
    EPOCHS_COMPLETED: Final = "epochs_completed"
    TEACHER_VAL_ACC: Final = "teacher_val_acc"
    TEACHER_TEST_ACC: Final = "teacher_test_acc"
    PER_EPOCH: Final = (VAL_ACC, TRAIN_ACC, LR, EPOCH_SECONDS)
    LOSS_PREFIX: Final = "train_"  # train_loss_<term>: each loss term's epoch mean
    LOSSES: Final = "train_loss"  # the start of every loss term's name
    DIAG_PREFIX: Final = "diag_"  # diag_<name>: each method diagnostic's epoch mean
    # a student run's scores at its end
    FINAL: Final = (VAL_ACC, TEST_ACC, PARAMS, MACS, FLOPS, LATENCY_MS, LATENCY_IQR_MS, EXTRA_PARAMS)


def is_epoch_metric(name: str) -> bool:
    """A metric logged once per epoch (step = the epoch, from 1)."""
    return name in Metric.PER_EPOCH or name.startswith((Metric.LOSS_PREFIX, Metric.DIAG_PREFIX))


def cost_metrics(cost) -> dict[str, float]:
    """A student's `zoo.cost.Cost` under its record names; an unmeasured latency is left out."""
    metrics = {Metric.PARAMS: cost.params, Metric.FLOPS: cost.flops, Metric.MACS: cost.macs}
    if math.isfinite(cost.latency_ms):
        metrics |= {Metric.LATENCY_MS: cost.latency_ms, Metric.LATENCY_IQR_MS: cost.latency_iqr_ms}
    return metrics


def epoch_metrics(epoch) -> dict[str, float]:
    """One epoch's metrics under their record names, from the engine's `EpochResult`."""
    metrics = {Metric.VAL_ACC: epoch.val_acc, Metric.TRAIN_ACC: epoch.train_acc, Metric.LR: epoch.lr,
               Metric.EPOCH_SECONDS: epoch.seconds}
    metrics |= {f"{Metric.LOSS_PREFIX}{k}": v for k, v in epoch.losses.items()}
    metrics |= {f"{Metric.DIAG_PREFIX}{k}": v for k, v in epoch.diagnostics.items()}
    return metrics


class Param:
    DATASET_NAME: Final = "dataset.name"
    METHOD_NAME: Final = "method.name"
    METHOD_PARAMS_PREFIX: Final = "method.params."
    SEED: Final = "train.seed"
    LR: Final = "train.lr"
    WEIGHT_DECAY: Final = "train.weight_decay"
    # a sweep trial's point under Optuna's names, e.g. kd/temperature, student0/width
    SEARCHED_SEP: Final = "/"


# params that say where or how fast a run ran, not what it computed: ignored when comparing configs
RUNTIME_PARAMS: Final = frozenset({Param.SEED, "seed", "cache_dir", "experiment", "dataset.root", "dataset.download",
                                   "train.num_threads", "teacher.checkpoint", "teacher.sha256",
                                   "teacher.recipe.num_threads"})


def config_key(params: Mapping[str, str]) -> str:
    """A hash of a run's config params, its seed and runtime params aside: runs with equal keys trained one config."""
    text = "\n".join(f"{k}={v}" for k, v in sorted(params.items())
                     if k not in RUNTIME_PARAMS and Param.SEARCHED_SEP not in k)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class Artifact:
    """The files a student run holds, and the MLflow model a deployed student is logged as."""

    STUDENT: Final = "student.pt"  # the student's state_dict
    CARD: Final = "student.json"  # its model card (`training.student_card`): what rebuilds and deploys it
    MODEL: Final = "student-model"  # the MLflow model (pytorch flavour) `kdarena deploy --register` logs
