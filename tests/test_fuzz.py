"""Fuzzing the validation of `kdarena train` configs and `kdarena sweep` files.

Every document, however broken, must either validate or be refused with one
`UserError` that the CLI prints as one line on stderr with exit code 2; no
other exception, no traceback. Documents are near-valid (a real config with
keys dropped, types swapped, unknown keys, extreme numbers, deep nesting,
odd unicode) or garbage (random text and YAML token soup), and `--set`
overrides are fuzzed too.

Each document goes through exactly what the CLI runs before any work
(`read_train_config`, `load_sweep`), then through the CLI itself (typer's
CliRunner on the real app): `train` with a tracking store that cannot be
written, so a valid config stops at that check (exit 2, before any data or
model is touched); `sweep` only with refused files (a valid one would start
Ray). A valid sweep must also turn into Optuna spaces and trial configs
without an error: a file that validates must not fail in trial 37.

CI runs ~60 examples per property (a few hundred in all);
`KDARENA_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py` runs 2,000 each.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdarena.methods.space import Choice, FloatRange, IntRange
from kdarena.cli.app import app, one_line
from kdarena.training.config import TrainConfig, parse_config, read_train_config
from kdarena.search.sweep_config import (SEARCHABLE_OPTIONS, SweepConfig, load_sweep, method_space,
                                         trial_config)
from kdarena.sweeps import FOLDER as SWEEPS
from kdarena.zoo.errors import UserError

EXAMPLES = int(os.environ.get("KDARENA_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# a tracking store that cannot be written: a valid train config ends at that check, before any data or model
NOWHERE = "sqlite:////nonexistent-kdarena-fuzz/mlflow.db"

# ---------------------------------------------------------------- valid starting points

TRAIN_BASES: list[dict[str, Any]] = [
    {},
    {"dataset": {"name": "digits", "val_fraction": 0.2, "split_seed": 3, "download": False},
     "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 2, "lr": 0.05, "seed": 1}},
     "student": {"arch": "cnn", "options": {"channels": 4}},
     "method": {"name": "kd", "params": {"temperature": 4.0, "alpha": 0.9}},
     "train": {"epochs": 3, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "step",
               "milestones": [0.5, 0.75], "gamma": 0.1, "warmup_epochs": 0.5, "seed": 7, "num_threads": 1},
     "cache_dir": "teachers", "experiment": "fuzz"},
    {"teacher": {"arch": "mlp", "options": {"hidden": [64, 32]}, "sha256": "0" * 64},
     "student": {"arch": "mlp", "options": {"hidden": [16], "dropout": 0.1}},
     "method": {"name": "wasserstein", "params": {"critic_iters": 2, "layer": -2, "preact": False}},
     "train": {"optimizer": "adamw", "schedule": "constant", "nesterov": False}},
    {"method": {"name": "svd", "params": {"dfv": 2, "clip": True, "stages": 2, "init_epochs": 0.3}},
     "teacher": {"checkpoint": "teacher.pt"}},
]

SWEEP_BASES: list[dict[str, Any]] = [
    {"name": "fuzz-sweep", "dataset": {"name": "digits", "val_fraction": 0.2},
     "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 2}},
     "students": [{"arch": "cnn", "options": {"channels": 8}, "search": {"channels": [4, 8]}},
                  {"arch": "mlp", "options": {"hidden": [32]}, "search": {"width": [0.25, 1.0]}}],
     "methods": {"baseline": None, "kd": {"fix": {"alpha": 0.5}, "space": {"temperature": [1.0, 8.0], "lr": [0.01, 0.1]}},
                 "at": {"space": {"p": [1, 2]}}, "wasserstein": {"fix": {"critic_iters": 2, "weight_decay": 1e-4}},
                 "svd": {"space": {"dfv": [1, 2], "clip": [True]}}},
     "budget": {"trials_per_method": 2, "epochs": 4, "grace_period": 1, "reduction_factor": 2, "early_stopping": True},
     "objective": ["val_acc", "macs"], "train": {"batch_size": 32, "seed": 3}, "resources": {"cpu": 1, "gpu": 0},
     "max_concurrent": 2, "final": {"seeds": 1}, "sampler": "random", "seed": 7, "storage": "runs",
     "cache_dir": "cache", "experiment": "fuzz"},
    *(yaml.safe_load(p.read_text()) for p in sorted(SWEEPS.glob("*.yaml"))),
]

# ---------------------------------------------------------------- values that break things

EXTREME_NUMBERS = [0, -1, 1, 2, -(10**30), 2**31, 2**32, 2**32 - 1, 2**63 - 1, 2**63, 2**64, -(2**64), 10**100,
                   0.0, -0.0, 0.5, 1.0, -1e-300, 5e-324, 1e308, -1e308, 1.7976931348623157e308,
                   math.nan, math.inf, -math.inf, True, False]
WEIRD_TEXT = ["", " ", "kd ", "KD", "cnn\n", "\t", "é", "日本語", "🙂", "\u202e", "\ufeff", "\x00", "\x1b[31m", "\ud800",
              "[/]", "[bold]", "../../x", "/etc/passwd", "~", "$HOME", "%s", "{x}", "a" * 5000, "null", "~/x", ".nan",
              "1e400", "0x10", "yes", "no", "2024-13-01", "!!python/object/apply:os.system", "*a", "&a", "---",
              "digits", "kd", "baseline", "cnn", "sgd", "val_acc", "macs", "random"]
KEYS = ["name", "arch", "options", "params", "recipe", "epochs", "lr", "seed", "fix", "space", "search", "budget",
        "methods", "students", "teacher", "student", "train", "dataset", "method", "objective", "resources",
        "checkpoint", "sha256", "trials", "trials_per_method", "channels", "width", "depth", "temperature", "alpha",
        "p", "dfv", "Epochs", "epoch", "lr ", "trian", "métodos", "", "[key]", "a.b", "\n", "🙂", "\ud800"]

scalars = st.one_of(
    st.sampled_from(EXTREME_NUMBERS), st.sampled_from(WEIRD_TEXT), st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers(-5, 5))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def _positions(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every node of a document (the root included)."""
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _positions(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _positions(v, (*path, i))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _put(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


@st.composite
def near_valid(draw, bases: list[dict[str, Any]]) -> Any:
    """A valid document with one to four mutations: dropped keys, swapped types, unknown keys, extreme values…"""
    doc = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_positions(doc)))
        node = _get(doc, path)
        op = draw(st.sampled_from(["drop", "replace", "extreme", "text", "unknown_key", "swap_type", "nest", "rename",
                                   "duplicate"]))
        if op == "drop" and path:
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
        elif op == "replace":
            doc = _put(doc, path, draw(values))
        elif op == "extreme":
            doc = _put(doc, path, draw(st.sampled_from(EXTREME_NUMBERS)))
        elif op == "text":
            doc = _put(doc, path, draw(st.sampled_from(WEIRD_TEXT) | st.text(max_size=20)))
        elif op == "unknown_key" and isinstance(node, dict):
            node[draw(keys)] = draw(values)
        elif op == "swap_type":
            doc = _put(doc, path, draw(st.sampled_from([str(node), [node], {"value": node}, None, True, 0, ""])))
        elif op == "nest":
            wrapped = node
            for _ in range(draw(st.integers(1, 70))):
                wrapped = [wrapped] if draw(st.booleans()) else {"x": wrapped}
            doc = _put(doc, path, wrapped)
        elif op == "rename" and path and isinstance(path[-1], str):
            parent = _get(doc, path[:-1])
            parent[draw(st.sampled_from([path[-1].upper(), path[-1] + "s", " " + path[-1], path[-1][:-1] or "x"]))] = (
                parent.pop(path[-1]))
        elif op == "duplicate" and isinstance(node, list):
            node.extend(copy.deepcopy(node) * draw(st.integers(1, 3)))
    return doc


