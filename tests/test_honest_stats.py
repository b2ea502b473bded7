"""Honest statistics: paired seeds, the spread and CI over seeds, the paired test against the student alone,
ties shown as ties, and one definition of "best" that the leaderboard and `kdarena export` share.

The statistics are checked against scipy and small synthetic run tables; the
rest against a real sweep on a real local Ray (one student, the student alone
and kd, final runs on three seeds) and conftest's `swept_store`.
"""

from __future__ import annotations

import json
import math
import random
import statistics

import pandas as pd
import pytest
import torch
import yaml
from scipy import stats as scipy_stats
from typer.testing import CliRunner

from kdarena.cli.app import app
from kdarena.leaderboards import board as lb_board
from kdarena.leaderboards import render as lb_render
from kdarena.leaderboards import runs as lb_runs
from kdarena.leaderboards.stats import best_first, paired_test, sample_std, t_interval, tied_ranks
from kdarena.methods import METHODS
from kdarena.methods.engine import training_loader
from kdarena.search.export import ranked_trials
from kdarena.search.phases import final_seeds
from kdarena.search.sweep_config import parse_sweep
from kdarena.training.build import build_distiller, make_model
from kdarena.training.config import parse_config
from kdarena.training.record import Tag

from helpers import sweep_workspace
from test_leaderboard import fake_runs

# -- the statistics, against scipy -------------------------------------------------------------------------------


def test_spread_and_interval_match_scipy_and_say_nothing_for_one_seed():
    rng = random.Random(0)
    for n in range(2, 9):
        values = [rng.uniform(0.8, 0.95) for _ in range(n)]
        assert sample_std(values) == pytest.approx(statistics.stdev(values))
        low, high = t_interval(values)
        ref = scipy_stats.t.interval(0.95, n - 1, loc=statistics.mean(values), scale=scipy_stats.sem(values))
        assert (low, high) == pytest.approx(ref)
    assert math.isnan(sample_std([0.9])) and math.isnan(sample_std([]))
    assert all(math.isnan(v) for v in t_interval([0.9]))


def test_paired_test_matches_scipy_over_the_shared_seeds_only():
    rng = random.Random(1)
    for n in range(2, 8):
        ours = {s: rng.uniform(0.8, 0.9) for s in range(n)}
        alone = {s: rng.uniform(0.8, 0.9) for s in range(n)}
        alone[99] = 0.1  # a seed only one side ran never enters the test
        test = paired_test(ours, alone)
        shared = sorted(ours)
        ref = scipy_stats.ttest_rel([ours[s] for s in shared], [alone[s] for s in shared])
        assert test.n == n and test.p_value == pytest.approx(ref.pvalue)
        assert test.diff == pytest.approx(statistics.mean(ours[s] - alone[s] for s in shared))
        assert test.distinguishable == (ref.pvalue < 0.05)
    one = paired_test({0: 0.9, 1: 0.8}, {1: 0.7, 2: 0.9})  # one shared seed: a difference, no test
    assert (one.n, one.diff) == (1, pytest.approx(0.1)) and math.isnan(one.p_value) and one.distinguishable is None
    none = paired_test({0: 0.9}, {1: 0.9})
    assert none.n == 0 and math.isnan(none.diff) and none.distinguishable is None
    same = paired_test({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})  # no difference at all: never distinguishable
    assert same.p_value == 1.0 and same.distinguishable is False


def test_best_is_val_acc_then_lower_macs_then_more_seeds_and_ties_share_a_rank():
    rows = [(0.90, 200.0, 1), (0.90, 100.0, 1), (0.90, 100.0, 3), (0.95, 900.0, 1), (math.nan, 1.0, 5),
            (0.90, math.nan, 9), (0.90, 100.0, 1)]
    ordered = sorted(rows, key=lambda r: best_first(*r))
    # a missing cost after any known one; no val_acc: last
    assert ordered == [rows[i] for i in (3, 2, 1, 6, 0, 5, 4)]
    assert tied_ranks([best_first(*r) for r in ordered]) == [1, 2, 3, 3, 5, 6, 7]
    assert tied_ranks(["a", "a", "b", "c", "c", "c"]) == [1, 1, 3, 4, 4, 4]


