"""Warm starts: a sweep of a pair the store already knows starts from its best configs (real Ray, MLflow, Optuna)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

import kdarena.dashboard

from kdarena.cli.app import app
from kdarena.leaderboards.runs import load_runs
from kdarena.search.sweep_config import parse_sweep
from kdarena.search.warm_start import point_of_run, warm_points
from kdarena.training.record import Param, Tag

from conftest import SWEPT
from helpers import shared_ray

APP = str(Path(kdarena.dashboard.__file__).with_name("app.py"))
SECOND = {**SWEPT, "name": "second", "methods": {"baseline": {}, "kd": {"space": {"temperature": [2, 3]}}},
          "budget": {"trials_per_method": 3, "epochs": 3, "early_stopping": False}, "final": {"seeds": 0}}


@pytest.fixture()
def known_store(swept_store, tmp_path, monkeypatch):
    """A private copy of the store a real sweep ("swept") wrote, and its teacher cache."""
    shutil.copy(swept_store["work"] / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(swept_store["work"] / "cache", tmp_path / "cache")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def _sweep(tmp_path: Path, doc: dict) -> CliRunner:
    (tmp_path / f"{doc['name']}.yaml").write_text(yaml.safe_dump(doc))
    shared_ray()
    return CliRunner().invoke(app, ["sweep", f"{doc['name']}.yaml"], catch_exceptions=False)


def _runs_of(uri: str, sweep: str | None) -> list:
    """A sweep's trial runs, or (None) every student run: trials, finals and `kdarena train` runs."""
    client = MlflowClient(uri)
    where = f"tags.`{Tag.SWEEP}` = '{sweep}' and tags.`kdarena.role` = 'trial'" if sweep else "tags.`kdarena.role` != 'sweep'"
    return client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string=where)


def test_a_second_sweep_of_a_known_pair_starts_from_its_best_configs(known_store, tmp_path):
    result = _sweep(tmp_path, SECOND)
    assert result.exit_code == 0, result.output
    assert "warm-started from the same teacher and student" in result.output

    client = MlflowClient(known_store)
    students = {f"cnn(channels={s['options']['channels']})" for s in SECOND["students"]}
    earlier = [r for r in _runs_of(known_store, None) if r.data.tags.get(Tag.STATUS) == "completed"
               and r.data.tags.get(Tag.SWEEP) != "second" and r.data.tags.get(Tag.STUDENT_LABEL) in students
               and "val_acc" in r.data.metrics]
    warm = [r for r in _runs_of(known_store, "second") if Tag.WARM_START in r.data.tags]
    # a third of each method's three trials: one per method, each naming the run it came from
    assert sorted(r.data.tags[Tag.METHOD] for r in warm) == ["baseline", "kd"]
    for run in warm:
        method = run.data.tags[Tag.METHOD]
        source_id = run.data.tags[Tag.WARM_START].rsplit("(", 1)[1].rstrip(")")
        source = client.get_run(source_id)
        assert source.data.tags[Tag.TEACHER_LABEL] == run.data.tags[Tag.TEACHER_LABEL]
        # the best completed run of the method on this teacher and student(s): a trial, final or train run
        best = max((r for r in earlier if r.data.tags[Tag.METHOD] == method), key=lambda r: r.data.metrics["val_acc"])
        assert source.data.metrics["val_acc"] == best.data.metrics["val_acc"]
        assert run.data.params[Param.LR] == source.data.params[Param.LR]
        assert run.data.params[Param.WEIGHT_DECAY] == source.data.params[Param.WEIGHT_DECAY]
        assert run.data.tags[Tag.STUDENT_LABEL] == source.data.tags[Tag.STUDENT_LABEL]
        if method == "kd":  # clipped into this sweep's narrower temperature range
            old = float(source.data.params[f"{Param.METHOD_PARAMS_PREFIX}temperature"])
            new = float(run.data.params[f"{Param.METHOD_PARAMS_PREFIX}temperature"])
            assert new == min(max(old, 2.0), 3.0)
    records = json.loads((tmp_path / "kdarena-sweeps" / "second" / "records.json").read_text())
    assert set(records["warm_start"]) == {"baseline", "kd"}
    # the other trials are the sampler's own
    assert len(_runs_of(known_store, "second")) == 6

    # the dashboard's Sweeps page says which trials were warm-started and from where
    os.environ["KDARENA_TRACKING_URI"] = known_store
    try:
        at = AppTest.from_file(APP, default_timeout=120).run()
        at.switch_page("views/sweeps.py").run()
        at.selectbox(key="sw_name").set_value("second").run()
    finally:
        os.environ.pop("KDARENA_TRACKING_URI")
    assert not at.exception and not at.error
    assert any("2 trial(s) warm-started" in c.value for c in at.caption)
    table = at.dataframe[0].value
    assert sorted(table["warm_start"].dropna()) == sorted(r.data.tags[Tag.WARM_START] for r in warm)


def test_warm_start_off_starts_cold(known_store, tmp_path):
    result = _sweep(tmp_path, {**SECOND, "name": "cold", "warm_start": "off", "methods": {"baseline": {}},
                               "budget": {"trials_per_method": 2, "epochs": 1}})
    assert result.exit_code == 0, result.output
    assert not any(Tag.WARM_START in r.data.tags for r in _runs_of(known_store, "cold"))


def test_evidence_is_matched_by_content_not_name(swept_store):
    runs = load_runs(swept_store["tracking_uri"])
    sweep = parse_sweep({**SECOND, "name": "x"}, "x.yaml")
    fingerprint = runs["dataset_fingerprint"].dropna().iloc[0]
    assert set(warm_points(sweep, runs, fingerprint, [1.0], quota=2)) == {"baseline", "kd"}
    # the same dataset name with other content: nothing carries over
    assert warm_points(sweep, runs, "0" * 64, [1.0], quota=2) == {}
    named = parse_sweep({**SECOND, "name": "x", "warm_start": ["swept"]}, "x.yaml")
    assert set(warm_points(named, runs, fingerprint, [1.0], quota=2)) == {"baseline", "kd"}


def test_points_are_clipped_to_the_sweep_space_and_never_take_a_missing_choice(swept_store):
    runs = load_runs(swept_store["tracking_uri"])
    kd = runs[(runs["method"] == "kd") & (runs["status"] == "completed")].iloc[0]
    narrow = parse_sweep({**SECOND, "name": "x", "methods": {"kd": {"space": {"temperature": [7.5, 8], "lr": [0.5, 1]},
                                                                   "fix": {"alpha": 0.5}}}}, "x.yaml")
    point = point_of_run(narrow, "kd", kd, student=1)
    assert point["kd/temperature"] == min(max(kd["hparams"]["temperature"], 7.5), 8.0)
    assert 0.5 <= point["kd/lr"] <= 1.0
    assert "kd/alpha" not in point  # fixed by this sweep: not searched, not enqueued
    assert point["student"] == 1
    assert all(math.isfinite(v) for k, v in point.items() if k != "student")


def test_a_misspelled_warm_start_sweep_is_refused_before_any_work(known_store, tmp_path):
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**SECOND, "name": "typo", "warm_start": ["swepd"]}))
    result = CliRunner().invoke(app, ["sweep", "typo.yaml"])
    assert result.exit_code == 2
    assert "warm_start names sweep 'swepd'" in result.output and "swept" in result.output
    assert not (tmp_path / "kdarena-sweeps" / "typo" / "records.json").exists()
    assert not os.path.exists(tmp_path / "kdarena-sweeps" / "typo" / "ray")
