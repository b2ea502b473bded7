"""`kdarena train` end to end: the JSON, the MLflow record, the teacher store, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import kdarena.cli
from kdarena.cli.app import app

FAST = ["--set", "teacher.recipe.epochs=2", "--set", "train.epochs=2"]


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *args], catch_exceptions=False)


def _write(tmp_path: Path, doc, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


def _runs(tmp_path: Path):
    if not (tmp_path / "mlflow.db").exists():
        return None, []
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exps = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in exps]) if exps else []


def _source_commit() -> str | None:
    """HEAD of the git checkout kdarena runs from; None when it is not run from one."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(kdarena.cli.__file__).resolve().parent,
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def test_train_kd_prints_json_and_records_everything(cache_env, tmp_path):
    commit_before = _source_commit()
    result = _train("--json", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("run_id", "method", "student", "teacher", "dataset", "val_acc", "test_acc", "params", "flops",
                "macs", "teacher_sha256", "latency_ms"):
        assert summary[key] is not None, key
    assert summary["method"] == "kd" and summary["dataset"] == "digits"
    assert summary["macs"] * 2 == summary["flops"]

    client, runs = _runs(tmp_path)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "kd"
    assert float(run.data.params["method.params.temperature"]) == 4.0
    assert run.data.params["teacher.arch"] == "cnn"
    for metric in ("test_acc", "params", "flops", "macs", "latency_ms", "teacher_val_acc", "teacher_test_acc",
                   "extra_params"):
        assert metric in run.data.metrics, metric
    assert run.data.metrics["test_acc"] == pytest.approx(summary["test_acc"])
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2]
    # per epoch also train_acc and the learning rate: the cosine schedule's rate at each epoch's end (0 at the last)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_acc")] == [1, 2]
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(run.info.run_id, "train_acc"))
    lrs = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in lrs] == [(1, pytest.approx(0.05 * 0.5)), (2, pytest.approx(0.0, abs=1e-12))]
    # the best epoch's val_acc, as the JSON says
    assert run.data.metrics["best_val_acc"] == pytest.approx(max(m.value for m in history))
    assert summary["best_val_acc"] == pytest.approx(run.data.metrics["best_val_acc"])
    # run from a git checkout: the commit of the source that trained it (HEAD before or after: others may commit)
    commits = {commit_before, _source_commit()} - {None}
    if commits:
        assert run.data.tags["kdarena.git_commit"] in commits
    else:  # not a checkout: no commit to name, and none made up
        assert "kdarena.git_commit" not in run.data.tags
    assert {"train_loss_ce", "train_loss_kd"} <= set(run.data.metrics)
    assert run.data.tags["kdarena.teacher_sha256"] == summary["teacher_sha256"]
    assert run.data.tags["kdarena.status"] == "completed"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"student.pt", "config.yaml"} <= artifacts
    # the artifact is a loadable state_dict of the deployed student
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="student.pt",
                                                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    state = torch.load(local, weights_only=True)
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == summary["params"]
    # the teacher was trained and recorded once, as its own run
    assert sum(r.data.tags.get("kdarena.role") == "teacher" for r in runs) == 1


def test_best_val_acc_is_the_best_epoch_not_the_last(migrated_store, tmp_path):
    # a constant rate of 2.0: on digits this run's val_acc peaks before its third epoch and falls back (~82 % → ~52 %)
    result = _train("--json", "--set", "method.name=baseline", "--set", "train.lr=2.0", "--set",
                    "train.schedule=constant", "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    client, _ = _runs(tmp_path)
    run = client.get_run(summary["run_id"])
    val = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)]
    assert len(val) == 3 and max(val) > val[-1], f"this run no longer peaks before its last epoch: {val}"
    assert run.data.metrics["best_val_acc"] == pytest.approx(max(val)) == summary["best_val_acc"]
    assert run.data.metrics["final_val_acc"] == pytest.approx(val[-1]) == summary["val_acc"]


def test_teacher_store_reuses_and_rejects_tampered_file(cache_env, tmp_path):
    first = json.loads(_train("--json", *FAST).stdout)
    # kd without augmentation: the teacher's logits on the training split are stored beside it
    (logits,) = (cache_env / "teachers" / "logits").glob("*.pt")
    written = logits.stat().st_mtime_ns
    second = json.loads(_train("--json", *FAST, "--set", "method.params.alpha=0.5").stdout)
    assert first["teacher_trained_now"] and not second["teacher_trained_now"]
    assert list((cache_env / "teachers" / "logits").glob("*.pt")) == [logits]
    assert logits.stat().st_mtime_ns == written  # read back by the second run, not computed again
    assert first["teacher_sha256"] == second["teacher_sha256"]
    _, runs = _runs(tmp_path)
    assert sum(r.data.tags.get("kdarena.role") == "teacher" for r in runs) == 1

    (weights,) = (cache_env / "teachers").glob("*.pt")
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 0xFF
    weights.write_bytes(bytes(blob))
    result = _train(*FAST)
    assert result.exit_code == 2
    assert "sha256" in result.stderr and "delete it to retrain" in result.stderr