# -- the leaderboard over synthetic runs -----------------------------------------------------------------------


def test_rows_rank_by_val_acc_not_test_acc_and_picks_the_config_by_val_acc():
    runs = fake_runs([
        # at: the best test accuracy, the worst val_acc: ranks last
        {"method": "at", "role": "trial", "test_acc": 0.99, "val_acc": 0.70},
        {"method": "kd", "role": "trial", "test_acc": 0.80, "val_acc": 0.90},
        # fsp: two final configs; the one with the better mean val_acc stands, whatever its test accuracy
        {"method": "fsp", "role": "final", "config_key": "a", "test_acc": 0.95, "val_acc": 0.60, "seed": 0.0},
        {"method": "fsp", "role": "final", "config_key": "a", "test_acc": 0.95, "val_acc": 0.62, "seed": 1.0},
        {"method": "fsp", "role": "final", "config_key": "b", "test_acc": 0.70, "val_acc": 0.80, "seed": 0.0},
        {"method": "fsp", "role": "final", "config_key": "b", "test_acc": 0.72, "val_acc": 0.80, "seed": 1.0},
    ])
    board = lb_board.leaderboard(runs)
    assert board["method"].tolist() == ["kd", "fsp", "at"] and board["rank"].tolist() == [1, 2, 3]
    fsp = board.set_index("method").loc["fsp"]
    assert (fsp["test_acc_mean"], fsp["val_acc_mean"], fsp["n_seeds"]) == (pytest.approx(0.71), pytest.approx(0.8), 2)


def test_equal_keys_share_a_rank_and_the_table_shows_it():
    runs = fake_runs([
        {"method": "kd", "test_acc": 0.9861, "val_acc": 0.98},
        {"method": "dkd", "test_acc": 0.9861, "val_acc": 0.98},
        {"method": "at", "test_acc": 0.9861, "val_acc": 0.98},
        {"method": "fsp", "test_acc": 0.99, "val_acc": 0.97},
        {"method": "sp", "test_acc": 0.99, "val_acc": 0.98, "macs": 2000.0},  # as accurate, dearer: after the tie
    ])
    board = lb_board.leaderboard(runs)
    assert board["rank"].tolist() == [1, 1, 1, 4, 5] and board["method"].tolist() == ["at", "dkd", "kd", "sp", "fsp"]
    shown = [r["rank"] for r in lb_render.display_rows(board)]
    assert shown == ["=1", "=1", "=1", "4", "5"]
    assert "| =1 |" in lb_render.render(board, "markdown", "macs")
    rows = json.loads(lb_render.render(board, "json", "macs"))
    assert [r["rank"] for r in rows] == [1, 1, 1, 4, 5]


def test_one_seed_has_no_spread_and_repeated_seeds_count_once():
    runs = fake_runs([
        {"method": "kd", "role": "train", "test_acc": 0.80, "seed": 0.0},
        {"method": "kd", "role": "train", "test_acc": 0.82, "seed": 0.0},  # the same config on the same seed again
    ])
    row = json.loads(lb_render.render(lb_board.leaderboard(runs), "json", "macs"))[0]
    assert row["n_seeds"] == 1 and row["seeds"] == [0] and row["test_acc_mean"] == pytest.approx(0.82)
    for key in ("test_acc_std", "test_acc_ci_low", "test_acc_ci_high", "vs_student_diff", "vs_student_p",
                "distinguishable"):
        assert row[key] is None, key