def _dump(doc: Any, style: str) -> str:
    if style == "flow":
        return yaml.safe_dump(doc, default_flow_style=True, allow_unicode=False)
    return yaml.safe_dump(doc, default_flow_style=False, allow_unicode=True, sort_keys=False)


YAML_TOKENS = ["{", "}", "[", "]", ": ", ":", ", ", "- ", "\n", "  ", "? ", "---\n", "...\n", "&a ", "*a", "*b", "<<: ",
               "!!python/object/apply:os.system ", "!!python/object/new:os.system ", "!!python/name:os.system ",
               "!!binary ", "!!set ", "!!timestamp ", "!!str ", "!!int ", "!!float ", "!custom ", "%YAML 1.1\n",
               "%TAG ! tag:x,2000:\n", "|\n", ">\n", "#", "'", '"', "\\", "\\ud800", "\\x00", ".inf", "-.inf", ".nan",
               "0x", "0o", "0b", "1e400", "1.0e400", "9" * 5000, "0b" + "1" * 300, "2024-13-01", "2001-12-14 ", "~",
               "null", "yes", "name", "teacher", "students", "methods", "train", "method", "kd", "cnn", "arch",
               "options", "epochs", "digits", "\t", "é", "🙂", "\x85", "\u2028", "\ufeff", "\x1b"]
