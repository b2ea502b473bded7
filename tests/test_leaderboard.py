"""The leaderboard: the read side (`kdarena.leaderboards`), Pareto fronts, reference data, `kdarena leaderboard`.

Store-backed tests read the MLflow store of the real sweep in conftest's
`swept_store` (fitnets forced to diverge, final runs on two seeds, one
`kdarena train` run) and check it against MlflowClient directly; the rest
use small synthetic run tables and run in milliseconds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kdarena.leaderboards import board as lb_board
from kdarena.leaderboards import references as lb_refs
from kdarena.leaderboards import runs as lb_runs
from kdarena.leaderboards import sweeps as lb_sweeps
from kdarena.leaderboards import text as lb_text
from kdarena.leaderboards.stats import (LATENCY_RTOL, best_first, latency_noise_ms, pareto_front, pareto_mask,
                                        tied_ranks)
from kdarena.leaderboards.references import COLUMNS, load_references, load_sources
from kdarena.methods import METHODS
from kdarena.cli.app import app

from helpers import unboxed

# -- helpers ----------------------------------------------------------------------------------------------------


def brute_front(acc: list[float], cost: list[float], noise: list[float] | None = None) -> set[int]:
    """The front by definition: nothing as accurate and no costlier beats it, costs closer than the larger noise tied."""
    ok = [i for i in range(len(acc)) if not (math.isnan(acc[i]) or math.isnan(cost[i]))]
    tie = [0.0 if noise is None or math.isnan(noise[i]) else noise[i] for i in range(len(acc))]

    def beats(j: int, i: int) -> bool:
        t = max(tie[i], tie[j])
        return acc[j] >= acc[i] and cost[j] <= cost[i] + t and (acc[j] > acc[i] or cost[j] < cost[i] - t)

    return {i for i in ok if not any(beats(j, i) for j in ok)}


def client_runs(uri: str) -> list:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=10_000)


def fake_runs(rows: list[dict]) -> pd.DataFrame:
    """A `load_runs`-shaped table from a few fields per run."""
    base = {"experiment": "e", "role": "trial", "sweep": "s", "parent_run_id": "p", "dataset": "d", "teacher": "T",
            "student": "s1", "student_arch": "cnn", "method": "kd", "status": "completed", "reason": None,
            "test_acc": 0.5, "val_acc": 0.5, "params": 100.0, "macs": 1000.0, "flops": 2000.0, "latency_ms": 1.0,
            "extra_params": 0.0, "epochs_completed": 3.0, "seed": 0.0, "hparams": {"lr": 0.1}, "searched": {},
            "trial_key": None, "config_key": None, "run_name": "r"}
    out = []
    for i, row in enumerate(rows):
        r = base | {"run_id": f"run{i}", "start_time": pd.Timestamp(1_700_000_000 + i, unit="s", tz="UTC")} | row
        if r["role"] in ("final", "train") and r["config_key"] is None:
            r["config_key"] = "cfg"
        out.append(r)
    return pd.DataFrame(out, columns=lb_runs.RUN_COLUMNS)


@pytest.fixture(scope="module")
def store(swept_store):
    uri = swept_store["tracking_uri"]
    return {**swept_store, "runs": lb_runs.load_runs(uri), "client_runs": client_runs(uri)}


def invoke(*args: str):
    return CliRunner().invoke(app, ["leaderboard", *args])


# -- pareto ------------------------------------------------------------------------------------------------------


def test_pareto_mask_matches_brute_force_on_random_points():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 12)
        # few distinct values, so ties in accuracy, in cost and in both are common
        acc = [rng.choice([0.5, 0.6, 0.7, 0.8, math.nan]) if rng.random() < 0.9 else math.nan for _ in range(n)]
        cost = [float(rng.choice([1, 2, 3, 5, 8])) if rng.random() < 0.9 else math.nan for _ in range(n)]
        mask = pareto_mask(acc, cost)
        assert {i for i, on in enumerate(mask) if on} == brute_front(acc, cost)


def test_pareto_mask_edge_cases():
    assert pareto_mask([], []) == []
    assert pareto_mask([0.9], [5]) == [True]
    assert pareto_mask([0.9, 0.9], [5, 5]) == [True, True]  # equal points: neither dominates
    assert pareto_mask([0.9, 0.8], [5, 5]) == [True, False]
    assert pareto_mask([0.9, 0.9], [4, 5]) == [True, False]
    assert pareto_mask([None, 0.5], [1, 2]) == [False, True]
    with pytest.raises(ValueError):
        pareto_mask([0.1], [1, 2])


def test_latencies_closer_than_their_noise_tie():
    # the case: 0.0716 vs 0.0722 ms is timing noise, so the less accurate "faster" row is dominated
    assert pareto_mask([0.90, 0.91], [0.0716, 0.0722]) == [True, True]
    assert pareto_mask([0.90, 0.91], [0.0716, 0.0722], [0.0036, 0.0036]) == [False, True]
    # apart by more than the noise: both stand; equal points both stand; a missing noise is no tolerance
    assert pareto_mask([0.90, 0.91], [0.05, 0.0722], [0.0036, 0.0036]) == [True, True]
    assert pareto_mask([0.9, 0.9], [0.07, 0.0701], [0.001, 0.001]) == [True, True]
    assert pareto_mask([0.90, 0.91], [0.0716, 0.0722], [math.nan, math.nan]) == [True, True]
    with pytest.raises(ValueError):
        pareto_mask([0.9], [0.1], [0.1, 0.2])
    # the noise: the measurements' IQR, their spread, at least LATENCY_RTOL of their median
    assert latency_noise_ms([1.0], [math.nan]) == pytest.approx(LATENCY_RTOL)
    assert latency_noise_ms([1.0, 1.2], [0.01, 0.02]) == pytest.approx(0.2)
    assert latency_noise_ms([1.0], [0.3]) == pytest.approx(0.3)
    assert math.isnan(latency_noise_ms([math.nan], [math.nan]))


def test_the_latency_front_ignores_timing_noise_and_the_macs_front_is_exact():
    runs = fake_runs([
        {"student": "a", "test_acc": 0.91, "val_acc": 0.91, "latency_ms": 0.0722, "latency_iqr_ms": 0.0004, "macs": 9.0},
        {"student": "b", "test_acc": 0.90, "val_acc": 0.90, "latency_ms": 0.0716, "latency_iqr_ms": 0.0004, "macs": 8.0},
        {"student": "c", "test_acc": 0.80, "val_acc": 0.80, "latency_ms": 0.0500, "latency_iqr_ms": 0.0004, "macs": 7.0},
    ])
    by_latency = lb_board.leaderboard(runs, by="latency").set_index("student")
    assert by_latency["pareto"].to_dict() == {"a": True, "b": False, "c": True}
    assert by_latency.loc["b", "latency_noise_ms"] == pytest.approx(LATENCY_RTOL * 0.0716)
    assert lb_board.leaderboard(runs, by="macs").set_index("student")["pareto"].to_dict() == {
        "a": True, "b": True, "c": True}


def test_pareto_front_keeps_its_export_contract():
    from kdarena.search.export import pareto_front as exported

    points = [(0.9, 100), (0.8, 50), (0.85, 200), (0.95, 300), (0.8, 60)]
    assert exported is pareto_front
    assert pareto_front(points) == [0, 1, 3]


def test_the_read_side_imports_neither_streamlit_nor_ray_nor_torch():
    code = ("import sys, kdarena.leaderboards.runs, kdarena.leaderboards.board, kdarena.leaderboards.render, "
            "kdarena.leaderboards.sweeps, kdarena.leaderboards.references; "
            "kdarena.leaderboards.references.reference_rows(); "
            "print(sorted(m for m in ('ray', 'streamlit', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- reference data ----------------------------------------------------------------------------------------------


def test_reference_data_is_complete_and_in_range():
    rows = load_references()
    sources = load_sources()
    assert rows and set(rows[0]) == set(COLUMNS)
    names = set(METHODS) | {"teacher", "crd", "dkd", "student-initial"}
    for r in rows:
        where = f"{r['table']}: {r['teacher']}→{r['student']} {r['method']}"
        assert r["source"] in sources and r["table"] in sources[r["source"]]["tables"], where
        assert r["dataset"] and r["teacher"] and r["student"] and r["method"] in names, where
        assert 0.0 < r["test_acc"] <= 1.0, where
        if r["test_errors"] is not None:
            assert 0 <= r["test_errors"] <= r["test_size"], where
            assert r["test_acc"] == pytest.approx(1 - r["test_errors"] / r["test_size"], abs=1e-6), where
        for cost in ("params", "macs", "flops"):
            assert math.isnan(r[cost]) or r[cost] > 0, where
    keys = [(r["dataset"], r["teacher"], r["student"], r["method"], r["variant"], r["table"]) for r in rows]
    assert len(keys) == len(set(keys))
    per_table = pd.Series([r["table"] for r in rows]).value_counts().to_dict()
    assert per_table == {"repdistiller-teachers": 6, "repdistiller-same-arch": 30, "repdistiller-cross-arch": 30,
                         "mdistiller-dkd": 5, "mdistiller-dkd-cross-arch": 5, "mdistiller-dkd-imagenet": 2,
                         "dist-cifar100": 5, "dist-imagenet": 4, "reviewkd-imagenet": 2,
                         "logit-std-same-arch": 30, "logit-std-cross-arch": 18,
                         "svd-cifar100": 14, "svd-schedule": 2, "svd-larger-data": 8,
                         "mlp-soft-adversarial": 15, "hinton-mnist": 3}
    assert {r["variant"] for r in rows if r["table"].startswith("logit-std")} == {"", "logit_std"}
    for name, source in sources.items():  # public pages only: no path on anyone's machine
        assert all(u.startswith("https://") for u in source.get("urls", [])), name
    assert "/wo" "rk/" not in str(sources) and "sha" "red/" not in str(sources)  # no machine path


def test_reference_data_spot_checks():
    def one(**match):
        found = [r for r in load_references() if all(r[k] == v for k, v in match.items())]
        assert len(found) == 1, match
        return found[0]

    r = one(table="repdistiller-same-arch", teacher="resnet56", student="resnet20", method="kd")
    assert r["test_acc"] == pytest.approx(0.7066) and r["params"] == 280_000 and r["macs"] == 40_800_000
    assert one(table="repdistiller-cross-arch", teacher="wrn_40_2", student="shufflenetv1", method="crd")["test_acc"] \
        == pytest.approx(0.7605)
    assert one(table="mdistiller-dkd", student="resnet8x4")["test_acc"] == pytest.approx(0.7632)
    svd = one(table="svd-cifar100", student="VGG student (strided)", method="svd")
    assert (svd["test_acc"], svd["flops"], svd["params"]) == (pytest.approx(0.6115), 15_600_000, 3_800_000)
    assert one(table="svd-schedule", method="svd")["test_acc"] == pytest.approx(0.6554)
    assert one(dataset="imagenet-50", method="svd")["test_acc"] == pytest.approx(0.7104)
    adv = one(dataset="svhn", method="adversarial")
    assert adv["test_errors"] == 8659 and adv["test_size"] == 26032
    assert one(table="hinton-mnist", method="kd")["test_errors"] == 74
    # the newer methods, each as its README prints it
    assert one(table="repdistiller-same-arch", student="resnet8x4", method="crd")["test_acc"] == pytest.approx(0.7551)
    assert one(table="mdistiller-dkd", teacher="resnet110", method="dkd")["test_acc"] == pytest.approx(0.7411)
    assert one(table="mdistiller-dkd-cross-arch", teacher="resnet32x4", student="shufflenetv2")["test_acc"] \
        == pytest.approx(0.7707)
    dist = one(table="dist-cifar100", student="resnet8x4")
    assert dist["method"] == "dist" and dist["test_acc"] == pytest.approx(0.7631) and "± 0.19" in dist["note"]
    assert one(dataset="imagenet", table="dist-imagenet", method="dist")["test_acc"] == pytest.approx(0.7207)
    assert one(dataset="imagenet", table="reviewkd-imagenet", method="reviewkd")["test_acc"] == pytest.approx(0.7161)
    assert one(dataset="imagenet", table="mdistiller-dkd-imagenet", method="dkd")["test_acc"] == pytest.approx(0.7170)
    mlkd_ls = one(table="logit-std-same-arch", student="resnet8x4", method="mlkd", variant="logit_std")
    assert mlkd_ls["test_acc"] == pytest.approx(0.7828)
    assert mlkd_ls["key_hparams"] == "logit_std=True base_temperature=2 kd_weight=9"
    assert one(table="logit-std-same-arch", student="resnet8x4", method="mlkd", variant="")["test_acc"] \
        == pytest.approx(0.7708)
    assert one(table="logit-std-same-arch", student="resnet8x4", method="kd", variant="logit_std")["test_acc"] \
        == pytest.approx(0.7662)
    assert one(table="logit-std-cross-arch", teacher="resnet50", method="kd")["key_hparams"].endswith("kd_weight=1")


def test_reference_rows_are_flagged_and_never_ranked():
    refs = lb_refs.reference_rows("cifar100")
    # RepDistiller teachers and both tables, DKD (same, cross), DIST, logit standardisation (same, cross), SVD, schedules
    assert len(refs) == 6 + 30 + 30 + 5 + 5 + 5 + 30 + 18 + 14 + 2
    assert set(refs["dataset"]) == {"cifar100"}
    assert refs["source"].str.startswith("reported (not reproduced): ").all()
    assert refs["reported"].all() and not refs["pareto"].any()
    assert refs["rank"].isna().all() and refs["n_seeds"].isna().all()
    assert set(lb_board.LEADERBOARD_COLUMNS) <= set(refs.columns)
    assert len(lb_refs.reference_rows()) == len(load_references())
    assert set(lb_refs.reference_rows(teacher="resnet56")["teacher"]) == {"resnet56"}


# -- leaderboard over synthetic runs -----------------------------------------------------------------------------


def test_group_prefers_final_then_train_then_best_trial_by_val_acc():
    runs = fake_runs([
        # kd: finals win over the better trial and the train run
        {"method": "kd", "role": "final", "test_acc": 0.80, "seed": 0.0},
        {"method": "kd", "role": "final", "test_acc": 0.90, "seed": 1.0},
        {"method": "kd", "role": "trial", "test_acc": 0.99, "val_acc": 0.99},
        {"method": "kd", "role": "train", "test_acc": 0.95},
        # at: train runs win over trials
        {"method": "at", "role": "train", "test_acc": 0.70},
        {"method": "at", "role": "trial", "test_acc": 0.99, "val_acc": 0.99},
        # fsp: the trial with the best val_acc stands, whatever its test_acc
        {"method": "fsp", "test_acc": 0.60, "val_acc": 0.90},
        {"method": "fsp", "test_acc": 0.95, "val_acc": 0.80},
    ])
    board = lb_board.leaderboard(runs).set_index("method")
    assert board.loc["kd", "source"] == "final" and board.loc["kd", "n_seeds"] == 2
    assert board.loc["kd", "test_acc_mean"] == pytest.approx(0.85)
    assert board.loc["kd", "test_acc_std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))
    assert (board.loc["at", "source"], board.loc["at", "test_acc_mean"]) == ("train", pytest.approx(0.70))
    assert (board.loc["fsp", "source"], board.loc["fsp", "test_acc_mean"], board.loc["fsp", "n_seeds"]) == \
        ("trial", pytest.approx(0.60), 1)
    assert math.isnan(board.loc["fsp", "test_acc_std"])  # one seed says nothing of the spread


def test_only_completed_full_budget_runs_rank_and_duplicates_count_once():
    runs = fake_runs([
        {"method": "kd", "status": "completed", "test_acc": 0.7, "trial_key": "trial/1", "sweep": "s"},
        # the same trial recorded twice (a resumed sweep): the latest run stands
        {"method": "kd", "status": "completed", "test_acc": 0.8, "trial_key": "trial/1", "sweep": "s"},
        {"method": "fitnets", "status": "diverged", "test_acc": math.nan},
        {"method": "at", "status": "early-stopped", "test_acc": math.nan, "val_acc": 0.99},
        {"method": "fsp", "status": "failed", "test_acc": 0.99},  # a stray metric never ranks a failed run
        {"method": "svd", "status": "running", "test_acc": math.nan},
    ])
    runs = pd.concat([runs, runs.iloc[[0]]], ignore_index=True)  # one run id twice
    board = lb_board.leaderboard(runs)
    assert board["method"].tolist() == ["kd"]
    assert board.loc[0, "test_acc_mean"] == pytest.approx(0.8) and board.loc[0, "run_id"] == "run1"


def test_two_sweeps_finals_never_mix():
    runs = fake_runs([
        {"role": "final", "test_acc": 0.70, "config_key": "a", "sweep": "one", "seed": 0.0},
        {"role": "final", "test_acc": 0.72, "config_key": "a", "sweep": "one", "seed": 1.0},
        {"role": "final", "test_acc": 0.90, "config_key": "b", "sweep": "two", "val_acc": 0.6},
    ])
    row = lb_board.leaderboard(runs).iloc[0]
    assert (row["test_acc_mean"], row["n_seeds"], row["sweep"]) == (pytest.approx(0.90), 1, "two")


@pytest.mark.parametrize("by", ["macs", "params", "latency"])
def test_pareto_marks_match_brute_force_on_random_boards(by):
    rng = random.Random(1)
    rows = []
    for i in range(60):
        rows.append({"dataset": rng.choice(["d1", "d2"]), "teacher": rng.choice(["T1", "T2"]),
                     "student": f"s{rng.randint(0, 6)}", "method": rng.choice(["kd", "at", "baseline"]),
                     "test_acc": rng.choice([0.5, 0.6, 0.7, 0.8, 0.9]), "val_acc": rng.random(),
                     "macs": float(rng.choice([10, 20, 40])), "params": float(rng.choice([1, 2, 3])),
                     "latency_ms": rng.choice([0.1, 0.2, 0.3])})
    board = lb_board.leaderboard(fake_runs(rows), by=by)
    cost = lb_board.cost_column(by)
    for _, group in board.groupby(["dataset", "teacher"]):
        noise = group["latency_noise_ms"].tolist() if by == "latency" else None
        front = brute_front(group["test_acc_mean"].tolist(), group[cost].tolist(), noise)
        assert {i for i, on in enumerate(group["pareto"]) if on} == front
    for _, group in board.groupby("dataset"):  # ranked best first within the dataset, by val_acc (no ties here)
        assert group["rank"].tolist() == list(range(1, len(group) + 1))
        assert group["val_acc_mean"].is_monotonic_decreasing


def test_filters_apply_before_the_front():
    runs = fake_runs([
        {"student": "big", "test_acc": 0.9, "macs": 100.0, "params": 10.0},
        {"student": "small", "test_acc": 0.8, "macs": 50.0, "params": 5.0},
        {"student": "mid", "test_acc": 0.7, "macs": 80.0, "params": 8.0},
    ])
    full = lb_board.leaderboard(runs).set_index("student")
    assert full["pareto"].to_dict() == {"big": True, "small": True, "mid": False}
    cheap = lb_board.leaderboard(runs, max_macs=80).set_index("student")
    assert set(cheap.index) == {"small", "mid"} and cheap["pareto"].to_dict() == {"small": True, "mid": False}
    only_mid = lb_board.leaderboard(runs, student=["mid", "big"], max_params=8)
    assert only_mid["student"].tolist() == ["mid"] and only_mid["pareto"].tolist() == [True]
    assert lb_board.leaderboard(runs, dataset="nowhere").empty
    assert list(lb_board.leaderboard(runs, dataset="nowhere").columns) == lb_board.LEADERBOARD_COLUMNS
    with pytest.raises(ValueError):
        lb_board.leaderboard(runs, by="joules")


def test_empty_inputs_give_empty_frames():
    empty = lb_runs.empty_runs()
    assert list(empty.columns) == lb_runs.RUN_COLUMNS
    assert lb_board.leaderboard(empty).empty and list(lb_board.leaderboard(empty).columns) == lb_board.LEADERBOARD_COLUMNS
    assert lb_sweeps.sweeps(empty).empty and lb_sweeps.sweep_trials(empty, "x").empty


# -- against the real sweep's store ------------------------------------------------------------------------------


def test_load_runs_reads_every_train_trial_and_final_run(store):
    runs = store["runs"]
    expected = {r.info.run_id: r for r in store["client_runs"]
                if r.data.tags.get("kdarena.role") in ("train", "trial", "final")}
    assert list(runs.columns) == lb_runs.RUN_COLUMNS
    assert set(runs["run_id"]) == set(expected) and runs["run_id"].is_unique
    for row in runs.itertuples():
        run = expected[row.run_id]
        assert row.role == run.data.tags["kdarena.role"] and row.status == run.data.tags["kdarena.status"]
        assert row.student == run.data.tags["kdarena.student_label"]
        assert (math.isnan(row.test_acc) and "test_acc" not in run.data.metrics) or \
            row.test_acc == run.data.metrics["test_acc"]
        assert row.seed == int(run.data.params["train.seed"])
        assert row.hparams["lr"] == pytest.approx(float(run.data.params["train.lr"]))
    assert (runs["role"] == "train").sum() == 1 and (runs["role"] == "final").sum() == 4
    assert {"completed", "early-stopped", "diverged"} <= set(runs["status"])
    assert lb_runs.load_runs(store["tracking_uri"], ["no such experiment"]).empty


def test_sqlite_reader_agrees_with_mlflow_search_runs(store):
    fast = store["runs"].sort_values("run_id").reset_index(drop=True)
    slow = lb_runs._load_runs_client(store["tracking_uri"], None).sort_values("run_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(fast, slow)


def test_leaderboard_ranks_only_completed_full_budget_runs(store):
    board = lb_board.leaderboard(store["runs"])
    by_id = {r.info.run_id: r for r in store["client_runs"]}
    assert not board.empty and "fitnets" not in set(board["method"])  # fitnets diverges in the fixture
    ranked_methods = {r.data.tags["kdarena.method"] for r in store["client_runs"]
                      if r.data.tags.get("kdarena.status") == "completed" and "test_acc" in r.data.metrics
                      and r.data.tags.get("kdarena.role") in ("train", "trial", "final")}
    assert set(board["method"]) == ranked_methods
    for row in board.itertuples():
        for run_id in row.run_ids:
            run = by_id[run_id]
            assert run.data.tags["kdarena.status"] == "completed" and "test_acc" in run.data.metrics
            assert run.data.tags["kdarena.student_label"] == row.student
    assert not board.duplicated(["dataset", "teacher", "student", "method"]).any()
    assert set(board.columns) >= set(lb_board.LEADERBOARD_COLUMNS)
    keys = [best_first(v, m, n) for v, m, n in zip(board["val_acc_mean"], board["macs"], board["n_seeds"])]
    assert keys == sorted(keys) and board["rank"].tolist() == tied_ranks(keys)  # one dataset: digits


def test_final_runs_aggregate_over_seeds(store):
    board = lb_board.leaderboard(store["runs"])
    finals = board[board["source"] == "final"]
    assert not finals.empty
    for row in finals.itertuples():
        accs = [r.data.metrics["test_acc"] for r in store["client_runs"]
                if r.data.tags.get("kdarena.role") == "final" and r.data.tags["kdarena.method"] == row.method
                and r.data.tags["kdarena.student_label"] == row.student
                and r.data.tags.get("kdarena.status") == "completed"]
        assert row.n_seeds == len(accs) == 2
        mean = sum(accs) / 2
        assert row.test_acc_mean == pytest.approx(mean, abs=1e-12)
        assert row.test_acc_std == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs)), abs=1e-12)


def test_leaderboard_filters_and_front_on_the_real_store(store):
    runs = store["runs"]
    board = lb_board.leaderboard(runs)
    for by in ("macs", "params", "latency"):
        b = lb_board.leaderboard(runs, by=by)
        cost = lb_board.cost_column(by)
        noise = b["latency_noise_ms"].tolist() if by == "latency" else None  # latencies within noise tie
        assert {i for i, on in enumerate(b["pareto"]) if on} == brute_front(b["test_acc_mean"].tolist(),
                                                                             b[cost].tolist(), noise)
    assert board["method"].nunique() > 1  # the fixture finishes baseline and kd
    method = board["method"].iloc[0]
    only = lb_board.leaderboard(runs, method=method)
    assert set(only["method"]) == {method} and len(only) == (board["method"] == method).sum() < len(board)
    assert {i for i, on in enumerate(only["pareto"]) if on} == brute_front(only["test_acc_mean"].tolist(),
                                                                           only["macs"].tolist())
    assert lb_board.leaderboard(runs, dataset="cifar100").empty
    assert lb_board.leaderboard(runs, max_macs=board["macs"].min() - 1).empty
    assert len(lb_board.leaderboard(runs, teacher=board["teacher"].iloc[0])) == len(board)


def test_sweeps_and_trials_pages(store):
    runs = store["runs"]
    table = lb_sweeps.sweeps(runs)
    assert table["name"].tolist() == ["swept"] and list(table.columns) == lb_sweeps.SWEEP_COLUMNS
    trials = [r for r in store["client_runs"] if r.data.tags.get("kdarena.role") == "trial"]
    row = table.iloc[0]
    assert row["trials"] == len(trials) == 9
    for column, status in (("completed", "completed"), ("early_stopped", "early-stopped"), ("diverged", "diverged"),
                           ("failed", "failed")):
        assert row[column] == sum(r.data.tags.get("kdarena.status") == status for r in trials)
    assert row["final_runs"] == 4
    listed = lb_sweeps.sweep_trials(runs, "swept")
    assert listed["order"].tolist() == list(range(1, 10)) and listed["start_time"].is_monotonic_increasing
    assert set(listed["status"]) >= {"diverged", "completed"}
    assert lb_sweeps.sweep_trials(runs, "nope").empty


def test_run_detail_has_config_and_histories(store):
    import yaml

    from kdarena.training.config import parse_config

    board = lb_board.leaderboard(store["runs"])
    detail = lb_runs.run_detail(store["tracking_uri"], board["run_id"].iloc[0])
    assert detail["tags"]["kdarena.role"] in ("final", "train", "trial")
    assert len(detail["histories"]["val_acc"]) == 3  # one point per epoch
    runs = store["runs"].set_index("run_id")
    assert detail["metrics"]["test_acc"] == runs.loc[detail["run_id"], "test_acc"]
    assert detail["params"]["train.seed"] == str(int(runs.loc[detail["run_id"], "seed"]))
    parse_config(yaml.safe_load(detail["config_yaml"]))  # what `kdarena train` accepts
    with pytest.raises(LookupError):
        lb_runs.run_detail(store["tracking_uri"], "0" * 32)


# -- the CLI ----------------------------------------------------------------------------------------------------


def test_cli_json_and_csv_parse_back_to_the_leaderboard(store):
    uri = store["tracking_uri"]
    board = lb_board.leaderboard(store["runs"])
    out = invoke("--tracking-uri", uri, "--format", "json", "--references", "all")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    ours = [r for r in rows if not r["reported"]]
    assert [(r["rank"], r["method"], r["student"]) for r in ours] == \
        list(zip(board["rank"], board["method"], board["student"]))
    assert [r["test_acc_mean"] for r in ours] == pytest.approx(board["test_acc_mean"].tolist(), abs=1e-12)
    assert [r["pareto"] for r in ours] == board["pareto"].tolist()
    refs = [r for r in rows if r["reported"]]
    assert refs and all(r["rank"] is None and r["source"].startswith("reported (not reproduced)") for r in refs)
    assert rows.index(refs[0]) == len(ours)  # ours first, then the published rows

    out = invoke("--tracking-uri", uri, "--format", "csv", "--no-references")
    assert out.exit_code == 0, out.output
    parsed = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [int(r["rank"]) for r in parsed] == board["rank"].tolist()
    assert [float(r["test_acc_mean"]) for r in parsed] == pytest.approx(board["test_acc_mean"].tolist())
    assert [int(r["n_seeds"]) for r in parsed] == board["n_seeds"].tolist()


def test_cli_table_and_markdown_show_marks_and_reported_rows(store):
    uri = store["tracking_uri"]
    board = lb_board.leaderboard(store["runs"])
    out = invoke("--tracking-uri", uri, "--references", "all")
    assert out.exit_code == 0, out.output
    text = out.stdout
    assert "★" in text and "reported" in text and "ref" in text
    assert text.index("digits") < text.index("cifar100")  # our dataset first, the published-only ones after
    for row in board.to_dict("records"):
        assert row["student"] in text and lb_text.accuracy_text(row) in text
    assert "(2 seeds)" in text  # the final runs

    out = invoke("--tracking-uri", uri, "--format", "markdown", "--dataset", "digits", "--by", "params")
    assert out.exit_code == 0, out.output
    md = out.stdout
    assert "## digits" in md and "| rank | teacher | student | method | test_acc |" in md
    assert "cifar100" not in md and "Pareto front of test accuracy vs parameters" in md
    data_rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(data_rows) == len(board)

    pareto = invoke("--tracking-uri", uri, "--format", "json", "--pareto-only", "--no-references")
    assert [r["pareto"] for r in json.loads(pareto.stdout)] == [True] * int(board["pareto"].sum())


def test_cli_dataset_with_published_rows_only(store):
    out = invoke("--tracking-uri", store["tracking_uri"], "--dataset", "mnist", "--format", "json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert rows and all(r["reported"] and r["dataset"] == "mnist" for r in rows)
    assert "published results only" in out.stderr


def test_cli_export_writes_one_markdown_file_per_dataset(store, tmp_path):
    folder = tmp_path / "leaderboards"
    out = invoke("--tracking-uri", store["tracking_uri"], "--export", str(folder), "--references", "all")
    assert out.exit_code == 0, out.output
    written = {p.name for p in folder.iterdir()}
    assert {"digits.md", "cifar100.md", "mnist.md", "svhn.md"} <= written
    assert not any(name.endswith(".partial") for name in written)
    digits = (folder / "digits.md").read_text()
    assert digits.startswith("# kdarena leaderboard: digits") and "★" in digits
    cifar = (folder / "cifar100.md").read_text()
    assert "| ref |" in cifar and "reported (not reproduced)" in cifar
    only = tmp_path / "ours"
    assert invoke("--tracking-uri", store["tracking_uri"], "--export", str(only), "--no-references").exit_code == 0
    assert {p.name for p in only.iterdir()} == {"digits.md"}


@pytest.mark.parametrize("args, message", [
    (["--by", "joules"], "'joules' is not one of 'macs', 'params', 'latency'"),
    (["--format", "xml"], "'xml' is not one of 'table', 'markdown', 'csv', 'json'"),
    (["--references", "some"], "'some' is not one of 'auto', 'all', 'none'"),
    (["--json", "--format", "csv"], "--json and --format csv contradict each other"),
    (["--references", "all", "--no-references"], "--no-references and --references all contradict each other"),
    (["--dataset", "imagenet-9000"], "--dataset 'imagenet-9000'"),
    (["--teacher", "nobody"], "--teacher 'nobody'"),
])
def test_cli_bad_input_exits_2_with_one_message(store, args, message):
    out = invoke("--tracking-uri", store["tracking_uri"], *args)
    assert out.exit_code == 2, out.output
    assert out.stdout == "" and message in unboxed(out.stderr) and "Traceback" not in out.output


def test_cli_unreachable_server_and_bad_export_dir_exit_2(tmp_path):
    out = invoke("--tracking-uri", "http://127.0.0.1:9")
    assert out.exit_code == 2 and "unreachable" in out.stderr
    (tmp_path / "file").write_text("x")
    out = invoke("--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--export", str(tmp_path / "file"))
    assert out.exit_code == 2 and "not a directory" in out.stderr


def test_cli_empty_store_names_the_quickstart(migrated_store, tmp_path):
    out = invoke()  # MLFLOW_TRACKING_URI: a fresh, migrated, empty store
    assert out.exit_code == 0, out.output
    assert "kdarena sweep --preset quickstart" in out.stdout
    out = invoke("--format", "json")
    assert out.exit_code == 0 and json.loads(out.stdout) == [] and "quickstart" in out.stderr
    missing = tmp_path / "elsewhere" / "mlflow.db"
    missing.parent.mkdir()
    out = invoke("--tracking-uri", f"sqlite:///{missing}")
    assert out.exit_code == 0 and "kdarena sweep --preset quickstart" in out.stdout
    assert not missing.exists()  # reading never creates a store
    missing.write_bytes(b"")  # an empty file: still no store, and it stays untouched
    out = invoke("--tracking-uri", f"sqlite:///{missing}")
    assert out.exit_code == 0 and "quickstart" in out.stdout and missing.stat().st_size == 0


def test_every_run_of_a_sweep_names_its_data_by_label_fingerprint_and_mlflow_dataset(store):
    """Trial, final and train runs carry the dataset's identity; so does MLflow's own dataset record of each run."""
    from kdarena.training.record import Role, Tag
    from kdarena.zoo.data import load_dataset

    digits = load_dataset("digits")
    client = MlflowClient(store["tracking_uri"])
    student_runs = [r for r in store["client_runs"] if r.data.tags.get(Role.TAG) in Role.STUDENTS]
    assert {r.data.tags[Role.TAG] for r in student_runs} == {"trial", "final", "train"}
    for run in student_runs:
        assert run.data.tags[Tag.DATASET_LABEL] == "digits"
        assert run.data.tags[Tag.DATASET_FINGERPRINT] == digits.fingerprint
        [inp] = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert (inp.dataset.name, inp.dataset.digest) == ("digits", digits.fingerprint[:36])
    assert set(store["runs"]["dataset_fingerprint"]) == {digits.fingerprint}


def test_sweep_runs_carry_best_val_acc_the_teachers_scores_and_the_source_commit(store):
    """What the README promises of every student run, for a sweep's trial and final runs too."""
    from kdarena.training.record import Metric, Role, Status, Tag

    client = MlflowClient(store["tracking_uri"])
    runs = [r for r in store["client_runs"] if r.data.tags.get(Role.TAG) in (Role.TRIAL, Role.FINAL)
            and r.data.tags.get(Tag.STATUS) == Status.COMPLETED]
    assert runs
    for run in runs:
        history = [m.value for m in client.get_metric_history(run.info.run_id, Metric.VAL_ACC)]
        assert run.data.metrics[Metric.BEST_VAL_ACC] == max(history)
        assert 0 < run.data.metrics[Metric.TEACHER_TEST_ACC] <= 1 and 0 < run.data.metrics[Metric.TEACHER_VAL_ACC] <= 1
        assert len(run.data.tags[Tag.GIT_COMMIT]) == 40