def test_each_row_is_compared_with_the_student_alone_on_its_pair_even_when_filtered():
    runs = fake_runs([
        *({"method": "baseline", "role": "final", "test_acc": a, "seed": float(s)}
          for s, a in enumerate([0.80, 0.82, 0.81])),
        *({"method": "kd", "role": "final", "test_acc": a, "seed": float(s)} for s, a in enumerate([0.85, 0.86, 0.87])),
        # another student: no baseline of its own, so no comparison
        {"method": "kd", "student": "s2", "test_acc": 0.9},
        # the teacher-less `kdarena train` run of the student alone stands in for another teacher's sweep
        {"method": "baseline", "teacher": "", "student": "s3", "role": "train", "test_acc": 0.70, "seed": 0.0},
        {"method": "dkd", "teacher": "T2", "student": "s3", "test_acc": 0.75, "seed": 0.0},
    ])
    board = lb_board.leaderboard(runs, method="kd").set_index("student")  # the baseline rows are filtered out
    kd = board.loc["s1"]
    expected = scipy_stats.ttest_rel([0.85, 0.86, 0.87], [0.80, 0.82, 0.81]).pvalue
    assert kd["vs_student_diff"] == pytest.approx(0.05) and kd["vs_student_n"] == 3
    assert kd["vs_student_p"] == pytest.approx(expected) and kd["distinguishable"] == (expected < 0.05)
    assert (kd["test_acc_ci_low"], kd["test_acc_ci_high"]) == pytest.approx(t_interval([0.85, 0.86, 0.87]))
    alone = board.loc["s2"]
    assert math.isnan(alone["vs_student_diff"]) and alone["vs_student_n"] == 0 and alone["distinguishable"] is None
    dkd = lb_board.leaderboard(runs, method="dkd").iloc[0]
    assert dkd["vs_student_diff"] == pytest.approx(0.05) and dkd["vs_student_n"] == 1 and math.isnan(dkd["vs_student_p"])
    base = lb_board.leaderboard(runs, method="baseline")
    assert base["vs_student_diff"].isna().all() and base["distinguishable"].isna().all()


# -- paired seeds ------------------------------------------------------------------------------------------------


def _student_and_batches(method: str, seed: int, data, disturb: int) -> tuple[dict, list[torch.Tensor]]:
    torch.manual_seed(disturb)  # whatever ran before must not matter
    torch.rand(disturb + 1)
    cfg = parse_config({"teacher": {"arch": "cnn", "options": {"channels": 16}}, "method": {"name": method},
                        "student": {"arch": "cnn", "options": {"channels": 8}}, "train": {"seed": seed}})
    distiller = build_distiller(cfg, data, make_model(cfg.teacher, data, 0))
    loader = training_loader(distiller, data, cfg.train, torch.device("cpu"))
    order = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        order.append(torch.cat([b.indices for b in loader.batches()]))
    return {k: v.clone() for k, v in distiller.student.state_dict().items()}, order


def test_every_method_on_one_seed_starts_from_the_same_student_and_sees_the_same_batches(digits):
    reference, order = _student_and_batches("baseline", 5, digits, disturb=0)
    for i, method in enumerate(METHODS):
        state, seen = _student_and_batches(method, 5, digits, disturb=i + 1)
        assert state.keys() == reference.keys(), method
        assert all(torch.equal(state[k], reference[k]) for k in reference), method
        assert all(torch.equal(a, b) for a, b in zip(seen, order)), method
    other, other_order = _student_and_batches("kd", 6, digits, disturb=0)  # another seed: another pairing
    assert not all(torch.equal(other[k], reference[k]) for k in reference)
    assert not torch.equal(other_order[0], order[0]) and not torch.equal(order[0], order[1])


# -- a real sweep: final runs on paired seeds, the leaderboard's statistics, export's best --------------------------

PAIRED = {
    "name": "paired",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 2}},
    "students": [{"arch": "cnn", "options": {"channels": 4}}],
    "methods": {"baseline": {}, "kd": {}},
    "budget": {"trials_per_method": 2, "epochs": 2, "grace_period": 2},
    "final": {"seeds": 3},
    "train": {"seed": 7},
}


@pytest.fixture(scope="module")
def paired_sweep(tmp_path_factory) -> dict:
    from kdarena.search.sweep import run_sweep

    work = tmp_path_factory.mktemp("paired")
    with sweep_workspace(work) as uri:
        (work / "paired.yaml").write_text(yaml.safe_dump(PAIRED))
        outcome = run_sweep(parse_sweep(PAIRED, "paired.yaml"), PAIRED)
    return {"tracking_uri": uri, "sweep_dir": outcome.paths.root}


