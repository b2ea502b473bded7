"""`kdarena recommend` on a real sweep's MLflow store: three budget forms, no evidence, and a config that re-runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kdarena.cli.app import app
from kdarena.leaderboards.board import leaderboard
from kdarena.leaderboards.runs import load_runs

from conftest import SWEPT
from helpers import unboxed

COSTS = {"--max-macs": "macs", "--max-params": "params", "--max-latency-ms": "latency_ms"}


@pytest.fixture(scope="module")
def known(swept_store, tmp_path_factory) -> Path:
    """The store a real sweep wrote (final runs on two seeds), plus `kdarena train` runs of a smaller student."""
    work = tmp_path_factory.mktemp("recommend")
    shutil.copy(swept_store["work"] / "mlflow.db", work / "mlflow.db")
    for method in ("baseline", "kd"):
        (work / f"{method}.yaml").write_text(yaml.safe_dump({
            "teacher": SWEPT["teacher"], "student": {"arch": "cnn", "options": {"channels": 2}},
            "method": {"name": method}, "train": {"epochs": 3}, "cache_dir": str(swept_store["work"] / "cache")}))
        result = CliRunner().invoke(app, ["train", str(work / f"{method}.yaml"), "--json",
                                          "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return work


@pytest.fixture()
def store(known, swept_store, tmp_path, monkeypatch) -> str:
    shutil.copy(known / "mlflow.db", tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDARENA_CACHE", str(swept_store["work"] / "cache"))  # the sweep's teacher, found by hash
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _recommend(uri: str, *args: str):
    return CliRunner().invoke(app, ["recommend", "--tracking-uri", uri, *args])


@pytest.mark.parametrize("option", list(COSTS))
def test_the_best_within_each_budget_form_is_the_leaderboards_best_under_it(store, option):
    column = COSTS[option]
    board = leaderboard(load_runs(store), dataset="digits", by=column)
    costs = sorted(board[column].dropna().unique())
    assert len(costs) >= 2  # two students: one budget admits only the smaller
    limit = (costs[0] + costs[1]) / 2 if column != "latency_ms" else float(board[column].max()) + 1.0
    result = _recommend(store, "--dataset", "digits", option, str(limit), "--format", "json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    within = board[board[column] <= limit]
    entries = [answer["recommendation"], *answer["runner_ups"]]
    assert all(e[column] <= limit for e in entries)
    assert [(e["student"], e["method"]) for e in entries] == list(zip(within["student"], within["method"]))[:len(entries)]
    best = answer["recommendation"]
    assert best["run_id"] == within.iloc[0]["run_id"] and best["n_seeds"] == int(within.iloc[0]["n_seeds"])
    # ranks count within the budget, ties shared as on the leaderboard
    assert [e["rank"] for e in entries] == [1 + list(within["rank"]).index(r) for r in within["rank"][:len(entries)]]
    if best["method"] != "baseline":  # how far from the same student trained alone on this pair
        row = within.iloc[0]
        alone = within[(within["method"] == "baseline") & (within["student"] == best["student"])].iloc[0]
        versus = best["vs_student_alone"]
        assert versus["student_alone_test_acc"] == pytest.approx(alone["test_acc_mean"])
        expected = row["vs_student_diff"] if row["vs_student_n"] else row["test_acc_mean"] - alone["test_acc_mean"]
        assert versus["difference"] == pytest.approx(expected)

    table = _recommend(store, "--dataset", "digits", option, str(limit))
    assert table.exit_code == 0 and best["student"] in table.stdout and "runner-ups" in table.stdout


def test_no_evidence_for_the_dataset_or_the_budget_says_so_and_prints_the_sweep_to_run(store):
    result = _recommend(store, "--dataset", "cifar100")
    assert result.exit_code == 1
    assert "no finished full-budget run on dataset 'cifar100'" in result.output
    doc = yaml.safe_load(result.output.split("---\n", 1)[1])
    assert doc["dataset"] == {"name": "cifar100"} and "kd" in doc["methods"]
    assert "kdarena sweep gather-cifar100.yaml" in result.output

    result = _recommend(store, "--dataset", "digits", "--max-macs", "10")
    assert result.exit_code == 1
    assert "no student within max-macs 10" in result.output and "cnn(channels=2)" in result.output
    doc = yaml.safe_load(result.output.split("---\n", 1)[1])
    assert doc["constraints"] == {"max_macs": 10.0}


@pytest.mark.parametrize("args, message", [
    (["--max-macs", "1e6", "--max-params", "10"], "give one budget, not 2"),
    (["--max-params", "-3"], "a budget is a positive number"),
    (["--format", "xml"], "'xml' is not one of 'table', 'json'"),
])
def test_bad_input_is_exit_2_with_one_message(store, args, message):
    result = _recommend(store, "--dataset", "digits", *args)
    assert result.exit_code == 2 and message in unboxed(result.output)


def test_the_written_config_re_runs_with_kdarena_train(store, tmp_path):
    out = tmp_path / "best.yaml"
    result = _recommend(store, "--dataset", "digits", "--format", "json", "-o", str(out))
    assert result.exit_code == 0, result.output
    best = json.loads(result.stdout)["recommendation"]
    source = MlflowClient(store).get_run(best["run_id"])
    train = CliRunner().invoke(app, ["train", str(out), "--json", "--tracking-uri", store], catch_exceptions=False)
    assert train.exit_code == 0, train.output
    summary = json.loads(train.stdout)
    # the same config on the same seed: the same student, the same test accuracy
    assert summary["test_acc"] == pytest.approx(source.data.metrics["test_acc"], abs=1e-9)
    assert not summary["teacher_trained_now"]


def test_a_folder_for_o_is_refused_and_nothing_is_written(store, tmp_path: Path):
    result = _recommend(store, "--dataset", "digits", "-o", str(tmp_path))
    assert result.exit_code == 2 and "a folder" in result.output
