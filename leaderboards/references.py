"""Published results that stand beside our own on the leaderboard, in its columns, never ranked.

Data files (reported figures, never reproduced by kdarena):

- ``references.csv`` — one row per published accuracy, with columns
  ``dataset, teacher, student, method, variant, test_acc, test_errors,
  test_size, params, macs, flops, key_hparams, source, table, note``.
  ``test_acc`` is a fraction in [0, 1]; papers that report test
  misclassifications keep them in ``test_errors`` (out of ``test_size``) and
  ``test_acc = 1 - test_errors / test_size``. Costs are filled only where
  published: ``macs`` for the RepDistiller/DKD students (RepDistiller's
  published student costs at 32×32, 100 classes), ``flops`` and ``params`` as the SVD
  paper prints them (its own FLOPs convention), ``params`` for the MLPs.
  ``method`` uses kdarena's method names (``baseline`` = student alone /
  "S", ``kd``, ``fitnets``, ``at``, ``fsp``, ``svd``, ``adversarial``,
  ``crd``, ``dkd``, ``dist``, ``ctkd``, ``mlkd``, ``reviewkd``); ``variant``
  ``logit_std`` marks a method run with logit standardisation; ``teacher`` rows
  are the teacher network itself; ``student-initial`` is the pre-trained
  student the MLP study starts from. ``teacher``/``student`` use kdarena zoo
  names where the network is the zoo's (``resnet20``, ``mobilenetv2_half`` =
  RepDistiller's "MobileNetV2"), the paper's names otherwise.
- ``sources.yaml`` — each ``source`` string's full citation and tables.

Covered (sources.yaml names each publication and the public page read):
RepDistiller's same- and cross-architecture CIFAR-100 tables (teacher,
student alone, KD, FitNet, AT, FSP, CRD), DKD on CIFAR-100 and ImageNet
(mdistiller README), DIST on CIFAR-100 and ImageNet, ReviewKD on ImageNet,
logit standardisation with KD, CTKD, DKD and MLKD (and CTKD, MLKD without
it) on CIFAR-100, the SVD paper's CIFAR-100 table, schedule figures and
Tiny-ImageNet/ImageNet-50 line, the MLP soft-target/adversarial table and
Hinton's MNIST figures.

``kdarena leaderboard --export leaderboards/`` writes one Markdown file per
dataset here (``digits.md``, ...), our ranking followed by these rows.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from typing import Any

import pandas as pd

from .board import LEADERBOARD_COLUMNS, _as_set

REFERENCES_FILE = "references.csv"
SOURCES_FILE = "sources.yaml"
COLUMNS = ("dataset", "teacher", "student", "method", "variant", "test_acc", "test_errors", "test_size", "params",
           "macs", "flops", "key_hparams", "source", "table", "note")
_INT_COLUMNS = ("test_errors", "test_size")
_FLOAT_COLUMNS = ("test_acc", "params", "macs", "flops")


def _number(text: str, kind: type) -> Any:
    text = text.strip()
    if not text:
        return None if kind is int else math.nan
    return kind(float(text)) if kind is int else float(text)


@lru_cache(maxsize=1)
def _rows() -> tuple[dict[str, Any], ...]:
    text = resources.files(__package__).joinpath(REFERENCES_FILE).read_text(encoding="utf-8")
    rows = []
    for raw in csv.DictReader(text.splitlines()):
        row: dict[str, Any] = {k: (raw.get(k) or "").strip() for k in COLUMNS}
        for k in _INT_COLUMNS:
            row[k] = _number(row[k], int)
        for k in _FLOAT_COLUMNS:
            row[k] = _number(row[k], float)
        rows.append(row)
    return tuple(rows)


def load_references(dataset: str | None = None) -> list[dict[str, Any]]:
    """The published results, one dict per row (a fresh copy); only `dataset`'s when given.

    Missing numbers are NaN (floats) or None (error counts); missing text is "".
    """
    return [dict(r) for r in _rows() if dataset is None or r["dataset"] == dataset]


def load_sources() -> dict[str, dict[str, Any]]:
    """sources.yaml: each `source` string of references.csv → its title, tables and what it reports."""
    import yaml

    text = resources.files(__package__).joinpath(SOURCES_FILE).read_text(encoding="utf-8")
    return yaml.safe_load(text)


REFERENCE_EXTRA = ["variant", "test_errors", "test_size", "note", "table", "citation"]


# -- published results ----------------------------------------------------------------------------------------
REPORTED = "reported (not reproduced): "


def reference_rows(dataset: str | None = None, teacher: str | Iterable[str] | None = None) -> pd.DataFrame:
    """Published results in the leaderboard's columns, flagged: source = "reported (not reproduced): <citation>".

    test_acc_mean is the published value (a fraction); n_seeds, test_acc_std,
    latency_ms and rank are NaN (references never rank); pareto is False;
    `reported` is True. Extra columns: variant, test_errors, test_size,
    note, table, citation. `teacher` filters like the leaderboard's.
    """
    refs = load_references(dataset)
    wanted = _as_set(teacher)
    rows = []
    for r in refs:
        if wanted is not None and r["teacher"] not in wanted:
            continue
        rows.append({"rank": math.nan, "dataset": r["dataset"], "teacher": r["teacher"], "student": r["student"],
                     "method": r["method"], "test_acc_mean": r["test_acc"], "test_acc_std": math.nan,
                     "n_seeds": math.nan, "params": r["params"], "macs": r["macs"], "latency_ms": math.nan,
                     "latency_noise_ms": math.nan, "key_hparams": r["key_hparams"], "source": REPORTED + r["source"], "run_id": None,
                     "pareto": False, "flops": r["flops"], "student_arch": None, "sweep": None, "experiment": None,
                     "run_ids": [], "reported": True, "dataset_label": r["dataset"], "dataset_fingerprint": None,
                     "variant": r["variant"], "test_errors": r["test_errors"],
                     "test_size": r["test_size"], "note": r["note"], "table": r["table"], "citation": r["source"]})
    return pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS + REFERENCE_EXTRA)


#: which published results the leaderboard shows: auto = those of the datasets it ranks (or the one asked for)
REFERENCE_MODES = ("auto", "all", "none")


def published(board: pd.DataFrame, mode: str, dataset: str | None = None,
              teacher: str | Iterable[str] | None = None) -> pd.DataFrame:
    """The reference rows `mode` asks for beside `board` (filtered like it by `dataset` and `teacher`).

    `auto` keeps a reader's first view short: only the datasets with rows of
    ours, or, when a dataset is named, that dataset's published results.
    """
    if mode == "none":
        return reference_rows().iloc[0:0]
    refs = reference_rows(dataset, teacher)
    if mode == "auto" and dataset is None:
        refs = refs[refs["dataset"].isin(set(board["dataset_label"]))]
    return refs


def with_references(board: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """Our rows, then the reference rows of the same dataset label, label by label (for tables and exports)."""
    labels = list(dict.fromkeys(board["dataset_label"].tolist() + references["dataset"].tolist()))
    parts = []
    for label in labels:
        ours = board[board["dataset_label"] == label]
        parts.append(ours)
        refs = references[references["dataset"] == label]
        shown = ours["dataset"].unique()
        if len(shown) == 1:  # one dataset of ours carries the label: its published results join its table
            refs = refs.assign(dataset=shown[0])
        parts.append(refs)
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS + REFERENCE_EXTRA)
    return pd.concat(parts, ignore_index=True).reindex(columns=LEADERBOARD_COLUMNS + REFERENCE_EXTRA)
