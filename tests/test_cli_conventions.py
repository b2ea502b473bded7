"""The conventions a command line is expected to keep: --version, -h, shell completion, enumerated options listed
and matched whatever their case, --json wherever data is printed, tables that never cut a figure, a leaderboard
that shows published rows for the datasets one has, a multi-document export that `kdarena train` reads, a quick
`kdarena models`, progress lines off a terminal, and a sweep read back with Ray Tune's own `ResultGrid`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from enum import Enum
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import typer
import yaml
from rich.console import Console
from typer.testing import CliRunner

from kdarena.cli.app import app
from kdarena.cli.progress import ProgressLines
from kdarena.leaderboards import board as lb_board
from kdarena.leaderboards.references import published, reference_rows
from kdarena.leaderboards.text import LEGEND, accuracy_text
from kdarena.methods.engine import EpochResult

from helpers import unboxed

# the commands that print data, each with --json (`dashboard` serves, `sync` reports one line)
DATA_COMMANDS = ("train", "sweep", "export", "leaderboard", "models", "methods", "recommend")


def cli(*args: str, **options):
    return CliRunner().invoke(app, list(args), **options)


def test_version_and_short_help():
    for flag in ("--version", "-V"):
        result = cli(flag)
        assert result.exit_code == 0 and result.stdout == f"kdarena {version('kdarena')}\n"
    assert cli("-h").stdout == cli("--help").stdout and "leaderboard" in cli("-h").stdout
    assert cli("leaderboard", "-h").stdout == cli("leaderboard", "--help").stdout
    # the installed entry point, as a shell runs it
    done = subprocess.run([sys.executable, "-m", "kdarena.cli", "-V"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"kdarena {version('kdarena')}"


def test_shell_completion_script_and_completions():
    import os

    kdarena = str(Path(sys.executable).parent / "kdarena")
    # typer detects the shell from the parent processes, which a test runner need not have; its own switch makes
    # --show-completion take the shell's name instead
    script = subprocess.run([kdarena, "--show-completion", "bash"], capture_output=True, text=True, timeout=120,
                            env=os.environ | {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert script.returncode == 0 and "complete -o default -F _kdarena_completion kdarena" in script.stdout

    def completions(words: str) -> list[str]:
        env = os.environ | {"_KDARENA_COMPLETE": "complete_bash", "COMP_WORDS": words,
                            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        return subprocess.run([kdarena], env=env, capture_output=True, text=True, timeout=120).stdout.split()

    assert completions("kdarena lea") == ["leaderboard"]
    assert completions("kdarena leaderboard --by ") == ["macs", "params", "latency"]


def _enumerated_options() -> list[tuple[str, str, list[str], bool]]:
    """(command, parameter, its values, case-sensitive?) of every option whose type is an Enum."""
    from typing import get_args, get_type_hints

    found = []
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        for param, hint in get_type_hints(command.callback, include_extras=True).items():
            if param == "return" or not hasattr(hint, "__metadata__"):
                continue
            kinds = [k for k in get_args(get_args(hint)[0]) or (get_args(hint)[0],) if k is not type(None)]
            if isinstance(kinds[0], type) and issubclass(kinds[0], Enum):
                option = next(i for i in hint.__metadata__ if isinstance(i, typer.models.OptionInfo))
                found.append((name, param, [e.value for e in kinds[0]], option.case_sensitive))
    return found


def test_every_enumerated_option_lists_its_choices_and_ignores_case():
    found = _enumerated_options()
    assert {(n, p) for n, p, _, _ in found} >= {("leaderboard", "by"), ("leaderboard", "fmt"),
                                                ("leaderboard", "references"), ("export", "fmt"), ("recommend", "fmt")}
    for name, param, values, case_sensitive in found:
        assert case_sensitive is False, (name, param)
        assert "<" + "|".join(values) + ">" in cli(name, "-h", env={"COLUMNS": "200"}).stdout, (name, param)


def test_every_command_that_prints_data_takes_json():
    for name in DATA_COMMANDS:
        assert "--json" in cli(name, "-h", env={"COLUMNS": "200"}).stdout, name


def test_leaderboard_choices_ignore_case_and_json_is_format_json(swept_store):
    uri = swept_store["tracking_uri"]
    plain = cli("leaderboard", "--tracking-uri", uri, "--format", "json", "--by", "params")
    assert plain.exit_code == 0, plain.output
    for args in (["--json", "--by", "PARAMS"], ["--format", "JSON", "--by", "Params"]):
        shouted = cli("leaderboard", "--tracking-uri", uri, *args)
        assert shouted.exit_code == 0, shouted.output
        assert json.loads(shouted.stdout) == json.loads(plain.stdout)
    refused = cli("leaderboard", "--tracking-uri", uri, "--by", "joules")
    assert refused.exit_code == 2 and refused.stdout == ""
    assert "'joules' is not one of 'macs', 'params', 'latency'" in unboxed(refused.stderr)


def test_export_and_recommend_take_json(swept_store, monkeypatch):
    monkeypatch.chdir(swept_store["work"])
    sweep_dir = str(swept_store["sweep_dir"])
    by_format = cli("export", sweep_dir, "--format", "json", "--top", "2")
    assert by_format.exit_code == 0, by_format.output
    assert cli("export", sweep_dir, "--json", "--top", "2").stdout == by_format.stdout
    assert len(json.loads(by_format.stdout)) == 2
    clash = cli("export", sweep_dir, "--json", "--format", "YAML")
    assert clash.exit_code == 2 and "--json and --format yaml contradict each other" in unboxed(clash.stderr)
    uri = swept_store["tracking_uri"]
    answer = cli("recommend", "--dataset", "digits", "--json", "--tracking-uri", uri)
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.stdout) == json.loads(cli("recommend", "--dataset", "digits", "--format", "Json",
                                                       "--tracking-uri", uri).stdout)


def test_published_rows_follow_the_datasets_we_have_runs_of():
    ours = pd.DataFrame({"dataset_label": ["cifar100"]})
    everything = reference_rows()
    assert set(published(ours, "auto")["dataset"]) == {"cifar100"}
    assert len(published(ours, "all")) == len(everything) and published(ours, "none").empty
    nothing_of_ours = ours.iloc[0:0]
    assert published(nothing_of_ours, "auto").empty
    # a dataset asked for by name shows its published rows, runs or not
    assert set(published(nothing_of_ours, "auto", dataset="mnist")["dataset"]) == {"mnist"}


def test_leaderboard_references_modes_on_a_store(swept_store):
    uri = swept_store["tracking_uri"]

    def reported(*args: str) -> set[str]:
        result = cli("leaderboard", "--tracking-uri", uri, "--json", *args)
        assert result.exit_code == 0, result.output
        return {r["dataset"] for r in json.loads(result.stdout) if r["reported"]}

    assert reported() == set()  # digits only: nothing published for it, and no other dataset's 100+ rows
    assert reported("--references", "all") >= {"cifar100", "mnist", "svhn"}
    assert reported("--references", "none", "--dataset", "digits") == set() == reported("--no-references")
    assert reported("--dataset", "mnist") == {"mnist"}
    text = cli("leaderboard", "--tracking-uri", uri, env={"COLUMNS": "300"}).stdout
    assert "digits" in text and "cifar100" not in text and "reported" not in text


@pytest.mark.parametrize("columns", [80, 100])
def test_narrow_tables_drop_columns_and_never_cut_a_figure(swept_store, columns):
    uri = swept_store["tracking_uri"]
    from kdarena.leaderboards.runs import load_runs

    board = lb_board.leaderboard(load_runs(uri))
    result = cli("leaderboard", "--tracking-uri", uri, "--references", "all", env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    table = result.stdout.split(LEGEND)[0]  # the legend after the tables is one line the terminal wraps
    assert "…" not in table
    assert max(len(line) for line in table.splitlines()) <= columns
    for row in board.to_dict("records"):  # every accuracy whole, on one line
        assert accuracy_text(row) in table
    note = unboxed(result.stdout).split(f"Not shown at {columns} columns: ")[1]
    assert "key hyper-parameters" in note and "source" in note and "MACs" not in note  # never the front's axis
    wide = cli("leaderboard", "--tracking-uri", uri, env={"COLUMNS": "300"}).stdout
    assert "Not shown" not in wide and "key hyper-parameters" in wide
    # narrower than the fewest columns: the rows run longer than the width (a terminal wraps them), figures whole
    narrowest = cli("leaderboard", "--tracking-uri", uri, env={"COLUMNS": "30"}).stdout
    assert "…" not in narrowest and all(accuracy_text(row) in narrowest for row in board.to_dict("records"))


def test_train_reads_a_multi_document_export_and_says_it_trains_the_first(swept_store, migrated_store, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("KDARENA_CACHE", str(swept_store["work"] / "cache"))  # the sweep's teacher, found by hash
    exported = cli("export", str(swept_store["sweep_dir"]), "--top", "2")
    assert exported.exit_code == 0, exported.output
    first, second = exported.stdout.split("---\n")
    assert "# re-run: kdarena train THIS_FILE (it trains this first config)" in first
    assert "# re-run: this config alone in a file, then kdarena train FILE" in second
    path = tmp_path / "f.yaml"
    path.write_text(exported.stdout)
    result = cli("train", str(path), "--json", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"{path} holds 2 configs; training the first" in unboxed(result.stderr)
    summary = json.loads(result.stdout)
    best = yaml.safe_load(first)
    assert (summary["method"], summary["student"]) == (best["method"]["name"], best["student"]["arch"])
    assert not summary["teacher_trained_now"]
    # off a terminal the training reports in lines; the last says it is done
    epochs = best["train"]["epochs"]
    assert f"epoch {epochs}/{epochs}" in result.stderr and "done" in result.stderr
    # -o FILE now writes the same multi-document file rather than refusing
    written = cli("export", str(swept_store["sweep_dir"]), "--top", "2", "-o", str(tmp_path / "g.yaml"))
    assert written.exit_code == 0
    assert list(yaml.safe_load_all((tmp_path / "g.yaml").read_text())) == list(yaml.safe_load_all(exported.stdout))


def test_progress_lines_every_few_seconds_with_an_eta():
    import io

    now = [0.0]
    buffer = io.StringIO()
    lines = ProgressLines(Console(file=buffer, width=200), every=10.0, clock=lambda: now[0])
    calls = lines.callbacks()
    calls.start("teacher cnn", 4, 10)
    for step in range(1, 11):  # one epoch of 10 batches over 20 s: a line at 10 s and at 20 s
        now[0] = 2.0 * step
        calls.batch(step, 10)
    result = EpochResult(epoch=0, losses={}, train_acc=0.5, val_acc=0.5, lr=0.1, seconds=20.0)
    calls.epoch("teacher cnn", result)  # 1 of 4 epochs in 20 s: 60 s to go
    for _ in range(3):
        calls.epoch("teacher cnn", result)  # the last epoch always prints
    out = buffer.getvalue().splitlines()
    assert out[0] == "teacher cnn: epoch 0/4, 10s elapsed, ETA 1m10s"
    assert out[1] == "teacher cnn: epoch 0/4, 20s elapsed, ETA 1m00s"
    assert out[-1] == "teacher cnn: epoch 4/4, val_acc 50.0%, 20s elapsed, done"
    assert len(out) == 3  # nothing between: the clock stood still


def test_the_sweeps_live_view_shows_the_teacher_training_with_an_eta():
    import io

    from kdarena.cli.sweep_view import SweepView

    buffer = io.StringIO()
    console = Console(file=buffer, width=160, force_terminal=True, color_system=None)
    with SweepView(console, total_trials=6) as view:
        calls = view.callbacks()
        calls.start("teacher cnn", 4, 0)
        calls.batch(5, 10)
        calls.epoch("teacher cnn", EpochResult(epoch=0, losses={}, train_acc=0.5, val_acc=0.625, lr=0.1, seconds=2.0))
    last = buffer.getvalue().rsplit("teacher cnn", 1)[1]  # the view as it stood when it closed
    assert last.startswith(": epochs") and "1/4" in last.splitlines()[0] and "val_acc 62.5%" in last
    assert "ETA" in last.splitlines()[0] and "batches" in last and "5/10" in last
    assert "0/6" in last  # the trials' bar below it


def test_models_answers_from_its_cache(cache_env):
    from kdarena.zoo.catalog import catalog_path

    first = cli("models", "--json")
    assert first.exit_code == 0 and catalog_path().is_file()
    assert str(catalog_path()).startswith(str(cache_env))
    start = time.perf_counter()
    again = cli("models", "--json")
    assert time.perf_counter() - start < 2.0
    assert json.loads(again.stdout) == json.loads(first.stdout)
    catalog_path().write_text("{damaged")  # a damaged cache is profiled again, never shown
    assert json.loads(cli("models", "--json").stdout) == json.loads(first.stdout)


def test_a_sweep_reads_back_with_ray_tunes_result_grid(swept_store):
    """The README's recipe: `tune.Tuner.restore(SWEEP_DIR/ray/search, trainable=run_trial).get_results()`."""
    from ray import tune

    from kdarena.search.trial import run_trial

    records = json.loads((Path(swept_store["sweep_dir"]) / "records.json").read_text())["trials"]
    grid = tune.Tuner.restore(str(Path(swept_store["sweep_dir"]) / "ray" / "search"), trainable=run_trial).get_results()
    searched = {k: r for k, r in records.items() if r["phase"] == "trial"}
    assert len(grid) == len(searched) and grid.num_errors == 0
    for result in grid:
        record = searched[f"trial/{result.metrics['trial_id']}"]
        assert result.config == record["trial_config"]
        assert result.metrics["val_acc"] == pytest.approx(record["last_result"]["val_acc"])
    best = grid.get_best_result(metric="val_acc", mode="max")
    assert best.metrics["val_acc"] == max(r["last_result"]["val_acc"] for r in searched.values())
    frame = grid.get_dataframe()
    assert {"val_acc", "config/method"} <= set(frame.columns)