garbage = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join),
    st.binary(max_size=100),
)


def _document(bases: list[dict[str, Any]]):
    structured = st.tuples(st.one_of(near_valid(bases), values), st.sampled_from(["block", "flow"])).map(
        lambda t: _dump(*t))
    return st.one_of(structured, garbage)


OVERRIDE_KEYS = sorted({".".join(map(str, p)) for b in TRAIN_BASES for p in _positions(b) if p}
                       | {"", ".", "a..b", "train.", ".train", "train.epochs.x", "method.params.alpha.beta",
                          "teacher.options.channels", " method . name ", "dataset=name"})
override_values = st.one_of(
    st.sampled_from(EXTREME_NUMBERS).map(lambda v: yaml.safe_dump(v).removesuffix("\n...\n").strip()),
    st.sampled_from(WEIRD_TEXT), st.sampled_from(YAML_TOKENS), st.text(max_size=30),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)
overrides = st.lists(st.one_of(
    st.tuples(st.sampled_from(OVERRIDE_KEYS) | st.text(max_size=15), override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=20),
), max_size=4)

# ---------------------------------------------------------------- the oracle


def _write(folder: Path, doc: str | bytes) -> Path:
    path = folder / "fuzz.yaml"
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    return path


def _assert_clear(message: str) -> None:
    """A UserError's text: one line that says something, not a dump."""
    assert message.strip(), "empty message"
    assert len(message.splitlines()) == 1, f"message spans lines: {message!r}"
    assert len(message) < 2000, f"message of {len(message)} characters"
    assert "Traceback" not in message


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def check_train(folder: Path, doc: str | bytes, sets: list[str]) -> TrainConfig | None:
    path = _write(folder, doc)
    try:
        cfg, _ = read_train_config(path, sets)
        message = None
    except UserError as exc:
        cfg, message = None, str(exc)
        _assert_clear(message)
    args = ["train", str(path), *[a for s in sets for a in ("--set", s)], "--tracking-uri", NOWHERE]
    line = _invoke(args)
    if message is None:  # valid: it stopped at the tracking store, the first check after validation
        assert "is not writable" in line, line
        # the config `kdarena train` would record re-validates as it is
        assert parse_config(cfg.model_dump(mode="json"), "resolved") == cfg
    else:
        assert line == "error: " + one_line(message)
    return cfg


def check_sweep(folder: Path, doc: str | bytes) -> SweepConfig | None:
    path = _write(folder, doc)
    try:
        sweep, _ = load_sweep(path)
    except UserError as exc:
        _assert_clear(str(exc))
        assert _invoke(["sweep", str(path)]) == "error: " + one_line(str(exc))
        return None
    _check_runnable(sweep)
    return sweep


