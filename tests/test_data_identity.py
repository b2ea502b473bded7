"""Data that kdarena tells apart: a dataset is its content, not its name.

Two image folders with the same layout and class count are two datasets:
each trains its own teacher, whose stored accuracies are its own data's; the
leaderboard and the dashboard rank them apart; changed files are new data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from kdarena.cli.app import app
from kdarena.training.config import DatasetConfig, TeacherConfig
from kdarena.training.teacher_store import teacher_key
from kdarena.zoo.data import load_dataset

PER_CLASS = {"train": 24, "test": 8}


def make_tree(root: Path, classes: list[str], seed: int, bright: str) -> Path:
    """train/<class>/*.png and test/<class>/*.png, 8×8 RGB: class 0 bright on one side, class 1 on the other.

    PNGs are written uncompressed, so a file rewritten with other pixels keeps its size.
    """
    rng = np.random.default_rng(seed)
    for split, n in PER_CLASS.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 90, (8, 8, 3), dtype=np.uint8)
                half = slice(0, 4) if c == 0 else slice(4, 8)
                if bright == "rows":
                    img[half, :, :] += 150
                else:
                    img[:, half, :] += 150
                Image.fromarray(img).save(folder / f"{i:03d}.png", compress_level=0)
    return root


@pytest.fixture()
def two_folders(tmp_path: Path) -> tuple[Path, Path]:
    a = make_tree(tmp_path / "A", ["airplane", "automobile"], seed=1, bright="rows")
    b = make_tree(tmp_path / "B", ["bird", "cat"], seed=2, bright="cols")
    return a, b


def _config(tmp_path: Path, root: Path, name: str, **dataset) -> str:
    doc = {"dataset": {"name": "imagefolder", "root": str(root), **dataset},
           "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 2}},
           "student": {"arch": "cnn", "options": {"channels": 8}},
           "method": {"name": "kd"}, "train": {"epochs": 1, "batch_size": 32}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _train(config: str) -> dict:
    result = CliRunner().invoke(app, ["train", config, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _leaderboard() -> list[dict]:
    result = CliRunner().invoke(app, ["leaderboard", "--format", "json", "--no-references"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_two_image_folders_are_two_datasets_with_two_teachers_and_two_rows(migrated_store, tmp_path, two_folders,
                                                                          monkeypatch):
    root_a, root_b = two_folders
    a = _train(_config(tmp_path, root_a, "A"))
    b = _train(_config(tmp_path, root_b, "B"))
    assert a["teacher_trained_now"] and b["teacher_trained_now"], "B's teacher is not A's"
    assert a["teacher_sha256"] != b["teacher_sha256"]
    assert (a["dataset_label"], b["dataset_label"]) == ("A", "B")
    assert a["dataset_fingerprint"] != b["dataset_fingerprint"]

    # each stored teacher's accuracy is measured on its own data
    from kdarena.methods.engine import eval_loader, evaluate
    from kdarena.zoo.models import build_model

    sidecars = [json.loads(p.read_text()) for p in sorted((migrated_store / "teachers").glob("*.json"))]
    assert len(sidecars) == 2
    for summary, root in ((a, root_a), (b, root_b)):
        [meta] = [m for m in sidecars if m["sha256"] == summary["teacher_sha256"]]
        assert meta["dataset"]["fingerprint"] == summary["dataset_fingerprint"]
        assert meta["test_acc"] == summary["teacher_test_acc"]
        data = load_dataset("imagefolder", root=root)
        teacher = build_model("cnn", num_classes=2, in_channels=3, input_size=8, channels=16)
        teacher.load_state_dict(torch.load(migrated_store / "teachers" / f"{meta['key']}.pt", weights_only=True))
        assert evaluate(teacher, eval_loader(data.test, data, torch.device("cpu"))) == meta["test_acc"]

    # two rows, never one row averaging two datasets
    rows = _leaderboard()
    assert sorted((r["dataset"], r["n_seeds"]) for r in rows) == [("A", 1), ("B", 1)]
    assert {r["dataset_fingerprint"] for r in rows} == {a["dataset_fingerprint"], b["dataset_fingerprint"]}

    # MLflow's own dataset record names the data: the UI's Dataset column
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    for summary in (a, b):
        [inp] = client.get_run(summary["run_id"]).inputs.dataset_inputs
        assert inp.dataset.name == summary["dataset_label"]
        assert inp.dataset.digest == summary["dataset_fingerprint"][:36]

    # the dashboard offers both datasets and ranks each apart
    from streamlit.testing.v1 import AppTest

    import kdarena.dashboard

    monkeypatch.setenv("KDARENA_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    at = AppTest.from_file(str(Path(kdarena.dashboard.__file__).with_name("app.py")), default_timeout=120)
    at.run()
    [select] = [s for s in at.selectbox if s.label == "Dataset"]
    assert {"A", "B"} <= set(select.options)
    for name in ("A", "B"):
        select.set_value(name).run()
        assert not at.exception
        [table] = [df for df in at.dataframe if "method" in df.value.columns]
        assert table.value["method"].tolist() == ["kd"]

    # B again: its own teacher, from the store
    again = _train(_config(tmp_path, root_b, "B"))
    assert not again["teacher_trained_now"] and again["teacher_sha256"] == b["teacher_sha256"]
    assert again["teacher_test_acc"] == b["teacher_test_acc"]


def test_changed_added_or_removed_files_are_new_data_with_a_new_teacher_key(tmp_path):
    root = make_tree(tmp_path / "shapes", ["circle", "square"], seed=3, bright="rows")
    teacher, cfg = TeacherConfig(arch="cnn"), DatasetConfig(name="imagefolder", root=str(root))
    before = load_dataset("imagefolder", root=root)
    assert load_dataset("imagefolder", root=root).fingerprint == before.fingerprint  # read back from the cache

    # one image rewritten with other pixels at the same size: the decode cache must notice, and the key change
    victim = root / "train" / "circle" / "000.png"
    size = victim.stat().st_size
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(victim, compress_level=0)
    assert victim.stat().st_size == size
    changed = load_dataset("imagefolder", root=root)
    assert changed.fingerprint != before.fingerprint
    assert teacher_key(teacher, cfg, changed) != teacher_key(teacher, cfg, before)
    assert int(changed.train.images.flatten().eq(7).sum()) + int(changed.val.images.flatten().eq(7).sum()) >= 192

    # a file added, then removed again: new data, then the original data once more
    extra = root / "test" / "square" / "999.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(extra, compress_level=0)
    added = load_dataset("imagefolder", root=root)
    assert added.fingerprint not in (changed.fingerprint, before.fingerprint)
    extra.unlink()
    assert load_dataset("imagefolder", root=root).fingerprint == changed.fingerprint

    # the same content elsewhere, copied with new file times, is the same data
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".kdarena-decoded.pt"))
    assert load_dataset("imagefolder", root=copy).fingerprint == changed.fingerprint


def test_a_teachers_key_includes_the_augmentation_it_trains_with(digits):
    cfg = DatasetConfig()

    def key(**recipe) -> str:
        return teacher_key(TeacherConfig(arch="cnn", recipe={"epochs": 30, **recipe}), cfg, digits)

    assert key() == key(augment="none"), "digits' default policy, written out, is the same teacher"
    assert key() != key(augment="translate")
    assert key(augment="translate") != key(augment={"policy": "translate", "shift": 3})


def test_built_in_datasets_are_labelled_by_name_and_fingerprinted_by_content():
    digits = load_dataset("digits")
    again = load_dataset("digits", split_seed=5, label="my-digits")
    assert digits.label == "digits" and again.label == "my-digits"
    assert digits.fingerprint == again.fingerprint and len(digits.fingerprint) == 64  # the split is not the data


def test_same_label_different_data_ranks_apart_and_unfingerprinted_runs_are_never_merged(migrated_store, tmp_path):
    """Runs written the way kdarena writes them (tags), including runs recorded before datasets had a fingerprint."""
    from kdarena.leaderboards import board as lb_board
    from kdarena.leaderboards import runs as lb_runs
    from kdarena.training.record import Metric, Role, Status, Tag

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment("kdarena")

    def run(label: str | None, fingerprint: str | None, acc: float) -> None:
        tags = {Role.TAG: Role.TRAIN, Tag.STATUS: Status.COMPLETED, Tag.METHOD: "kd", Tag.DATASET: "imagefolder",
                Tag.STUDENT: "cnn", Tag.STUDENT_LABEL: "cnn(channels=8)", Tag.TEACHER_LABEL: "cnn(channels=16)"}
        if label:
            tags[Tag.DATASET_LABEL] = label
        if fingerprint:
            tags[Tag.DATASET_FINGERPRINT] = fingerprint
        run_id = client.create_run(exp, tags=tags).info.run_id
        client.log_metric(run_id, Metric.TEST_ACC, acc)
        client.log_param(run_id, "train.seed", 0)
        client.set_terminated(run_id)

    run("shapes", "a" * 64, 0.9)
    run("shapes", "b" * 64, 0.5)
    run(None, None, 0.7)  # before fingerprints: the dataset's kind was all that was recorded
    run("other", "c" * 64, 0.8)
    board = lb_board.leaderboard(lb_runs.load_runs(os.environ["MLFLOW_TRACKING_URI"]))
    shown = dict(zip(board["dataset"], board["test_acc_mean"]))
    assert shown == {"shapes · aaaaaaaa": 0.9, "shapes · bbbbbbbb": 0.5, "imagefolder": 0.7, "other": 0.8}
    unknown = board[board["dataset"] == "imagefolder"].iloc[0]
    assert not isinstance(unknown["dataset_fingerprint"], str)  # no identity: never a fingerprint
    # a label names every dataset that carries it; the name shown or a fingerprint prefix names one
    assert sorted(lb_board.leaderboard(lb_runs.load_runs(os.environ["MLFLOW_TRACKING_URI"]), dataset="shapes")
                  ["test_acc_mean"]) == [0.5, 0.9]
    assert lb_board.leaderboard(lb_runs.load_runs(os.environ["MLFLOW_TRACKING_URI"]), dataset="bbbbbbbb")[
        "test_acc_mean"].tolist() == [0.5]