def test_final_runs_of_every_method_use_one_seed_list(paired_sweep):
    records = json.loads((paired_sweep["sweep_dir"] / "records.json").read_text())
    seeds: dict[str, list[int]] = {}
    for r in records["trials"].values():
        if r["phase"] == "final":
            seeds.setdefault(r["method"], []).append(r["config"]["train"]["seed"])
    expected = final_seeds(parse_sweep(PAIRED, "paired.yaml"), 3)
    assert expected == [7, 8, 9]
    assert {m: sorted(s) for m, s in seeds.items()} == {"baseline": expected, "kd": expected}


def test_leaderboard_json_carries_the_ci_and_the_paired_difference_for_multi_seed_rows(paired_sweep):
    out = CliRunner().invoke(app, ["leaderboard", "--tracking-uri", paired_sweep["tracking_uri"], "--format", "json",
                                   "--no-references"])
    assert out.exit_code == 0, out.output
    rows = {r["method"]: r for r in json.loads(out.stdout)}
    runs = lb_runs.load_runs(paired_sweep["tracking_uri"])
    finals = runs[runs["role"] == "final"]
    accs = {m: dict(zip(g["seed"].astype(int), g["test_acc"])) for m, g in finals.groupby("method")}
    for method in ("baseline", "kd"):
        row = rows[method]
        values = [accs[method][s] for s in (7, 8, 9)]
        assert row["source"] == "final" and row["n_seeds"] == 3 and row["seeds"] == [7, 8, 9]
        assert row["test_acc_std"] == pytest.approx(statistics.stdev(values))
        assert [row["test_acc_ci_low"], row["test_acc_ci_high"]] == pytest.approx(
            scipy_stats.t.interval(0.95, 2, loc=statistics.mean(values), scale=scipy_stats.sem(values)))
    kd, alone = rows["kd"], rows["baseline"]
    diffs = [accs["kd"][s] - accs["baseline"][s] for s in (7, 8, 9)]
    assert kd["vs_student_n"] == 3 and kd["vs_student_diff"] == pytest.approx(statistics.mean(diffs))
    if any(d != diffs[0] for d in diffs):  # equal differences: scipy's t is 0/0, ours its limit
        expected = scipy_stats.ttest_rel([accs["kd"][s] for s in (7, 8, 9)], [accs["baseline"][s] for s in (7, 8, 9)])
        assert kd["vs_student_p"] == pytest.approx(expected.pvalue)
    assert kd["distinguishable"] == (kd["vs_student_p"] < 0.05)
    assert alone["vs_student_diff"] is None and alone["distinguishable"] is None
    table = CliRunner().invoke(app, ["leaderboard", "--tracking-uri", paired_sweep["tracking_uri"], "--no-references"])
    assert "(3 seeds)" in table.stdout and "95 % confidence interval" in table.stdout
    assert ("≈" in table.stdout) == (not kd["distinguishable"])


def _leaderboard_best(uri: str, sweep: str):
    runs = lb_runs.load_runs(uri)
    board = lb_board.leaderboard(runs[runs["sweep"] == sweep])
    return runs.set_index("run_id"), board[board["rank"] == 1]


@pytest.mark.parametrize("which", ["paired", "swept"])
def test_export_names_the_leaderboards_best(which, paired_sweep, swept_store):
    """The same sweep's best, by the same key: the point export writes is the point the leaderboard's top row ran."""
    store = paired_sweep if which == "paired" else swept_store
    _, entries = ranked_trials(store["sweep_dir"], None)
    best = entries[0]
    runs, top = _leaderboard_best(store["tracking_uri"], which)
    exported = runs.loc[best["mlflow_run_id"]]
    matches = [row for row in top.to_dict("records")
               if row["method"] == best["method"] and row["student"] == exported["student"]
               and runs.loc[row["run_id"], "searched"] == exported["searched"]]
    assert len(matches) == 1, (best, top[["method", "student", "val_acc_mean", "n_seeds"]])
    row = matches[0]
    assert row["val_acc_mean"] == pytest.approx(best["val_acc_mean"]) and row["n_seeds"] == best["n_seeds"]
    if which == "paired":
        assert best["n_seeds"] == 3 and row["source"] == "final"


