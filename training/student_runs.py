"""A finished student fetched for deployment — from an MLflow run or a local folder — and registered in MLflow.

What `kdarena deploy` reads: a run's `student.pt` and `student.json`
(`training.student_card`), or the same two files in a folder. What
`--register` writes: the normalised student as an MLflow model (pytorch
flavour, saved by `torch.export`, with signature and input example) in the
student's own run, registered under a name, so that
`mlflow.pytorch.load_model("models:/NAME/VERSION")` and `mlflow models serve`
work without kdarena installed.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdarena.zoo.errors import UserError

from .deploy import Normalised, normalised, raw_pixels
from .record import Artifact, Status, Tag
from .student_card import build_student, read_card


@dataclass
class Student:
    model: Normalised  # the student with its normalisation in front, eval mode
    card: dict[str, Any]
    run_id: str | None  # None: read from a local folder
    where: str  # the run or the folder, for messages


def load_student(source: str, tracking_uri: str) -> Student:
    """The student `source` names: a folder (or a file in one) holding student.pt and student.json, else a run id."""
    path = Path(source).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent
        return _from_folder(folder, str(folder), None)
    return _from_run(source, tracking_uri)


def _from_folder(folder: Path, where: str, run_id: str | None) -> Student:
    missing = [name for name in (Artifact.STUDENT, Artifact.CARD) if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{where} holds no {' and no '.join(missing)}: a student to deploy is the {Artifact.STUDENT} "
                        f"and its card {Artifact.CARD} that `kdarena train` and a sweep's best trials record")
    card = read_card(folder / Artifact.CARD)
    return Student(normalised(build_student(card, folder / Artifact.STUDENT), card), card, run_id, where)


def _from_run(run_id: str, tracking_uri: str) -> Student:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"{run_id!r} is neither a file or folder here nor a run in {tracking_uri}; give a student "
                        "run's id (the MLflow UI, `kdarena train --json`) with --tracking-uri for its store, or a "
                        f"folder holding {Artifact.STUDENT} and {Artifact.CARD}") from None
    status = run.data.tags.get(Tag.STATUS)
    if status in Status.NO_SCORE:
        raise UserError(f"run {run_id} ended {status} ({run.data.tags.get(Tag.REASON, 'no reason recorded')}): its "
                        "student is not one to deploy; pick a completed run")
    names = {a.path for a in client.list_artifacts(run_id)}
    if Artifact.STUDENT not in names:
        raise UserError(f"run {run_id} holds no {Artifact.STUDENT}: a sweep keeps the students of each method's best "
                        "trial and final runs only (its parent run names the overall best); deploy one of those")
    if Artifact.CARD not in names:
        raise UserError(f"run {run_id} has no {Artifact.CARD} (it was recorded by a kdarena without model cards); "
                        f"re-run its config.yaml with `kdarena train` to get a deployable student")
    with tempfile.TemporaryDirectory() as tmp:
        for name in (Artifact.STUDENT, Artifact.CARD):
            download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp, tracking_uri=tracking_uri)
        return _from_folder(Path(tmp), f"run {run_id}", run_id)


def save_mlflow_model(model: Normalised, card: dict[str, Any], folder: Path) -> Path:
    """`model` as an MLflow model (pytorch flavour, signature, input example) in `folder`/student-model, to log
    into its run: what `--register` registers and what a sweep logs for the students it finishes with."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    example = raw_pixels(card, 2)
    with torch.no_grad():
        logits = model(example)
    local = folder / Artifact.MODEL
    # pt2, `torch.export`: loaded without unpickling code or kdarena; the example's batch of 2 keeps the batch
    # dimension dynamic. The requirements are given, not inferred: inference would load the model in a subprocess
    # only to find torch
    mlflow.pytorch.save_model(model, str(local), serialization_format="pt2",
                              signature=infer_signature(example.numpy(), logits.numpy()), input_example=example.numpy(),
                              pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return local


@dataclass
class Registered:
    name: str
    version: str
    model_uri: str  # what mlflow.pytorch.load_model takes


def register(student: Student, name: str, tracking_uri: str) -> Registered:
    """Log the student (normalisation included) as an MLflow model in its run; register it as `name`."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if student.run_id is None:
        raise UserError(f"--register needs a run id: the model is logged in the student's own MLflow run, and "
                        f"{student.where} is a local folder")
    if not name.strip():
        raise UserError("--register NAME: give the registered model a name")
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifacts(student.run_id, str(save_mlflow_model(student.model, student.card, Path(tmp))),
                             artifact_path=Artifact.MODEL)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        version = mlflow.register_model(f"runs:/{student.run_id}/{Artifact.MODEL}", name)
    except MlflowException as exc:
        raise UserError(f"--register {name!r}: MLflow refused the name ({str(exc).splitlines()[0][:200]})") from None
    return Registered(name, str(version.version), f"models:/{name}/{version.version}")