def _optuna_distribution(dim):
    if isinstance(dim, Choice):
        return optuna.distributions.CategoricalDistribution(list(dim.choices))
    if isinstance(dim, IntRange):
        return optuna.distributions.IntDistribution(dim.low, dim.high, log=dim.log)
    assert isinstance(dim, FloatRange)
    return optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log)


def _check_runnable(sweep: SweepConfig) -> None:
    """What a valid sweep becomes in its trials: Optuna spaces, and a train config at every corner of them."""
    assert sweep.trials_for() >= 1
    for method in sweep.methods:
        space = method_space(sweep, method)
        for dim in space.values():
            _optuna_distribution(dim)
        for index, student in enumerate(sweep.students):
            for corner in (0, -1):
                options = {}
                for option, (low, high) in student.search.items():
                    kind = SEARCHABLE_OPTIONS[option]
                    dist = (optuna.distributions.IntDistribution(int(low), int(high)) if kind is int
                            else optuna.distributions.FloatDistribution(low, high))
                    options[option] = (dist.low, dist.high)[corner]
                params = {name: (dim.choices[corner] if isinstance(dim, Choice) else (dim.low, dim.high)[corner])
                          for name, dim in space.items()}
                cfg = trial_config(sweep, method, index, options, params, seed=sweep.train.seed + 1)
                cfg.method_params()
                assert parse_config(cfg.model_dump(mode="json"), "trial") == cfg


# ---------------------------------------------------------------- the properties


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_bases_are_valid(folder):
    """The starting points are valid, so a mutation is what breaks them."""
    for doc in TRAIN_BASES:
        assert check_train(folder, _dump(doc, "block"), []) is not None
    for doc in SWEEP_BASES:
        assert check_sweep(folder, _dump(doc, "block")) is not None


@FUZZ
@given(doc=_document(TRAIN_BASES), sets=overrides)
@example(doc="", sets=[])
@example(doc="- a\n- b\n", sets=["train.epochs=2"])
@example(doc="x: " + "[" * 3000 + "]" * 3000, sets=[])
@example(doc="train: {epochs: " + "9" * 5000 + "}", sets=[])
@example(doc="a: &a [*a]\n", sets=[])
@example(doc="'[/x]': 1\n", sets=[])
@example(doc=b"\xff\xfe\x00", sets=[])
@example(doc="train: {lr: .inf}", sets=["method.params.alpha=.nan"])
def test_train_config_validates_or_exits_2_with_one_line(folder, doc, sets):
    check_train(folder, doc, sets)


@FUZZ
@given(doc=_document(TRAIN_BASES))
def test_train_config_without_overrides(folder, doc):
    check_train(folder, doc, [])


@FUZZ
@given(sets=st.lists(st.tuples(st.sampled_from(OVERRIDE_KEYS), override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
                     min_size=1, max_size=6))
@example(sets=["a..b=1"])
@example(sets=["train.epochs=!!python/object/apply:os.system [echo]"])
@example(sets=["train=5", "train.epochs=3"])
def test_set_overrides_on_the_default_config(folder, sets):
    check_train(folder, "", sets)


@FUZZ
@given(doc=_document(SWEEP_BASES))
@example(doc="name: ../../x\n")
@example(doc="{}")
@example(doc="*a" + "9" * 5000)  # PyYAML quotes the undefined alias whole in its message
@example(doc="a: &a [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
             "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
             "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n")
def test_sweep_file_validates_or_exits_2_with_one_line(folder, doc):
    check_sweep(folder, doc)


@FUZZ
@given(doc=near_valid(SWEEP_BASES), style=st.sampled_from(["block", "flow"]))
def test_near_valid_sweep_is_refused_or_runnable(folder, doc, style):
    check_sweep(folder, _dump(doc, style))
