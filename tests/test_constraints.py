"""A sweep's cost constraints: refused before any work when no student fits, and no trial over a limit trained.

Real parts: the sweep runs on a real local Ray (2 CPUs) with real Optuna
studies and a real MLflow sqlite store; the bound is exercised through
Optuna's own TPE sampler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kdarena.cli.app import app
from kdarena.search.constraints import CostBounds, Shape, trial_refusal
from kdarena.search.points import DefineByRun
from kdarena.search.sweep_config import parse_sweep
from kdarena.zoo.cost import profile_cost
from kdarena.zoo.models import build_model

BASE = {
    "name": "capped",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 3}},
    "students": [{"arch": "cnn", "options": {"channels": 4}}],
    "methods": {"kd": {}},
    "budget": {"trials_per_method": 2, "epochs": 2},
}
DIGITS = Shape(num_classes=10, in_channels=1, input_size=8)
SEARCHED = {"arch": "cnn", "options": {"channels": 4}, "search": {"width": [0.5, 3.0], "depth": [1, 3]}}
# cnn(channels=4) on 8×8 digits: 3,536 MACs at width 0.5, depth 1; 90,336 at width 3, depth 1; 588,000 at 3, 3
MAX_MACS = 60_000  # at depth 1, widths up to ~2.4 fit; at depth 2 up to ~1.2; at depth 3 up to ~0.9


def _macs(options: dict) -> int:
    model = build_model("cnn", num_classes=10, in_channels=1, input_size=8, **options)
    return profile_cost(model, in_channels=1, input_size=8, latency=False).macs


def _refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc: dict):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    if ray.is_initialized():  # the session's (`helpers.shared_ray`): down, so that a Ray this sweep started shows
        ray.shutdown()
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "s.yaml")])
    assert result.exit_code == 2, result.output
    # before any work: no Ray, no teacher trained, no MLflow store, no trial
    assert not ray.is_initialized()
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "kdarena-sweeps" / "capped" / "ray").exists()
    return " ".join(result.stderr.split())  # rich wraps long lines


@pytest.mark.parametrize("limit, named, expected", [
    ({"max_macs": 5000}, "students.1 (cnn(channels=8))", "MACs 41,792 is over constraints.max_macs 5,000"),
    ({"max_params": 1000}, "students.1 (cnn(channels=8))", "parameter count 6,274 is over constraints.max_params 1,000"),
    ({"max_latency_ms": 1e-6}, "students.0 (cnn(channels=2))", " ms is over constraints.max_latency_ms 1e-06"),
], ids=["macs", "params", "latency"])
def test_a_fixed_student_over_a_limit_is_refused_before_any_work(limit, named, expected, tmp_path, monkeypatch):
    # cnn(channels=2): 3,536 MACs, 496 parameters; cnn(channels=8): 41,792 MACs, 6,274 parameters
    doc = BASE | {"students": [{"arch": "cnn", "options": {"channels": 2}}, {"arch": "cnn", "options": {"channels": 8}}],
                  "constraints": limit}
    text = _refused(tmp_path, monkeypatch, doc)
    assert f"{named}: " in text and expected in text, text
    assert "make the student smaller or raise the limit" in text


def test_a_searched_student_whose_lowest_point_is_over_is_refused(tmp_path, monkeypatch):
    low = _macs({"channels": 4, "width": 1.0, "depth": 2})
    doc = BASE | {"students": [{"arch": "cnn", "options": {"channels": 4},
                                "search": {"width": [1.0, 2.0], "depth": [2, 3]}}],
                  "constraints": {"max_macs": low - 1}}
    text = _refused(tmp_path, monkeypatch, doc)
    assert "students.0 (cnn(channels=4,depth=2,width=1.0), the lowest point of its search)" in text, text
    assert f"MACs {low:,} is over constraints.max_macs {low - 1:,}" in text
    assert "lower the search's low bounds or raise the limit" in text


@pytest.mark.parametrize("constraints, expected", [
    ({"max_macs": -5}, "constraints.max_macs: Input should be greater than 0 (got -5)"),
    ({"max_params": 0}, "constraints.max_params: Input should be greater than 0 (got 0)"),
    ({"max_flops": 100}, "constraints: unknown constraint 'max_flops'; the constraints are max_macs, max_params, "
                         "max_latency_ms"),
    ({"max_latency_ms": True}, "constraints.max_latency_ms: expected a positive number (got True)"),
    ({"max_macs": "40M"}, "constraints.max_macs: expected a positive number (got '40M')"),
], ids=["negative", "zero", "unknown", "bool", "text"])
def test_bad_constraint_values_exit_2_naming_the_field(constraints, expected, tmp_path, monkeypatch):
    text = _refused(tmp_path, monkeypatch, BASE | {"constraints": constraints})
    assert expected in text, text


def test_the_console_script_exits_2_for_a_student_over_a_limit(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(BASE | {"constraints": {"max_macs": 100}}))
    env = os.environ | {"KDARENA_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    done = subprocess.run([str(Path(sys.executable).parent / "kdarena"), "sweep", "s.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "students.0 (cnn(channels=4))" in done.stderr and "constraints.max_macs 100" in done.stderr
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("arch, option, values", [
    ("cnn", "width", [0.25, 0.5, 0.8, 1.0, 1.7, 3.0]), ("cnn", "depth", [1, 2, 3, 5]),
    ("cnn", "channels", [1, 2, 5, 16, 40]), ("mlp", "width", [0.1, 0.5, 1.0, 2.0]),
    ("mobilenetv2", "width", [0.25, 0.5, 1.0, 1.5]), ("resnet_cifar", "width", [0.25, 0.5, 1.0, 2.0]),
    ("resnet_cifar", "depth", [8, 14, 20, 32]), ("vgg8", "width", [0.25, 0.5, 1.0]),
    ("wrn", "depth", [10, 16, 22]), ("resnext", "depth", [11, 20, 29]),
    ("shufflenetv2", "width", [0.2, 0.3, 0.5, 1.0, 1.5, 2.0]),
])
def test_cost_grows_with_every_searchable_option(arch, option, values):
    """The bound's premise: a larger width, depth or channel count never costs fewer MACs or parameters."""
    costs = [profile_cost(build_model(arch, num_classes=10, in_channels=3, input_size=32, **{option: v}),
                          in_channels=3, input_size=32, latency=False) for v in values]
    assert all(a.macs <= b.macs and a.params <= b.params for a, b in zip(costs, costs[1:])), costs


