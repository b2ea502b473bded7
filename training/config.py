"""The config `kdarena train` runs and a sweep's trials share: its schema, and the file `export` writes.

Every problem a user can cause is found here, before any work starts, and
reported as one `UserError` naming the field and the fix (the reading and
checking is `documents.py`'s). `export_config` pins a resolved config to its
teacher's weights: the file `kdarena train` re-runs exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdarena.methods import METHODS, get_method
from kdarena.methods.recipe import Recipe
from kdarena.zoo.data import DATASETS, TreeOptions
from kdarena.zoo.errors import UserError
from kdarena.zoo.models import model_problem, resolve
from kdarena.zoo.models.formats import FORMATS
from kdarena.zoo.models.timm_models import is_timm

from .documents import apply_overrides, format_validation_error, load_documents, show, validate_document
from .tracking import flatten


class Strict(BaseModel):
    """A config section: an unknown field is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


# the dataset options that say how an image tree is read (`zoo.data.TreeOptions`)
TREE_OPTIONS = tuple(f.name for f in fields(TreeOptions))


class DatasetConfig(Strict):
    name: str = "digits"
    root: str | None = Field(None, description="where the files are (or go); default ~/.cache/kdarena/data")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = Field(0, ge=0)
    download: bool = Field(True, description="fetch missing files where the network allows")
    label: str | None = Field(None, min_length=1, max_length=100,
                              description="the name shown for this data; default the folder's name for imagefolder, "
                                          "else the dataset's name")
    in_memory: bool | Literal["auto"] = Field(
        "auto", description="imagefolder: hold the decoded images in memory (true), stream them from disk (false), or "
                            "stream when the decoded training split exceeds memory_budget_mb (auto)")
    memory_budget_mb: float | None = Field(None, gt=0, description="imagefolder, in_memory: auto: the most the decoded "
                                                                   "training split may take; default a quarter of RAM")
    image_size: int | None = Field(None, ge=8, le=1024, description="imagefolder: the side images are read at, px; "
                                                                     "default the first training image's shorter side")
    workers: int | None = Field(None, ge=0, le=64, description="imagefolder, streamed: processes decoding images; "
                                                                "default one per core, at most 8")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {show(v)}; known datasets: {', '.join(DATASETS)}")
        return v

    @model_validator(mode="after")
    def _tree_options_on_a_tree(self) -> DatasetConfig:
        # held in memory is what every other dataset is: `in_memory: true` (or auto) says nothing wrong
        given = [k for k in TREE_OPTIONS if getattr(self, k) is not None and k != "in_memory"]
        given += ["in_memory: false"] if self.in_memory is False else []
        if self.name != "imagefolder" and given:
            raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to dataset imagefolder only ('{self.name}' is always held in "
                             f"memory at its own size); remove {'it' if len(given) == 1 else 'them'}")
        return self

    def tree(self) -> TreeOptions:
        """How an imagefolder is read."""
        return TreeOptions(**{k: getattr(self, k) for k in TREE_OPTIONS})


# what build_model is given from the dataset: never a model option
DATA_SHAPED_OPTIONS = frozenset({"num_classes", "in_channels", "input_size"})