def test_sweep_json_and_the_teachers_progress_off_a_terminal(local_ray, migrated_store, tmp_path):
    doc = {"name": "tiny", "dataset": {"name": "digits"},
           "teacher": {"arch": "cnn", "options": {"channels": 8}, "recipe": {"epochs": 2}},
           "students": [{"arch": "cnn", "options": {"channels": 4}}], "methods": {"kd": {}},
           "budget": {"trials_per_method": 2, "epochs": 1}, "final": {"seeds": 1}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(doc))
    result = cli("sweep", "tiny.yaml", "--json", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # nothing else on stdout
    records = json.loads((tmp_path / "kdarena-sweeps" / "tiny" / "records.json").read_text())
    assert summary["sweep"] == "tiny" and summary["parent_run_id"] == records["parent_run_id"]
    kd = summary["methods"]["kd"]
    best = next(r for r in records["trials"].values() if r["run_id"] == kd["run_id"])
    assert kd["metrics"]["val_acc"] == best["metrics"]["val_acc"] and kd["final"]["n"] == 1
    assert kd["student"] == "cnn(channels=4)" and summary["no_full_budget_trial"] == []
    # the teacher trained first, reporting in lines on stderr
    assert "teacher cnn: epoch 2/2" in result.stderr and "done" in result.stderr
