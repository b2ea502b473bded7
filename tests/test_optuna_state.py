"""The sweep's Optuna storage says what records.json says: states, intermediate values, one study per method.

A real sweep (local Ray, 2 CPUs) with completed, ASHA-stopped and diverged
trials is read back with `optuna.load_study`, the way optuna-dashboard and
Optuna's importances read it. The hooks Ray calls are also driven directly
on a real Optuna storage for what a small sweep cannot produce at will: a
failed trial, a multi-objective study, a resumed sweep's replay.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from helpers import free_port, sweep_workspace

from kdarena.cli.app import app
from kdarena.search.per_method import MethodStudy
from kdarena.search.phases import study_storage
from kdarena.search.points import DefineByRun
from kdarena.search.records import SweepPaths, SweepRecords
from kdarena.search.sweep_config import method_space, parse_sweep

State = optuna.trial.TrialState
EXPECTED_STATE = {"completed": State.COMPLETE, "early-stopped": State.PRUNED, "diverged": State.FAIL,
                  "failed": State.FAIL}

# baseline over a wide lr range: ASHA stops the weak ones; kd at lr 1e4: its first step's loss is NaN (diverged)
TOLD = {
    "name": "told",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 8}, "recipe": {"epochs": 2}},
    "students": [{"arch": "cnn", "options": {"channels": 4}}],
    "methods": {"baseline": {"space": {"lr": [1.0e-4, 0.3]}}, "kd": {"fix": {"lr": 1.0e4}}},
    "budget": {"trials_per_method": 4, "epochs": 3, "grace_period": 1, "reduction_factor": 2},
    "final": {"seeds": 0},
}


@pytest.fixture(scope="module")
def told_sweep(tmp_path_factory) -> Path:
    """The sweep folder of one real sweep with completed, early-stopped and diverged trials."""
    work = tmp_path_factory.mktemp("told")
    with sweep_workspace(work):
        (work / "told.yaml").write_text(yaml.safe_dump(TOLD))
        result = CliRunner().invoke(app, ["sweep", "told.yaml"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return work / "kdarena-sweeps" / "told"


def test_every_trial_ends_in_its_study_as_records_json_says(told_sweep):
    paths = SweepPaths(told_sweep)
    trials = SweepRecords(paths.records).trials
    assert {r["status"] for r in trials.values()} >= {"completed", "early-stopped", "diverged"}
    # one storage, one study per method, named after it; no per-method journal beside it
    assert [p.name for p in told_sweep.glob("optuna*.journal")] == ["optuna.journal"]
    storage = study_storage(paths)
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(storage)) == ["baseline", "kd"]
    told = {}
    for method in ("baseline", "kd"):
        study = optuna.load_study(study_name=method, storage=storage)
        told |= {t.user_attrs["kdarena.trial_key"]: (method, t) for t in study.trials}
    assert told.keys() == trials.keys()
    for key, record in trials.items():
        method, trial = told[key]
        assert method == record["method"]
        assert trial.state == EXPECTED_STATE[record["status"]], (key, record["status"], trial.state)
        # every epoch it ran, at step = epoch, with its val_acc; none for the report that it diverged
        assert trial.intermediate_values == {h["epoch"]: h["metrics"]["val_acc"] for h in record["history"]}, key
        if record["status"] == "completed":
            assert trial.values == [record["metrics"]["val_acc"]] and len(record["history"]) == 3
        elif record["status"] == "early-stopped":  # Optuna's rule for a pruned trial: its last intermediate value
            assert 1 <= len(record["history"]) < 3 and trial.values == [record["history"][-1]["metrics"]["val_acc"]]
        else:
            assert trial.values is None
    # Optuna's best trial is kdarena's best full-budget one, not a pruned trial's early score
    baseline = optuna.load_study(study_name="baseline", storage=storage)
    assert baseline.best_trial.user_attrs["kdarena.trial_key"] == max(
        (r for r in trials.values() if r["status"] == "completed" and r["method"] == "baseline"),
        key=lambda r: r["metrics"]["val_acc"])["key"]


def test_optuna_dashboard_opened_once_on_the_sweep_shows_every_method_as_kdarena_does(told_sweep):
    """The README's command, `optuna-dashboard SWEEP_DIR/optuna.journal`, served on 127.0.0.1 and read over HTTP."""
    trials = SweepRecords(SweepPaths(told_sweep).records).trials
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), str(SweepPaths(told_sweep).studies),
                             "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api/studies"
    try:
        deadline = time.time() + 60
        while True:
            try:
                studies = json.load(urllib.request.urlopen(api, timeout=5))["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no answer"
                time.sleep(0.3)
        assert sorted(s["study_name"] for s in studies) == ["baseline", "kd"]
        shown = {}
        for summary in studies:
            for trial in json.load(urllib.request.urlopen(f"{api}/{summary['study_id']}", timeout=30))["trials"]:
                key = {a["key"]: a["value"] for a in trial["user_attrs"]}["kdarena.trial_key"]
                shown[key] = (summary["study_name"], trial["state"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    as_shown = {"completed": "Complete", "early-stopped": "Pruned", "diverged": "Fail", "failed": "Fail"}
    assert shown == {key: (r["method"], as_shown[r["status"]]) for key, r in trials.items()}


def _study(tmp_path: Path, objective: str | list[str]) -> MethodStudy:
    doc = {**TOLD, "objective": objective}
    sweep = parse_sweep(doc, "told.yaml")
    metric, mode = (objective, "max") if isinstance(objective, str) else (objective, ["max", "min"])
    return MethodStudy(DefineByRun("kd", method_space(sweep, "kd"), ({},)), metric=metric, mode=mode,
                       study_name="kd", storage=study_storage(SweepPaths(tmp_path)), seed=0)


def _epoch(epoch: int, val_acc: float, status: str = "running") -> dict:
    return {"epoch": epoch, "val_acc": val_acc, "macs": 1234.0, "status": status, "training_iteration": epoch + 5}


def test_failed_stopped_and_completed_trials_of_a_two_objective_study(tmp_path):
    """val_acc vs MACs: a completed trial has both values; a stopped one keeps its epochs, an errored one FAILs."""
    study = _study(tmp_path, ["val_acc", "macs"])
    for trial_id in ("done", "stopped", "errored", "refused"):
        assert study.suggest(trial_id)["method"] == "kd"
    for epoch, acc in ((1, 0.5), (2, 0.6), (3, 0.7)):
        study.on_trial_result("done", _epoch(epoch, acc, "completed" if epoch == 3 else "running"))
    study.on_trial_complete("done", _epoch(3, 0.7, "completed"))
    study.on_trial_result("stopped", _epoch(1, 0.3))
    study.on_trial_complete("stopped", _epoch(1, 0.3))
    study.on_trial_result("errored", _epoch(1, 0.4))
    study.on_trial_complete("errored", error=True)
    # refused untrained by a constraint: the trial reports `failed` with a stand-in val_acc of 0
    study.on_trial_result("refused", {**_epoch(1, 0.0, "failed"), "reason": "over constraints.max_macs"})
    study.on_trial_complete("refused", {**_epoch(1, 0.0, "failed"), "reason": "over constraints.max_macs"})

    trials = {t.user_attrs["kdarena.trial_key"]: t
              for t in optuna.load_study(study_name="kd", storage=study_storage(SweepPaths(tmp_path))).trials}
    assert trials["trial/done"].state == State.COMPLETE and trials["trial/done"].values == [0.7, 1234.0]
    assert trials["trial/done"].intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7}  # steps are epochs, not Ray's count
    assert trials["trial/stopped"].state == State.PRUNED and trials["trial/stopped"].intermediate_values == {1: 0.3}
    assert trials["trial/errored"].state == State.FAIL and trials["trial/errored"].values is None
    assert trials["trial/refused"].state == State.FAIL and trials["trial/refused"].intermediate_values == {}


def test_importances_rank_the_completed_trials_beside_pruned_and_failed_ones(tmp_path):
    """Optuna's importances (what optuna-dashboard shows) read a study holding pruned and failed trials."""
    study = _study(tmp_path, "val_acc")
    for n, (status, acc) in enumerate([("completed", 0.9), ("completed", 0.5), ("completed", 0.7),
                                       ("running", 0.2), ("diverged", 0.0)]):
        study.suggest(f"t{n}")
        study.on_trial_result(f"t{n}", _epoch(1, acc))
        study.on_trial_complete(f"t{n}", _epoch(2, acc, status))
    stored = optuna.load_study(study_name="kd", storage=study_storage(SweepPaths(tmp_path)))
    assert [t.state for t in stored.trials] == [State.COMPLETE] * 3 + [State.PRUNED, State.FAIL]
    importances = optuna.importance.get_param_importances(
        stored, evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=8, seed=0))
    assert set(importances) == {f"kd/{name}" for name in method_space(parse_sweep(TOLD, "told.yaml"), "kd")}
    assert abs(sum(importances.values()) - 1.0) < 1e-9


def test_a_re_run_epoch_replaces_its_value_and_a_replayed_end_changes_nothing(tmp_path):
    """A trial restored from an older checkpoint runs an epoch again; a resumed sweep replays a finished trial."""
    study = _study(tmp_path, "val_acc")
    study.suggest("t")
    study.on_trial_result("t", _epoch(1, 0.5))
    study.on_trial_result("t", _epoch(2, 0.6))
    study.on_trial_result("t", _epoch(2, 0.65))  # epoch 2 again, after a restore: the value records.json keeps
    study.on_trial_result("t", {**_epoch(3, 0.0, "diverged"), "reason": "non-finite loss"})  # a stand-in val_acc
    study.on_trial_complete("t", {**_epoch(3, 0.0, "diverged"), "reason": "non-finite loss"})

    # the searcher Ray saved before the trial ended, restored by a resume, is told the same end again
    replay = _study(tmp_path, "val_acc")
    replay._ot_trials["t"] = study._ot_trials["t"]
    replay.on_trial_result("t", _epoch(2, 0.65))
    replay.on_trial_complete("t", {**_epoch(3, 0.0, "diverged"), "reason": "non-finite loss"})

    [trial] = optuna.load_study(study_name="kd", storage=study_storage(SweepPaths(tmp_path))).trials
    assert trial.state == State.FAIL and trial.intermediate_values == {1: 0.5, 2: 0.65}


def test_resuming_a_sweep_with_per_method_journals_is_refused_with_what_to_do(tmp_path, monkeypatch):
    """A sweep folder an older kdarena left (one journal per method) is refused before any work, exit 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "kdarena-sweeps" / "told"
    root.mkdir(parents=True)
    (root / "records.json").write_text('{"parent_run_id": null, "trials": {}}')
    (root / "sweep.yaml").write_text(yaml.safe_dump(parse_sweep(TOLD, "told.yaml").model_dump(mode="json")))
    for method in ("baseline", "kd"):
        (root / f"optuna-{method}.journal").write_text("")
    before = {p: p.read_bytes() for p in root.iterdir()}
    (tmp_path / "told.yaml").write_text(yaml.safe_dump(TOLD))
    result = CliRunner().invoke(app, ["sweep", "told.yaml", "--resume"])
    assert result.exit_code == 2, result.output
    assert "optuna-baseline.journal, optuna-kd.journal" in result.stderr and "another name" in result.stderr
    assert "Traceback" not in result.output
    assert {p: p.read_bytes() for p in root.iterdir() if p.name != "driver.lock"} == before
