"""`kdarena train` configs: reading, overriding and validating, before any work starts.

Every problem a user can cause is found here and reported as one
`UserError` naming the field (e.g. `method.params.alpha`) and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdarena.methods import get_method
from kdarena.methods.recipe import Recipe
from kdarena.zoo.data import DATASETS
from kdarena.zoo.errors import UserError
from kdarena.zoo.models import MODELS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetConfig(_Strict):
    name: str = "digits"
    root: str | None = Field(None, description="where the files are (or go); default ~/.cache/kdarena/data")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = Field(0, ge=0)
    download: bool = Field(True, description="fetch missing files where the network allows")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset '{v}'; known datasets: {', '.join(DATASETS)}")
        return v


class ModelConfig(_Strict):
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
        if v not in MODELS:
            raise ValueError(f"unknown model '{v}'; known models: {', '.join(sorted(MODELS))}")
        return v


def _teacher_recipe() -> Recipe:
    return Recipe(epochs=30, lr=0.05)


class TeacherConfig(ModelConfig):
    checkpoint: str | None = Field(None, description="a local state_dict file to use instead of training")
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$", description="the teacher weights' expected sha256")
    recipe: Recipe = Field(default_factory=_teacher_recipe)


class MethodConfig(_Strict):
    name: str = "kd"
    params: dict[str, Any] = Field(default_factory=dict)


# The zero-download default pair: a CNN teacher four times as wide as its student.
DEFAULT_TEACHER = {"arch": "cnn", "options": {"channels": 32}}
DEFAULT_STUDENT = {"arch": "cnn", "options": {"channels": 8}}


class TrainConfig(_Strict):
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


def validate_document(model: type[BaseModel], raw: dict[str, Any], source: str):
    """`model` from a loaded document, or one UserError naming the file and the first bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {format_validation_error(exc)}") from None


def get_method_or_error(name: str, source: str):
    try:
        return get_method(name)
    except UserError as exc:
        raise UserError(f"{source}: method.name: {exc}") from None


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """First error of a pydantic validation as `field.path: message (got value)`."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    got = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    more = len(exc.errors()) - 1
    return f"{loc or '(top level)'}: {msg}{shown}" + (f"; and {more} more error(s)" if more else "")


def load_yaml(path: str | Path) -> Any:
    """Safe YAML from a file: no Python tags, a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}; pass the path of a YAML file (see `kdarena train --help`)")
    try:
        text = path.read_text(encoding="utf-8")
        docs = list(yaml.safe_load_all(text))
        if len(docs) > 1:
            raise UserError(f"{path} holds {len(docs)} YAML documents; kdarena reads one config per file "
                            "(`kdarena export SWEEP --top K -o DIR/` writes one file each)")
        return docs[0] if docs else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}; fix the file's syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; pass a YAML config") from None


def apply_overrides(raw: Any, overrides: list[str]) -> Any:
    """`--set a.b.c=value` edits: the value is parsed as YAML (numbers, lists, booleans)."""
    if raw is not None and not isinstance(raw, dict):
        if overrides:
            raise UserError("--set needs a config whose top level is a mapping of sections")
        return raw
    doc = dict(raw or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set method.params.alpha=0.5")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML; quote it") from None
        node = doc
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(f"--set {item!r}: '{part}' is a value, not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = parsed
    return doc