def test_user_teacher_checkpoint_is_used_and_hashed(cache_env, tmp_path):
    from kdarena.zoo.models import build_model

    teacher = build_model("cnn", num_classes=10, in_channels=1, input_size=8, channels=32)
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    out = json.loads(_train("--json", *FAST, "--set", f"teacher.checkpoint={path}").stdout)
    import hashlib
    assert out["teacher_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not out["teacher_trained_now"]
    assert not (cache_env / "teachers").exists() or not list((cache_env / "teachers").glob("*.pt"))


def test_baseline_needs_no_teacher(cache_env):
    out = json.loads(_train("--json", "--set", "method.name=baseline", "--set", "train.epochs=2").stdout)
    assert out["teacher"] is None and out["teacher_sha256"] is None
    assert not (cache_env / "teachers").exists()


BAD_INPUTS = {
    "missing file": (None, "config file not found"),
    "malformed yaml": ("dataset: [digits\nmethod: kd\n", "malformed YAML at line"),
    "top level not a mapping": ("- a\n- b\n", "top level"),
    "unknown model": ({"student": {"arch": "resnet9000"}}, "known models:"),
    "model too large to build": ({"student": {"arch": "mlp", "options": {"hidden": [10000000, 10000000]}}},
                                 "cannot be built"),
    "unknown method": ({"method": {"name": "magic"}}, "known methods: baseline, kd"),
    "unknown dataset": ({"dataset": {"name": "imagenet22k"}}, "known datasets: digits"),
    "unknown field": ({"trian": {"epochs": 3}}, "trian: unknown field"),
    "unknown method param": ({"method": {"name": "kd", "params": {"temprature": 3}}}, "method.params.temprature"),
    "epochs zero": ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than 0"),
    "teacher epochs negative": ({"teacher": {"arch": "cnn", "recipe": {"epochs": -1}}}, "teacher.recipe.epochs"),
    "temperature zero": ({"method": {"name": "kd", "params": {"temperature": 0}}}, "method.params.temperature"),
    "alpha above one": ({"method": {"name": "kd", "params": {"alpha": 1.5}}}, "method.params.alpha"),
    "alpha wrong type": ({"method": {"name": "kd", "params": {"alpha": "high"}}}, "method.params.alpha"),
    "unknown model option": ({"student": {"arch": "cnn", "options": {"wings": 2}}}, "has no option 'wings'"),
    "option the dataset sets": ({"student": {"arch": "cnn", "options": {"num_classes": 5}}},
                                "option 'num_classes' comes from the dataset"),
    "dataset absent offline": ({"dataset": {"name": "mnist", "root": "EMPTY", "download": False}}, "train-images-idx3-ubyte"),
    "corrupt teacher checkpoint": ({"teacher": {"arch": "cnn", "checkpoint": "GARBAGE"}}, "not a loadable weights file"),
    "missing teacher checkpoint": ({"teacher": {"arch": "cnn", "checkpoint": "NOPE.pt"}}, "file not found"),
    "mismatched teacher checkpoint": ({"teacher": {"arch": "cnn", "options": {"channels": 4}, "checkpoint": "MISMATCH"}},
                                      "its keys do not fit SmallCNN"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_clear_message(case, cache_env, tmp_path):
    doc, expected = BAD_INPUTS[case]
    if doc is None:
        path = str(tmp_path / "nope.yaml")
    else:
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
        (tmp_path / "EMPTY").mkdir()
        (tmp_path / "GARBAGE").write_bytes(b"\x80\x04not a checkpoint at all")
        from kdarena.zoo.models import build_model
        torch.save(build_model("cnn", num_classes=10, in_channels=1, input_size=8, channels=32).state_dict(),
                   tmp_path / "MISMATCH")
        text = text.replace("EMPTY", str(tmp_path / "EMPTY")).replace("GARBAGE", str(tmp_path / "GARBAGE"))
        text = text.replace("MISMATCH", str(tmp_path / "MISMATCH"))
        path = _write(tmp_path, text)
    result = _train(path)  # bad input never gets as far as training
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) <= 3  # one message (rich may wrap a long line)
    client, runs = _runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert not list(cache_env.rglob("*.partial"))


@pytest.mark.parametrize("method", ["baseline", "kd"])
def test_the_run_goes_to_the_tracking_uri_given(method, migrated_store, tmp_path):
    """--tracking-uri over $MLFLOW_TRACKING_URI, with or without a teacher to resolve (baseline has none)."""
    other = tmp_path / "other" / "mlflow.db"
    other.parent.mkdir()
    result = _train("--json", "--set", f"method.name={method}", "--tracking-uri", f"sqlite:///{other}", *FAST)
    assert result.exit_code == 0, result.output
    run = MlflowClient(f"sqlite:///{other}").get_run(json.loads(result.stdout)["run_id"])
    assert run.data.tags["kdarena.role"] == "train" and run.data.tags["kdarena.method"] == method
    assert (other.parent / "mlartifacts").is_dir()  # its artifacts beside that store
    _, runs = _runs(tmp_path)  # $MLFLOW_TRACKING_URI's store got nothing
    assert runs == [] and not (tmp_path / "mlartifacts").exists()


def test_bad_set_override_and_unreachable_tracking_server(cache_env):
    result = _train("--set", "train.epochs")
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.stderr
    result = _train("--tracking-uri", "http://127.0.0.1:9", *FAST)
    assert result.exit_code == 2 and "unreachable" in result.stderr


def test_console_script_exit_code_and_json(migrated_store, tmp_path):
    """The installed script, as a shell or a CI job sees it: exit 0 and one JSON object on stdout, nothing else;
    a bad input is exit 2, one line on stderr, nothing on stdout."""
    exe = Path(sys.executable).parent / "kdarena"
    good = subprocess.run([str(exe), "train", "--json", "--set", "method.name=baseline", "--set", "train.epochs=1"],
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr[-3000:]
    assert good.stdout.endswith("\n") and good.stdout.count("\n") == 1  # one line: the object, nothing before or after
    summary = json.loads(good.stdout)
    assert summary["status"] == "completed" and summary["method"] == "baseline" and 0 < summary["test_acc"] <= 1
    client, _ = _runs(tmp_path)
    assert client.get_run(summary["run_id"]).data.tags["kdarena.status"] == "completed"
    bad = subprocess.run([str(exe), "train", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("error: ") and "config file not found" in line and "missing.yaml" in line


# a learning rate of 1e4 makes the first step's loss NaN: the run ends `diverged` in its first epoch
DIVERGING = ["--set", "method.name=baseline", "--set", "train.lr=1e4", "--set", "train.epochs=3"]


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "table"])
def test_a_diverged_run_exits_1_with_or_without_json(as_json, migrated_store, tmp_path):
    result = _train(*(["--json"] if as_json else []), *DIVERGING)
    assert result.exit_code == 1, result.output
    if as_json:  # the JSON is still printed, and it is all stdout holds
        summary = json.loads(result.stdout)
        assert summary["status"] == "diverged" and "non-finite" in summary["reason"]
        assert summary["test_acc"] is None and summary["val_acc"] is None
        run_id = summary["run_id"]
    else:
        assert "diverged" in result.stdout and "non-finite" in result.stdout
        client, runs = _runs(tmp_path)
        (run,) = [r for r in runs if r.data.tags.get("kdarena.role") != "teacher"]
        run_id = run.info.run_id
    client, _ = _runs(tmp_path)
    run = client.get_run(run_id)
    assert run.data.tags["kdarena.status"] == "diverged" and run.info.status == "FAILED"


def test_models_and_methods_listings(cache_env):
    models = json.loads(CliRunner().invoke(app, ["models", "--json"]).stdout)
    by_name = {m["name"]: m for m in models}
    assert by_name["resnet20"]["params"] == pytest.approx(278_324, rel=0.02)
    methods = json.loads(CliRunner().invoke(app, ["methods", "--json"]).stdout)
    kd = next(m for m in methods if m["name"] == "kd")
    assert kd["defaults"] == {"temperature": 4.0, "alpha": 0.9, "logit_std": False}
    assert kd["space"]["temperature"] == {"type": "float", "low": 1.0, "high": 20.0, "log": True}
    assert "lr" in kd["space"] and "weight_decay" in kd["space"]
    # every registered method, each with the reference it follows
    from kdarena.methods import METHODS
    assert [m["name"] for m in methods] == list(METHODS) and len(methods) >= 24
    assert "Hinton" in kd["reference"]
    assert all(m["reference"] == METHODS[m["name"]].reference and m["reference"] for m in methods)
    table = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "300"}).stdout
    assert "DKD" in table or "Decoupled" in table
