"""`kdarena sweep` / `kdarena export` with a real local Ray (2 CPUs), real Optuna and a real MLflow sqlite store."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from helpers import shared_ray

from kdarena.cli.app import app
from kdarena.search.export import pareto_front

SMALL = {
    "name": "small",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 3}},
    "students": [{"arch": "cnn", "options": {"channels": 4}}],
    "methods": {"baseline": {}, "kd": {"space": {"temperature": [2, 8]}}},
    "budget": {"trials_per_method": 3, "epochs": 4, "grace_period": 1, "reduction_factor": 2},
    "final": {"seeds": 2},
}


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _records(root: Path) -> dict:
    return json.loads((root / "records.json").read_text())


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """One real sweep shared by the tests that read its results."""
    shared_ray()
    work = tmp_path_factory.mktemp("sweep")
    old = Path.cwd()
    os.chdir(work)
    env = {"KDARENA_CACHE": str(work / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = CliRunner().invoke(app, ["sweep", str(_write(work / "small.yaml", SMALL))], catch_exceptions=False)
    finally:
        os.chdir(old)
    yield work, result
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_sweep_completes_every_trial_and_stops_some_early(small_sweep):
    work, result = small_sweep
    assert result.exit_code == 0, result.output
    records = _records(work / "kdarena-sweeps" / "small")
    trials = [r for r in records["trials"].values() if r["phase"] == "trial"]
    assert len(trials) == 6
    assert sorted(r["method"] for r in trials) == ["baseline"] * 3 + ["kd"] * 3
    statuses = [r["status"] for r in trials]
    assert set(statuses) <= {"completed", "early-stopped"}
    assert "early-stopped" in statuses  # ASHA stopped at least one
    for r in trials:
        if r["status"] == "completed":
            assert r["metrics"]["epochs_completed"] == 4 and "test_acc" in r["metrics"]
        else:
            assert r["metrics"]["epochs_completed"] < 4 and "test_acc" not in r["metrics"]
        if r["method"] == "kd":
            assert 2 <= r["config"]["method"]["params"]["temperature"] <= 8  # the narrowed space
    assert "best full-budget trial per method" in result.stdout


def test_the_driver_stores_the_teachers_logits_once_along_the_trials_path(small_sweep):
    """kd on digits, no augmentation: the driver computed the teacher's logits once and stored them, along the path a
    trial's fit computes them (so each trial takes the ones handed through Ray's object store)."""
    from dataclasses import asdict

    import torch

    from kdarena.methods.engine import logit_path
    from kdarena.methods.execution import Execution
    from kdarena.search.sweep_config import parse_sweep, trial_config

    work, _ = small_sweep
    (logits,) = (work / "cache" / "teachers" / "logits").glob("*.pt")
    trial = trial_config(parse_sweep(SMALL, "small"), "kd", 0, {}, {})
    assert json.loads(logits.with_suffix(".json").read_text())["path"] == asdict(
        logit_path(trial.train, Execution.default(torch.device("cpu"))))


def test_mlflow_has_parent_and_one_child_per_trial_with_prefixed_params(small_sweep):
    work, _ = small_sweep
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdarena")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("kdarena.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in children if r.data.tags["kdarena.role"] == "trial"]
    finals = [r for r in children if r.data.tags["kdarena.role"] == "final"]
    assert len(trials) == 6 and len(finals) == 4
    assert parent.info.status == "FINISHED" and "kdarena.teacher_sha256" in parent.data.tags
    for run in trials:
        assert run.info.status == "FINISHED"
        method = run.data.tags["kdarena.method"]
        assert run.data.params["method.name"] == method
        assert f"{method}/lr" in run.data.params and f"{method}/weight_decay" in run.data.params
        if method == "kd":
            assert "kd/temperature" in run.data.params and "kd/alpha" in run.data.params
        history = client.get_metric_history(run.info.run_id, "val_acc")
        steps = [m.step for m in history]
        assert steps == sorted(set(steps)) and steps[0] == 1  # one value per epoch, none twice
        # per epoch too: train_acc and the learning rate, one value each, on the same steps as val_acc
        train_acc = client.get_metric_history(run.info.run_id, "train_acc")
        lrs = client.get_metric_history(run.info.run_id, "lr")
        assert [m.step for m in train_acc] == steps and [m.step for m in lrs] == steps
        assert all(0.0 <= m.value <= 1.0 for m in train_acc)
        # the rate the cosine schedule (no warm-up) sets at the end of each epoch, from the trial's own lr
        peak, epochs = float(run.data.params["train.lr"]), int(run.data.params["train.epochs"])
        assert [m.value for m in lrs] == pytest.approx(
            [peak * 0.5 * (1 + math.cos(math.pi * m.step / epochs)) for m in lrs], rel=1e-6, abs=1e-12)
        assert run.data.tags["kdarena.status"] in ("completed", "early-stopped")
        assert run.data.metrics["epochs_completed"] == len(steps)
    # the sweep file given is the parent run's artifact sweep.yaml
    assert "sweep.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    artifact = Path(client.download_artifacts(parent.info.run_id, "sweep.yaml", str(work / "parent-artifact")))
    assert yaml.safe_load(artifact.read_text()) == yaml.safe_load((work / "small.yaml").read_text()) == SMALL
    # the teacher was trained once, as its own run, before any trial
    assert sum(r.data.tags.get("kdarena.role") == "teacher" for r in runs) == 1
    # the best student's weights: in the parent run and in its own trial's run, loadable into its model
    best = client.get_run(parent.data.tags["kdarena.best_run_id"])
    for run_id in (parent.info.run_id, best.info.run_id):
        assert "student.pt" in {a.path for a in client.list_artifacts(run_id)}
    local = client.download_artifacts(parent.info.run_id, "student.pt", str(work))
    import torch
    from kdarena.zoo.models import build_model
    model = build_model("cnn", num_classes=10, in_channels=1, input_size=8, channels=4)
    model.load_state_dict(torch.load(local, weights_only=True))


def test_each_methods_best_student_has_its_card_and_deploys(small_sweep, monkeypatch):
    work, _ = small_sweep
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    records = _records(work / "kdarena-sweeps" / "small")
    for method, key in records["best"].items():
        record = records["trials"][key]
        card = json.loads(Path(client.download_artifacts(record["run_id"], "student.json", str(work / method)))
                          .read_text())
        assert card["student"]["arch"] == record["config"]["student"]["arch"] and card["method"]["name"] == method
        assert card["classes"]["count"] == 10 and card["input"]["channels"] == 1 and card["input"]["size"] == 8
        assert card["scores"]["test_acc"] == pytest.approx(record["metrics"]["test_acc"])
        # the teacher is named where the method learns from it, with the sweep's teacher's sha256
        teacher = records["teacher"]["sha256"] if method == "kd" else None
        assert (card["teacher"] or {}).get("sha256") == teacher
        assert card["config"]["method"]["params"] == record["config"]["method"]["params"]
    # the students the sweep finishes with — each best trial, each final run — are MLflow models too: the student
    # with its normalisation, taking raw pixels, as its weights and card rebuild it
    import mlflow
    import torch

    from kdarena.training.deploy import normalised, raw_pixels
    from kdarena.training.student_card import build_student, read_card

    finals = [r for r in records["trials"].values() if r["phase"] == "final" and r["status"] == "completed"]
    assert len(finals) == 4
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    for record in [*(records["trials"][key] for key in records["best"].values()), *finals]:
        names = {a.path for a in client.list_artifacts(record["run_id"])}
        assert {"student.pt", "student.json", "student-model"} <= names, names
    folder = work / "final-student"
    for name in ("student.pt", "student.json"):
        client.download_artifacts(finals[0]["run_id"], name, str(folder))
    card = read_card(folder / "student.json")
    x = raw_pixels(card, 3, seed=5)
    logged = mlflow.pytorch.load_model(f"runs:/{finals[0]['run_id']}/student-model")
    with torch.no_grad():
        assert torch.allclose(logged(x), normalised(build_student(card, folder / "student.pt"), card)(x), atol=1e-5)
    monkeypatch.chdir(work)
    best = records["trials"][records["best"]["kd"]]["run_id"]
    result = CliRunner().invoke(app, ["deploy", best, "--format", "exported-program", "-o", "best.pt2",
                                      "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_abs_diff"] <= 1e-4 and (work / "best.pt2").is_file()


def test_final_runs_repeat_each_best_config_on_seeds(small_sweep):
    work, _ = small_sweep
    records = _records(work / "kdarena-sweeps" / "small")
    finals = [r for r in records["trials"].values() if r["phase"] == "final"]
    assert sorted((r["method"], r["config"]["train"]["seed"]) for r in finals) == [
        ("baseline", 0), ("baseline", 1), ("kd", 0), ("kd", 1)]
    trials = {r["method"]: r for r in records["trials"].values() if r["phase"] == "trial" and r["status"] == "completed"
              and r["metrics"]["val_acc"] == max(x["metrics"]["val_acc"] for x in records["trials"].values()
                                                 if x["phase"] == "trial" and x["method"] == r["method"]
                                                 and x["status"] == "completed")}
    for r in finals:
        best = trials[r["method"]]
        assert r["config"]["method"] == best["config"]["method"]
        assert r["config"]["train"]["lr"] == best["config"]["train"]["lr"]
        if r["config"]["train"]["seed"] == 0:  # the trial's own seed reproduces the trial
            assert r["metrics"]["test_acc"] == pytest.approx(best["metrics"]["test_acc"], abs=1e-9)


def test_a_finished_sweep_run_again_without_resume_is_refused_and_changes_nothing(small_sweep, monkeypatch):
    work, first = small_sweep
    assert first.exit_code == 0, first.output
    monkeypatch.chdir(work)
    monkeypatch.setenv("KDARENA_CACHE", str(work / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    root = work / "kdarena-sweeps" / "small"
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")

    def store_state():
        runs = client.search_runs([client.get_experiment_by_name("kdarena").experiment_id], max_results=1000)
        return (sorted((r.info.run_id, r.info.status, len(r.data.metrics), len(r.data.params)) for r in runs),
                (root / "records.json").read_bytes())

    before = store_state()
    again = CliRunner().invoke(app, ["sweep", "small.yaml"])
    assert again.exit_code == 2, again.output
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith("error: ") and "--resume" in line and "'small'" in line
    assert store_state() == before  # no run, no metric, no record added or changed


def test_export_round_trip_reproduces_test_accuracy(small_sweep, monkeypatch):
    work, _ = small_sweep
    monkeypatch.chdir(work)
    monkeypatch.setenv("KDARENA_CACHE", str(work / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    out = CliRunner().invoke(app, ["export", "small.yaml", "--format", "json", "--top", "3"])
    assert out.exit_code == 0, out.output
    entries = json.loads(out.stdout)
    assert [e["rank"] for e in entries] == list(range(1, len(entries) + 1))
    # the leaderboard's "best": a trial re-run on final seeds stands on its finals' mean val_acc; the method's
    # other trials stand behind those finals
    standing, behind = entries[:2], entries[2:]
    assert [e["n_seeds"] for e in standing] == [2, 2]  # baseline's and kd's best, each on its 2 final seeds
    assert standing[0]["val_acc_mean"] >= standing[1]["val_acc_mean"]
    assert all(e["n_seeds"] == 1 and e["val_acc_mean"] == e["val_acc"] for e in behind)
    assert [e["val_acc"] for e in behind] == sorted((e["val_acc"] for e in behind), reverse=True)
    written = CliRunner().invoke(app, ["export", "kdarena-sweeps/small", "-o", "best.yaml"])
    assert written.exit_code == 0, written.output
    exported = yaml.safe_load((work / "best.yaml").read_text())
    assert exported["train"]["seed"] == 0 and len(exported["teacher"]["sha256"]) == 64
    rerun = CliRunner().invoke(app, ["train", "best.yaml", "--json"], catch_exceptions=False)
    assert rerun.exit_code == 0, rerun.output
    summary = json.loads(rerun.stdout)
    assert not summary["teacher_trained_now"]
    assert abs(summary["test_acc"] - entries[0]["test_acc"]) <= 1e-6


def test_multi_objective_width_search_exports_the_pareto_set(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    doc = SMALL | {"name": "front", "objective": ["val_acc", "macs"], "methods": {"kd": {}},
                   "students": [{"arch": "cnn", "options": {"channels": 4}, "search": {"width": [0.5, 3.0]}}],
                   "budget": {"trials_per_method": 5, "epochs": 2, "grace_period": 2}, "final": {"seeds": 0}}
    result = CliRunner().invoke(app, ["sweep", str(_write(tmp_path / "front.yaml", doc))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trials = list(_records(tmp_path / "kdarena-sweeps" / "front")["trials"].values())
    widths = {r["trial_config"]["student0"]["width"] for r in trials}
    assert len(widths) == 5 and all(0.5 <= w <= 3.0 for w in widths)
    out = CliRunner().invoke(app, ["export", "front", "--format", "json"])
    exported = json.loads(out.stdout)
    points = [(r["metrics"]["val_acc"], r["metrics"]["macs"]) for r in trials]
    brute = {points[i] for i in range(len(points))
             if not any(a >= points[i][0] and c <= points[i][1] and (a, c) != points[i] for a, c in points)}
    assert {(e["val_acc"], e["macs"]) for e in exported} == brute


def test_pareto_front_by_brute_force():
    points = [(0.9, 100), (0.8, 50), (0.85, 200), (0.95, 300), (0.8, 60)]
    assert sorted(pareto_front(points)) == [0, 1, 3]


def _run_cli(*args: str, cwd: Path, env: dict) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "kdarena"
    return subprocess.Popen([str(exe), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.mark.slow
def test_resume_after_the_driver_is_stopped_loses_nothing_and_duplicates_nothing(tmp_path):
    """Ctrl-C, a resume, then kill -9 (no chance to save anything), a resume: one sweep through both stops."""
    env = os.environ | {"KDARENA_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                        "OMP_NUM_THREADS": "1"}
    per_method, epochs = 3, 5
    doc = SMALL | {"name": "resumable", "budget": {"trials_per_method": per_method, "epochs": epochs, "grace_period": epochs},
                   "final": {"seeds": 0}}
    sweep_file = _write(tmp_path / "resumable.yaml", doc)
    root = tmp_path / "kdarena-sweeps" / "resumable"
    done_before: dict[str, str] = {}
    before: dict = {}
    for sig, finished, args in ((signal.SIGINT, 2, ()), (signal.SIGKILL, 4, ("--resume",))):
        proc = _run_cli("sweep", str(sweep_file), *args, cwd=tmp_path, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if (root / "records.json").exists():
                trials = _records(root)["trials"].values()
                if (sum(r["status"] == "completed" for r in trials) >= finished
                        and any(r["status"] == "running" for r in trials)):
                    break
            time.sleep(0.2)
        else:
            proc.kill()
            pytest.fail(f"the sweep never had {finished} finished trials and one running")
        os.kill(proc.pid, sig)  # Ctrl-C in the driver, or a kill -9 that gives it no chance to save anything
        _, stderr = proc.communicate(timeout=180)
        if sig == signal.SIGINT:
            assert proc.returncode == 130, stderr
            assert "--resume" in stderr
        else:
            assert proc.returncode == -signal.SIGKILL
        before = _records(root)["trials"]
        done = {k: r["run_id"] for k, r in before.items() if r["status"] == "completed"}
        assert {k: done.get(k) for k in done_before} == done_before  # finished trials kept through the stop
        done_before = done
        assert finished <= len(done_before) < 2 * per_method

    resumed = _run_cli("sweep", str(sweep_file), "--resume", cwd=tmp_path, env=env)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    after = _records(root)["trials"]
    assert len(after) == 2 * per_method and all(r["status"] == "completed" for r in after.values()), \
        [(k, r["status"], r.get("reason")) for k, r in after.items()]
    assert {k: after[k]["run_id"] for k in done_before} == done_before  # finished trials kept as they were
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdarena")
    children = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
                if r.data.tags.get("kdarena.role") == "trial"]
    assert sorted(r.info.run_id for r in children) == sorted(r["run_id"] for r in after.values()), (
        [(r.info.run_id, r.info.run_name, r.data.tags.get("kdarena.trial_key"), r.data.tags.get("kdarena.status"))
         for r in children], {k: (r["run_id"], r["status"]) for k, r in after.items()},
        _records(root).get("lost_trials"))
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == list(range(1, epochs + 1)), (run.info.run_name, steps)
    # the Optuna studies went on where they were: the same history, numbering continued, every trial complete
    import optuna

    from kdarena.search.phases import study_storage
    from kdarena.search.records import SweepPaths
    for method in ("baseline", "kd"):
        study = optuna.load_study(study_name=method, storage=study_storage(SweepPaths(root)))
        numbers = [t.number for t in study.trials]
        assert numbers == list(range(len(numbers)))
        assert [t.state for t in study.trials].count(optuna.trial.TrialState.COMPLETE) == per_method
        assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
        if method == "kd":  # the trials done before the stops are still in the study's history, values and all
            kept = {round(r["trial_config"]["kd"]["temperature"], 9) for k, r in before.items()
                    if k in done_before and r["method"] == "kd"}
            done = {round(t.params["kd/temperature"], 9) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
            assert kept <= done


BAD_SWEEPS = {
    "unknown method": ({"methods": {"magic": {}}}, "unknown method 'magic'"),
    "unknown param in space": ({"methods": {"kd": {"space": {"temprature": [1, 4]}}}}, "methods.kd.space.temprature"),
    "unknown param in fix": ({"methods": {"kd": {"fix": {"beta": 1}}}}, "methods.kd.fix.beta"),
    "inverted range": ({"methods": {"kd": {"space": {"temperature": [8, 2]}}}}, "empty or inverted range"),
    "empty range": ({"methods": {"kd": {"space": {"alpha": [0.5, 0.5]}}}}, "empty or inverted range"),
    "range outside valid values": ({"methods": {"kd": {"space": {"alpha": [0.5, 2.0]}}}}, "methods.kd.space.alpha"),
    "empty choices": ({"methods": {"kd": {}, "baseline": {"space": {"lr": []}}}}, "methods.baseline.space.lr"),
    "too many cpus": ({"resources": {"cpu": 64}}, "the Ray cluster has 2 CPUs"),
    "gpu on a cpu cluster": ({"resources": {"gpu": 1}}, "resources.gpu"),
    "no workers": ({"resources": {"workers": 0}}, "resources.workers"),
    "a fraction of a worker": ({"resources": {"workers": 1.5}}, "resources.workers"),
    "workers beyond the cluster": ({"resources": {"cpu": 1, "workers": 3}},
                                   "3 per trial (3 workers × 1) but the Ray cluster has 2 CPUs"),
    "a batch smaller than the workers": ({"train": {"batch_size": 1}, "resources": {"workers": 2}},
                                         "train.batch_size (1) is below resources.workers (2)"),
    "crd data-parallel": ({"methods": {"crd": {}}, "resources": {"workers": 2}},
                          "method crd cannot train data-parallel"),
    "bad name": ({"name": "../escape"}, "name:"),
    "grace beyond budget": ({"budget": {"epochs": 2, "grace_period": 5}}, "grace_period"),
    "bad student search": ({"students": [{"arch": "cnn", "search": {"width": [2, 1]}}]}, "empty or inverted"),
}


@pytest.mark.parametrize("case", list(BAD_SWEEPS))
def test_bad_sweep_exits_2_before_any_trial(case, local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    patch, expected = BAD_SWEEPS[case]
    result = CliRunner().invoke(app, ["sweep", str(_write(tmp_path / "bad.yaml", SMALL | patch))])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert not (tmp_path / "kdarena-sweeps" / "small" / "ray").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_address_tracking_and_resume_mistakes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    path = str(_write(tmp_path / "s.yaml", SMALL))
    if ray.is_initialized():
        ray.shutdown()
    r = CliRunner().invoke(app, ["sweep", path, "--address", "127.0.0.1:1", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert r.exit_code == 2 and "unreachable" in r.stderr and "ray start --head" in r.stderr
    r = CliRunner().invoke(app, ["sweep", path, "--tracking-uri", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "tracking server" in r.stderr
    r = CliRunner().invoke(app, ["sweep", path, "--resume", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert r.exit_code == 2 and "nothing to resume" in r.stderr
    r = CliRunner().invoke(app, ["sweep", "--preset", "nope"])
    assert r.exit_code == 2 and "quickstart" in r.stderr
    r = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no sweep results" in r.stderr


SHAPES = {"digits": (1, 8, 10), "mnist": (1, 28, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100)}


@pytest.mark.parametrize("preset", __import__("kdarena.sweeps", fromlist=["presets"]).presets())
def test_shipped_sweeps_validate_and_every_method_fits_every_pair(preset):
    import torch

    from kdarena.search.sweep import check_pairs
    from kdarena.search.sweep_config import load_sweep
    from kdarena.sweeps import preset_path
    from kdarena.zoo.data import Dataset, Split

    sweep, _ = load_sweep(preset_path(preset))
    c, size, classes = SHAPES[sweep.dataset.name]
    # the pair check needs only the data's shape
    split = Split(torch.zeros(2, c, size, size, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    check_pairs(sweep, Dataset(sweep.dataset.name, split, split, split, classes, mean=(0.5,) * c, std=(0.25,) * c))


@pytest.mark.slow
def test_quickstart_preset_runs_every_method(tmp_path):
    env = os.environ | {"KDARENA_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([str(Path(sys.executable).parent / "kdarena"), "sweep", "--preset", "quickstart"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = _records(tmp_path / "kdarena-sweeps" / "quickstart")
    from collections import Counter
    per_method = Counter(r["method"] for r in records["trials"].values())
    assert per_method == dict.fromkeys(["baseline", "kd", "dkd", "dist", "fitnets", "at", "rkd", "crd"], 6)
    assert all(r["status"] in ("completed", "early-stopped", "diverged") for r in records["trials"].values())
    assert "kdarena export" in proc.stdout


def test_a_damaged_records_file_is_one_clear_error_and_rebuilds_from_mlflow_and_ray(small_sweep, tmp_path, monkeypatch):
    """records.json cut short: export, sync and --resume exit 2 naming the fix; --rebuild-records restores it from
    MLflow and Ray's files with every trial's own run, and nothing is duplicated."""
    work, _ = small_sweep
    for name in ("mlflow.db", "small.yaml"):
        shutil.copy(work / name, tmp_path / name)
    shutil.copytree(work / "kdarena-sweeps", tmp_path / "kdarena-sweeps")
    shutil.copytree(work / "cache", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "kdarena-sweeps" / "small"
    original = _records(root)
    text = (root / "records.json").read_text()
    (root / "records.json").write_text(text[: len(text) // 2])  # a save cut short

    def runs() -> list[str]:
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        return sorted(r.info.run_id for r in client.search_runs([client.get_experiment_by_name("kdarena").experiment_id],
                                                                max_results=1000))

    before = runs()
    for args in (["export", "small"], ["sync", "small"], ["sweep", "small.yaml", "--resume"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "records.json is damaged" in result.stderr and "--rebuild-records" in result.stderr, args
        assert "Traceback" not in result.output
    assert runs() == before

    result = CliRunner().invoke(app, ["sweep", "small.yaml", "--resume", "--rebuild-records"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"rebuilt {root / 'records.json'}: 10 trials (10 with their MLflow runs, 0 only in Ray's files)" in result.stderr
    rebuilt = _records(root)
    assert {k: r["run_id"] for k, r in rebuilt["trials"].items()} == {k: r["run_id"] for k, r in original["trials"].items()}
    assert {k: r["status"] for k, r in rebuilt["trials"].items()} == {k: r["status"] for k, r in original["trials"].items()}
    for key, record in original["trials"].items():
        assert [h["epoch"] for h in rebuilt["trials"][key]["history"]] == [h["epoch"] for h in record["history"]]
        assert rebuilt["trials"][key]["metrics"].get("test_acc") == record["metrics"].get("test_acc")
    assert rebuilt["parent_run_id"] == original["parent_run_id"]
    assert runs() == before, "no run created twice"
    assert list(root.glob("records.json.damaged-*"))
    assert CliRunner().invoke(app, ["export", "small"]).exit_code == 0


@pytest.mark.slow
def test_every_registered_method_completes_a_trial_and_ranks(local_ray, tmp_path, monkeypatch):
    """sweeps/all-methods.yaml, on a smaller budget: each of the methods trains through a real sweep to a completed
    trial, and the leaderboard and the dashboard show every one of them."""
    from streamlit.testing.v1 import AppTest

    import kdarena.dashboard
    from kdarena.methods import METHODS
    from kdarena.sweeps import preset_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    doc = yaml.safe_load(preset_path("all-methods").read_text())
    assert set(doc["methods"]) == set(METHODS)
    doc |= {"teacher": doc["teacher"] | {"recipe": {"epochs": 3}},
            "budget": doc["budget"] | {"trials_per_method": 1, "epochs": 2}}
    result = CliRunner().invoke(app, ["sweep", str(_write(tmp_path / "all.yaml", doc))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trials = _records(tmp_path / "kdarena-sweeps" / "all-methods")["trials"].values()
    assert {r["method"]: r["status"] for r in trials} == dict.fromkeys(METHODS, "completed")

    board = CliRunner().invoke(app, ["leaderboard", "--format", "json", "--no-references"], catch_exceptions=False)
    assert sorted(r["method"] for r in json.loads(board.stdout)) == sorted(METHODS)
    monkeypatch.setenv("KDARENA_TRACKING_URI", uri)
    at = AppTest.from_file(str(Path(kdarena.dashboard.__file__).with_name("app.py")), default_timeout=120).run()
    assert not at.exception
    [table] = [df for df in at.dataframe if "method" in df.value.columns]
    assert sorted(table.value["method"]) == sorted(METHODS)


@pytest.mark.gpu
def test_trials_holding_half_a_gpu_each_share_one_gpu_at_once(tmp_path):
    """`resources.gpu: 0.5`: Ray Tune runs two trials at once on one GPU, each training on it to the end."""
    doc = {"name": "halves", "dataset": {"name": "digits"},
           "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 1}},
           "students": [{"arch": "cnn", "options": {"channels": 8}}], "methods": {"kd": {}},
           "budget": {"trials_per_method": 2, "epochs": 4, "early_stopping": False},
           "resources": {"cpu": 1, "gpu": 0.5}, "final": {"seeds": 0}}
    env = os.environ | {"KDARENA_CACHE": str(tmp_path / "cache"),
                        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([str(Path(sys.executable).parent / "kdarena"), "sweep", str(_write(tmp_path / "h.yaml", doc)),
                           "--max-concurrent", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = list(_records(tmp_path / "kdarena-sweeps" / "halves")["trials"].values())
    assert [r["status"] for r in trials] == ["completed", "completed"]
    (a_start, a_end), (b_start, b_end) = [(r["started"] * 1000, r["history"][-1]["ts_ms"]) for r in trials]
    assert a_start < b_end and b_start < a_end  # the two ran at the same time: half a GPU each
