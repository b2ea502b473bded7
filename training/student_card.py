"""A student's model card (`student.json` beside `student.pt`): what rebuilds, feeds and judges it.

Both writers of a student — `kdarena train` (`training.train_job`) and a
sweep's MLflow mirror (`search.mirror`) — build the card here, from the
resolved config, the data's input facts and the run's scores, so every
student carries the same card. `kdarena deploy` reads it back
(`read_card`, `build_student`) to rebuild the network and fold its input
normalisation in front.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping

import torch

from kdarena.methods import get_method
from kdarena.zoo.data import Dataset
from kdarena.zoo.errors import UserError
from kdarena.zoo.models import StagedModel, build_model

from .config import TrainConfig, export_config
from .record import Artifact, Metric

CARD_VERSION = 1
# what a deployed student takes: the loaders' own scale before they normalise (uint8 / 255)
INPUT_LAYOUT = "float32 NCHW, pixels in [0, 1] (uint8 / 255); mean/std are applied inside the deployed model"
SCORES = (Metric.TEST_ACC, Metric.PARAMS, Metric.MACS, Metric.LATENCY_MS)


def input_facts(data: Dataset) -> dict[str, Any]:
    """What a student's input and output are, as plain data (a sweep keeps it in records.json for its mirror)."""
    return {"num_classes": data.num_classes, "classes": list(data.classes), "in_channels": data.in_channels,
            "input_size": data.input_size, "mean": list(data.mean), "std": list(data.std)}


def _kdarena_version() -> str | None:
    try:
        return version("kdarena")
    except PackageNotFoundError:
        return None


def student_card(config: dict[str, Any], facts: dict[str, Any], dataset: dict[str, Any] | None,
                 scores: Mapping[str, Any], teacher_sha256: str | None) -> dict[str, Any]:
    """The card of a student trained by `config` (a resolved `TrainConfig` as JSON) on data with these `facts`.

    `dataset` is the data's identity (`training.identity.identity`); `scores` the run's final metrics under
    their record names; `teacher_sha256` the resolved teacher's, named only if the method learns from one.
    """
    cfg = TrainConfig.model_validate(config)
    names = facts.get("classes") or []
    return {
        "kdarena_card": CARD_VERSION,
        "kdarena_version": _kdarena_version(),
        "student": {"arch": cfg.student.arch, "options": dict(sorted(cfg.student.options.items())),
                    "label": cfg.student.label},
        "classes": {"count": facts["num_classes"], "names": list(names) if len(names) == facts["num_classes"] else None},
        "input": {"channels": facts["in_channels"], "size": facts["input_size"], "layout": INPUT_LAYOUT,
                  "mean": list(facts["mean"]), "std": list(facts["std"])},
        "dataset": {k: dataset.get(k) for k in ("name", "label", "fingerprint")} if dataset else None,
        "teacher": ({"arch": cfg.teacher.arch, "label": cfg.teacher.label, "sha256": teacher_sha256}
                    if teacher_sha256 and get_method(cfg.method.name).needs_teacher else None),
        "method": {"name": cfg.method.name, "params": dict(sorted(cfg.method.params.items()))},
        "config": export_config(config, teacher_sha256),
        "scores": {name: _number(scores.get(name)) for name in SCORES},
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value == value else None  # NaN: not measured


def write_card(card: dict[str, Any], folder: Path) -> Path:
    path = folder / Artifact.CARD
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_card(path: Path) -> dict[str, Any]:
    """A card from a file, checked for what rebuilding the student needs; a UserError naming the file if not."""
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
        student, classes, inputs = card["student"], card["classes"], card["input"]
        ok = (isinstance(student["arch"], str) and isinstance(student["options"], dict)
              and isinstance(classes["count"], int) and isinstance(inputs["channels"], int)
              and isinstance(inputs["size"], int)
              and len(inputs["mean"]) == len(inputs["std"]) == inputs["channels"]
              and all(isinstance(v, (int, float)) for v in [*inputs["mean"], *inputs["std"]])
              and all(v > 0 for v in inputs["std"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a kdarena student card ({type(exc).__name__}: {str(exc)[:120]}); "
                        f"it is written as {Artifact.CARD} beside {Artifact.STUDENT} by `kdarena train` and sweeps") from None
    if not ok:
        raise UserError(f"{path} is not a kdarena student card: its student, classes or input (channels, size, one "
                        f"mean and one positive std per channel) are malformed")
    return card


def build_student(card: dict[str, Any], state_path: Path) -> StagedModel:
    """The card's network with the weights of `state_path`, in eval mode; a UserError if they do not fit."""
    student, inputs = card["student"], card["input"]
    model = build_model(student["arch"], num_classes=card["classes"]["count"], in_channels=inputs["channels"],
                        input_size=inputs["size"], **student["options"])  # unknown arch or options: a UserError
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, ValueError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{state_path} does not hold the weights of the card's student "
                        f"{student.get('label', student['arch'])}: {first}") from None
    return model.eval()
