"""What names a run in MLflow: its method, student and teacher tags, and its data's identity.

A dataset is identified by its content fingerprint (`Dataset.fingerprint`),
shown by its label. Every student and teacher run carries both as tags, and
the same identity as an MLflow dataset input (the fingerprint as its
digest), so the stock MLflow UI's Dataset column names the data too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdarena.zoo.data import Dataset

from .record import Tag

# MLflow keeps a dataset's digest in a 36-character column
MLFLOW_DIGEST_CHARS = 36


def identity(data: Dataset, root: str | None) -> dict[str, Any]:
    """The dataset's identity as plain data (what records.json and the teacher store's sidecar keep)."""
    return {"name": data.name, "label": data.label, "fingerprint": data.fingerprint,
            "root": str(Path(root).expanduser().resolve()) if root else None}


def student_tags(cfg, with_teacher: bool) -> dict[str, str]:
    """The tags every student run carries for its method, student and teacher (`cfg`: a `TrainConfig`)."""
    return {Tag.METHOD: cfg.method.name, Tag.STUDENT: cfg.student.arch, Tag.STUDENT_LABEL: cfg.student.label,
            Tag.TEACHER: cfg.teacher.arch if with_teacher else "",
            Tag.TEACHER_LABEL: cfg.teacher.label if with_teacher else ""}


def dataset_tags(ident: dict[str, Any]) -> dict[str, str]:
    return {Tag.DATASET: ident["name"], Tag.DATASET_LABEL: ident["label"], Tag.DATASET_FINGERPRINT: ident["fingerprint"]}


def mlflow_dataset(ident: dict[str, Any]):
    """An MLflow dataset record of the identity: name = label, digest = the fingerprint (its first 36 characters,
    all MLflow keeps), source = the loader and the folder it read."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    source = CodeDatasetSource({"mlflow.source.name": f"kdarena.zoo.data:{ident['name']}",
                                **({"kdarena.root": ident["root"]} if ident.get("root") else {})})
    return MetaDataset(source, name=ident["label"], digest=ident["fingerprint"][:MLFLOW_DIGEST_CHARS])
