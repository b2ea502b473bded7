"""A finished student fetched for deployment — from an MLflow run or a local folder — and registered in MLflow.

What `kdarena deploy` reads: a run's `student.pt` and `student.json`
(`training.student_card`), or the same two files in a folder. A config
file names the run it came from (`kdarena export` writes the run into its
header), or else the completed run that trained it: the same config by
its params (`record.config_key`), its own seed first. What
`--register` writes: the normalised student as an MLflow model (pytorch
flavour, saved by `torch.export`, with signature and input example) in the
student's own run, registered under a name, so that
`mlflow.pytorch.load_model("models:/NAME/VERSION")` and `mlflow models serve`
work without kdarena installed.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdarena.zoo.errors import UserError

from .deploy import Normalised, normalised, raw_pixels
from .record import Artifact, Param, Role, Status, Tag, config_key
from .student_card import build_student, read_card


@dataclass
class Student:
    model: Normalised  # the student with its normalisation in front, eval mode
    card: dict[str, Any]
    run_id: str | None  # None: read from a local folder
    where: str  # the run or the folder, for messages


CONFIG_SUFFIXES = (".yaml", ".yml")
# what `kdarena export` writes into each config's header: `# rank 1: kd, …, MLflow run <id>`
_EXPORTED_FROM = re.compile(r"^#.*\bMLflow run ([0-9a-f]{32})\b", re.MULTILINE)


def load_student(source: str, tracking_uri: str) -> Student:
    """The student `source` names: a config file (.yaml), a folder (or a file in one) holding student.pt and
    student.json, else a run id."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in CONFIG_SUFFIXES:
        return _from_run(config_run(path, tracking_uri), tracking_uri, named_by=str(path))
    if path.exists():
        folder = path if path.is_dir() else path.parent
        return _from_folder(folder, str(folder), None)
    return _from_run(source, tracking_uri)


def config_run(path: Path, tracking_uri: str) -> str:
    """The id of the run a config file's student comes from: the one its header names, else a completed run of
    the same config in the store (the same seed first, then the newest)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .config import read_train_config

    try:
        named = _EXPORTED_FROM.search(path.read_text(errors="replace"))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if named:
        return named.group(1)
    cfg, _ = read_train_config(path, [])
    wanted = {config_key({k: str(v) for k, v in cfg.run_params(resolved=r).items()}) for r in (True, False)}
    client = MlflowClient(tracking_uri)
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"params.`{Param.METHOD_NAME}` = '{cfg.method.name}' "
                                  f"and tags.`{Tag.STATUS}` = '{Status.COMPLETED}'", max_results=1000) if experiments else []
    except MlflowException as exc:
        raise UserError(f"cannot search {tracking_uri} for a run of {path}: {str(exc).splitlines()[0][:160]}") from None
    matches = [r for r in runs if r.data.tags.get(Role.TAG) in Role.STUDENTS and config_key(r.data.params) in wanted]
    seed = str(cfg.train.seed)
    matches.sort(key=lambda r: (r.data.params.get(Param.SEED) == seed, r.info.start_time or 0), reverse=True)
    for run in matches:
        if Artifact.STUDENT in {a.path for a in client.list_artifacts(run.info.run_id)}:
            return run.info.run_id
    raise UserError(f"no completed run of the config in {path} with a {Artifact.STUDENT} is in {tracking_uri}"
                    f"{f' ({len(matches)} without one)' if matches else ''}: train it first (`kdarena train {path}`), "
                    "or give the run's id or --tracking-uri for the store that holds it")


def _from_folder(folder: Path, where: str, run_id: str | None) -> Student:
    missing = [name for name in (Artifact.STUDENT, Artifact.CARD) if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{where} holds no {' and no '.join(missing)}: a student to deploy is the {Artifact.STUDENT} "
                        f"and its card {Artifact.CARD} that `kdarena train` and a sweep's best trials record")
    card = read_card(folder / Artifact.CARD)
    return Student(normalised(build_student(card, folder / Artifact.STUDENT), card), card, run_id, where)


def _from_run(run_id: str, tracking_uri: str, named_by: str | None = None) -> Student:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        if named_by:
            raise UserError(f"{named_by} comes from run {run_id}, which is not in {tracking_uri}; give --tracking-uri "
                            "for the store the run was recorded in") from None
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
        where = f"run {run_id}" + (f" (of {named_by})" if named_by else "")
        return _from_folder(Path(tmp), where, run_id)


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