def test_the_bound_is_tight_and_every_tpe_point_fits():
    """Optuna's TPE over ranges cut per trial: no point over the limit, the allowed range still covered."""
    sweep = parse_sweep(BASE | {"students": [SEARCHED], "constraints": {"max_macs": MAX_MACS}}, "s.yaml")
    bounds = CostBounds.of(sweep, DIGITS)
    top = bounds.upper(0, "width", 0.5, 3.0, {}, {"depth": 1})
    assert _macs({"channels": 4, "width": top}) <= MAX_MACS < _macs({"channels": 4, "width": top + 2.5 / 4096})
    assert bounds.upper(0, "depth", 1, 3, {"width": 0.5}, {}) == 3  # 17,360 MACs: the whole depth range fits

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=3, n_startup_trials=8))
    space = DefineByRun("kd", {}, ({"width": [0.5, 3.0], "depth": [1, 3]},), bounds)
    points = []
    for _ in range(40):
        trial = study.ask()
        space(trial)
        points.append(trial.params)
        study.tell(trial, trial.params["student0/width"] * trial.params["student0/depth"])  # prefers the limit
    macs = [_macs({"channels": 4, "width": p["student0/width"], "depth": p["student0/depth"]}) for p in points]
    assert max(macs) <= MAX_MACS
    widths = [p["student0/width"] for p in points]
    assert min(widths) < 0.8 and max(widths) > 0.9 * top
    assert {p["student0/depth"] for p in points} >= {1, 2}
    assert max(macs) > 0.8 * MAX_MACS  # the search reaches up to the limit, not only far below it


def test_a_trial_refuses_a_student_measured_over_the_latency_limit():
    sweep = parse_sweep(BASE | {"constraints": {"max_latency_ms": 1e-6, "max_macs": 1e9}}, "s.yaml")
    model = build_model("cnn", num_classes=10, in_channels=1, input_size=8, channels=4)
    cost = profile_cost(model, in_channels=1, input_size=8, latency=False)
    why = trial_refusal(sweep, model, DIGITS, cost)
    assert why is not None and why.startswith("not trained: the student's latency ") and "max_latency_ms 1e-06" in why
    assert "max_macs" not in why
    assert trial_refusal(parse_sweep(BASE | {"constraints": {"max_macs": 1e9}}, "s.yaml"), model, DIGITS, cost) is None


def test_a_searched_sweep_trains_no_trial_over_max_macs(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    doc = BASE | {"methods": {"baseline": {}}, "students": [SEARCHED], "constraints": {"max_macs": MAX_MACS},
                  "budget": {"trials_per_method": 12, "epochs": 1, "early_stopping": False}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "s.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trials = list(json.loads((tmp_path / "kdarena-sweeps" / "capped" / "records.json").read_text())["trials"].values())
    assert len(trials) == 12 and all(r["status"] == "completed" for r in trials), [r.get("reason") for r in trials]
    assert all(0 < r["metrics"]["macs"] <= MAX_MACS for r in trials)
    points = [r["trial_config"]["student0"] for r in trials]
    assert all(_macs({"channels": 4, **p}) == r["metrics"]["macs"] for p, r in zip(points, trials))
    widths = [p["width"] for p in points]  # the allowed widths run from 0.5 to ~2.4 (at depth 1)
    assert min(widths) < 1.0 and max(widths) > 1.6, widths
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kdarena").experiment_id], "tags.`kdarena.role` = 'trial'")
    assert len(runs) == 12 and all(run.data.metrics["macs"] <= MAX_MACS for run in runs)


def test_a_trial_over_a_limit_ends_failed_untrained_with_the_reason(local_ray, digits, tmp_path):
    """The guard inside the Ray worker: a student measured over a limit is reported failed, never trained."""
    from ray import tune

    from kdarena.search.trial import run_trial

    doc = parse_sweep(BASE | {"methods": {"baseline": {}}, "constraints": {"max_latency_ms": 1e-6}}, "s.yaml")
    trainable = tune.with_parameters(run_trial, sweep_doc=doc.model_dump(mode="json"), data=digits, teacher_state=None)
    grid = tune.Tuner(trainable, param_space={"method": "baseline"},
                      run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    result = grid[0]
    assert result.error is None
    assert result.metrics["status"] == "failed" and result.metrics["training_iteration"] == 1
    assert result.metrics["reason"].startswith("not trained: the student's ")
    assert "over constraints.max_latency_ms 1e-06" in result.metrics["reason"]
    assert result.checkpoint is None  # no epoch was trained