def test_export_and_leaderboard_agree_when_the_best_trial_regresses_on_its_finals_and_keys_tie(tmp_path):
    """One sweep told twice, as export reads it (records.json) and as the leaderboard does (run rows).

    kd's best trial (val_acc .95) averages .91 on its finals, below the
    student alone's .93 over two seeds: the student alone is the best, for
    both; kd's second trial stands behind kd's finals; dkd and another kd tie
    on every key and share a rank, export taking the earlier.
    """
    from kdarena.search.points import Describe, final_point

    doc = PAIRED | {"name": "ties", "methods": {"baseline": {}, "kd": {}, "dkd": {}}, "final": {"seeds": 2},
                    "students": [{"arch": "cnn", "options": {"channels": 4}}, {"arch": "cnn", "options": {"channels": 8}}]}
    sweep = parse_sweep(doc, "ties.yaml")
    describe = Describe(sweep.model_dump(mode="json"))
    macs = {0: 100.0, 1: 200.0}
    # name, method, student, lr, val_acc, final val_accs (seeds 7, 8)
    story = [("A", "kd", 0, 0.1, 0.95, [0.90, 0.92]), ("B", "kd", 0, 0.2, 0.94, []),
             ("C", "baseline", 0, 0.1, 0.93, [0.93, 0.93]), ("D", "dkd", 1, 0.1, 0.93, []),
             ("E", "kd", 1, 0.3, 0.93, [])]
    trials, rows = {}, []
    for t, (name, method, student, lr, val, finals) in enumerate(story):
        point = {"method": method, "student": student, method: {"lr": lr, "weight_decay": 1e-4}}
        runs = [("trial", point, 7, val)] + [("final", final_point(point, 7 + i), 7 + i, v) for i, v in enumerate(finals)]
        for i, (phase, trial_config, seed, v) in enumerate(runs):
            config, tags = describe(trial_config)
            key = f"{phase}/{name}{i}"
            trials[key] = {"key": key, "trial_name": f"{name}{i}", "phase": phase, "method": method,
                           "trial_config": trial_config, "student": config["student"], "config": config, "tags": tags,
                           "status": "completed", "run_id": key, "started": 1000.0 + t + i / 10,
                           "metrics": {"val_acc": v, "test_acc": 0.5, "macs": macs[student], "epochs_completed": 2}}
            rows.append({"run_id": key, "role": phase, "method": method, "student": tags[Tag.STUDENT_LABEL],
                         "val_acc": v, "macs": macs[student], "seed": float(seed), "config_key": name,
                         "start_time": pd.Timestamp(1000 + t + i / 10, unit="s", tz="UTC")})
    folder = tmp_path / "ties"
    folder.mkdir()
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep.model_dump(mode="json")))
    (folder / "records.json").write_text(json.dumps({"parent_run_id": "p", "trials": trials}))

    _, entries = ranked_trials(folder, 10)
    assert [e["trial"] for e in entries] == ["C0", "D0", "E0", "A0", "B0"]
    assert [(e["val_acc_mean"], e["n_seeds"]) for e in entries[:4]] == \
        [(0.93, 2), (0.93, 1), (0.93, 1), (pytest.approx(0.91), 2)]
    board = lb_board.leaderboard(fake_runs(rows))
    assert board["rank"].tolist() == [1, 2, 2, 4]
    export_order = [(e["method"], trials[e["mlflow_run_id"]]["tags"][Tag.STUDENT_LABEL]) for e in entries[:4]]
    assert export_order == list(zip(board["method"], board["student"]))
    assert ranked_trials(folder, None)[1][0]["trial"] == "C0"  # export's best: the leaderboard's rank 1