class ModelConfig(Strict):
    arch: str
    options: dict[str, Any] = Field(default_factory=dict, description="constructor options: width, depth, hidden, …")

    @property
    def label(self) -> str:
        """A short name for tables and leaderboards: arch plus its options, e.g. `cnn(channels=8)`."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.arch}({opts})" if opts else self.arch

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        """A known model, under the zoo's own name (an alias such as RepDistiller's `ResNet50` is resolved)."""
        problem = model_problem(v, show(v))
        if problem:
            raise ValueError(problem)
        return v if is_timm(v) else resolve(v)

    @field_validator("options")
    @classmethod
    def _not_from_the_data(cls, v: dict[str, Any]) -> dict[str, Any]:
        given = sorted(set(v) & DATA_SHAPED_OPTIONS)
        if given:
            raise ValueError(f"option {show(given[0])} comes from the dataset (its classes, channels and image size); "
                             "remove it from options")
        return v


def _teacher_recipe() -> Recipe:
    return Recipe(epochs=30, lr=0.05)


class TeacherConfig(ModelConfig):
    checkpoint: str | None = Field(None, description="a local state_dict file to use instead of training")
    format: Literal[FORMATS] = Field("auto", description="the checkpoint's key names: auto (detected), kdarena, "
                                     "repdistiller, mdistiller, torchvision or timm")
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$", description="the teacher weights' expected sha256")
    recipe: Recipe = Field(default_factory=_teacher_recipe)

    @model_validator(mode="after")
    def _format_needs_checkpoint(self) -> TeacherConfig:
        if self.format != "auto" and self.checkpoint is None:
            raise ValueError(f"teacher.format '{self.format}' describes a checkpoint: give teacher.checkpoint, "
                             "or drop teacher.format")
        return self


class MethodConfig(Strict):
    name: str = "kd"
    params: dict[str, Any] = Field(default_factory=dict)


# The zero-download default pair: a CNN teacher four times as wide as its student.
DEFAULT_TEACHER = {"arch": "cnn", "options": {"channels": 32}}


DEFAULT_STUDENT = {"arch": "cnn", "options": {"channels": 8}}


class TrainConfig(Strict):
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    teacher: TeacherConfig
    student: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: Recipe = Field(default_factory=Recipe)
    cache_dir: str | None = Field(None, description="teacher store; default ~/.cache/kdarena/teachers")
    experiment: str = Field("kdarena", min_length=1, description="MLflow experiment name")

    @model_validator(mode="before")
    @classmethod
    def _default_pair(cls, data: Any) -> Any:
        """A section that names no `arch` is the default pair's (its options too, unless given)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, default in (("teacher", DEFAULT_TEACHER), ("student", DEFAULT_STUDENT)):
            section = data.get(key)
            if section is None:
                data[key] = dict(default)
            elif isinstance(section, dict) and "arch" not in section:
                data[key] = {**default, **section}
        return data

    def method_params(self):
        """The method's validated parameters (defaults filled in)."""
        return get_method(self.method.name).Params.model_validate(self.method.params)

    def run_params(self, *, resolved: bool) -> dict[str, Any]:
        """The MLflow params a run of this config records, by name (`teacher.recipe.lr`).

        `kdarena train` records the method's parameters `resolved` (its
        defaults filled in); a sweep's runs record them as the trial set them.
        """
        config = self.model_dump(mode="json")
        if resolved:
            config["method"]["params"] = self.method_params().model_dump(mode="json")
        return flatten("", config)


def parse_config(raw: Any, source: str = "config") -> TrainConfig:
    """Validate a loaded YAML document; every error names its field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections (dataset, teacher, student, method, train), got {type(raw).__name__}")
    cfg = validate_document(TrainConfig, raw, source)
    method = get_method_or_error(cfg.method.name, source)
    try:
        method.Params.model_validate(cfg.method.params)
    except ValidationError as exc:
        raise UserError(f"{source}: {format_validation_error(exc, prefix='method.params')} (method '{method.name}' takes: "
                        f"{', '.join(method.Params.model_fields) or 'no parameters'})") from None
    return cfg


def get_method_or_error(name: str, source: str):
    if name not in METHODS:
        raise UserError(f"{source}: method.name: unknown method {show(name)}; known methods: {', '.join(METHODS)}")
    return get_method(name)


def read_train_config(path: str | Path | None, overrides: list[str],
                      notice: Callable[[str], None] = lambda _: None) -> tuple[TrainConfig, Any]:
    """What `kdarena train` validates before any work: the file (or the default config), `--set` edits, the fields.

    Returns the config and the document it came from; every problem is a UserError. A file of several
    documents (`kdarena export --top K` to stdout: best first) gives its first, and `notice` says so.
    """
    docs = load_documents(path) if path is not None else [{}]
    raw = apply_overrides(docs[0] if docs else None, overrides)
    config = parse_config(raw, str(path or "default config"))
    if len(docs) > 1:  # said once the first is known good: a refused file gets its one error line alone
        notice(f"{path} holds {len(docs)} configs; training the first (`kdarena export SWEEP --top K -o DIR/` "
               "writes one file per config)")
    return config, raw


def export_config(config: dict[str, Any], teacher_sha256: str | None) -> dict[str, Any]:
    """A trial's config as `kdarena train` takes it, pinned to its teacher's weights."""
    config = TrainConfig.model_validate(config).model_dump(mode="json")
    # free-form mappings in one order, so every writer of a config gives the same bytes
    for section in (config["method"], config["student"], config["teacher"]):
        key = "params" if section is config["method"] else "options"
        section[key] = dict(sorted(section[key].items()))
    if teacher_sha256 and get_method(config["method"]["name"]).needs_teacher:
        config["teacher"]["sha256"] = teacher_sha256
    return config


def config_yaml(config: dict[str, Any]) -> str:
    """The YAML text of one exported config (also what the dashboard offers for download)."""
    return yaml.safe_dump(config, sort_keys=False)
