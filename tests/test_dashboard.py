"""The Streamlit dashboard, page by page, with `streamlit.testing.v1.AppTest` against a real sweep's MLflow store.

Each page runs in-process (no browser, no server): the Leaderboard's filters,
its table and its Pareto marks (checked by brute force on the table shown),
the Sweeps page on a sweep with diverged and early-stopped trials, the Run
page's config download (re-run with `kdarena train`), the empty state, and
that no page ever writes to the store. `kdarena dashboard`'s argument
errors are here too; serving it in a real browser is test_dashboard_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import yaml
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

import kdarena.dashboard
from kdarena.leaderboards import board as lb_board
from kdarena.leaderboards import references as lb_refs
from kdarena.leaderboards import runs as lb_runs
from kdarena.leaderboards.render import QUICKSTART_COMMAND as QUICKSTART
from kdarena.leaderboards.text import rank_labels
from kdarena.dashboard.views.charts import MIN_FANOVA_TRIALS, leaderboard_figure, method_colours
from kdarena.cli.app import app as cli
from kdarena.training.config import parse_config
from kdarena.methods import METHODS
from kdarena.search.export import ranked_trials
from kdarena.training.config import config_yaml

APP = str(Path(kdarena.dashboard.__file__).with_name("app.py"))
TIMEOUT = 120  # the first page of a session imports MLflow and plotly


def _app(uri: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("KDARENA_TRACKING_URI", uri)
    return AppTest.from_file(APP, default_timeout=TIMEOUT)


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def _table(at: AppTest) -> pd.DataFrame:
    return at.dataframe[0].value


def _brute_pareto(acc: list[float], cost: list[float]) -> list[bool]:
    """On the front iff no other row is at least as accurate and as cheap, and strictly better in one."""
    return [not any(acc[j] >= acc[i] and cost[j] <= cost[i] and (acc[j] > acc[i] or cost[j] < cost[i])
                    for j in range(len(acc)) if j != i) for i in range(len(acc))]


def _check_pareto(table: pd.DataFrame, cost: str) -> None:
    for _, group in table.groupby("teacher"):
        expected = _brute_pareto(group["test_acc_mean"].tolist(), group[cost].tolist())
        assert group["pareto"].tolist() == expected, group[["method", "student", "test_acc_mean", cost, "pareto"]]


def _plain(value):
    """Plotly's JSON packs arrays as {"dtype", "bdata": base64}: back to lists."""
    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
            return array.reshape(value["shape"]).tolist() if "shape" in value else array.tolist()
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _chart(at: AppTest, index: int = 0) -> go.Figure:
    return go.Figure(_plain(json.loads(at.get("plotly_chart")[index].proto.spec)), skip_invalid=True)


@pytest.fixture()
def swept_app(swept_store: dict, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    return _app(swept_store["tracking_uri"], monkeypatch)


def test_leaderboard_ranks_filters_and_marks_the_pareto_front(swept_app: AppTest, swept_store: dict):
    at = _ok(swept_app.run())
    assert at.title[0].value == "Leaderboard"
    table = _table(at)
    expected = lb_board.leaderboard(lb_runs.load_runs(swept_store["tracking_uri"]), dataset="digits")
    assert table["run_id"].tolist() == expected["run_id"].tolist()
    # ranked by val_acc; a rank two rows share reads =N
    assert table["rank"].tolist() == rank_labels(expected["rank"].tolist(), expected["dataset"].tolist())
    assert {"kd", "baseline"} <= set(table["method"]) and "fitnets" not in set(table["method"])  # diverged: never ranks
    assert (table["val_acc_mean"].diff().dropna() <= 0).all()  # percent, best first
    # rows not shown to differ from the student alone are marked; the student alone is the reference
    for shown, row in zip(table["vs_alone"], expected.to_dict("records")):
        if row["method"] == "baseline" or row["vs_student_n"] == 0:
            assert shown == "—"
        else:
            assert shown.startswith("≈") == (row["distinguishable"] is not True), (shown, row)
            assert f"{100 * row['vs_student_diff']:+.2f}" in shown
    _check_pareto(table, "macs")

    # the chart marks exactly the table's Pareto rows (stars) and draws the front through them
    fig = _chart(at)
    stars = {d[0] for t in fig.data if t.mode == "markers" and not t.name.endswith("(published)")
             for d, s in zip(t.customdata, t.marker.symbol) if s == "star"}
    assert stars == set(table.loc[table["pareto"], "run_id"])
    front = [t for t in fig.data if t.name == "Pareto front"]
    assert len(front) == 1 and len(front[0].x) == int(table["pareto"].sum())
    assert fig.layout.xaxis.type == "log"

    at.selectbox(key="lb_method").set_value("baseline").run()
    filtered = _table(_ok(at))
    assert 0 < len(filtered) < len(table) and set(filtered["method"]) == {"baseline"}
    _check_pareto(filtered, "macs")

    at.selectbox(key="lb_method").set_value("All").run()
    at.radio(key="lb_axis").set_value("params").run()
    _check_pareto(_table(_ok(at)), "params")
    assert "parameters" in _chart(at).layout.xaxis.title.text

    at.number_input(key="lb_max_macs").set_value(float(table["macs"].min()) - 1).run()
    assert not at.dataframe and any("None of our students matches" in i.value for i in _ok(at).info)
    at.number_input(key="lb_max_macs").set_value(None).run()
    assert len(_table(_ok(at))) == len(table)

    # a dataset we never ran: its published results alone, hollow, and the page says so
    published = sorted(set(lb_refs.reference_rows()["dataset"]) - {"digits"})
    assert published, "leaderboards/ holds published results"
    at.selectbox(key="lb_dataset").set_value(published[0]).run()
    assert any("published results" in i.value for i in _ok(at).info)
    fig = _chart(at)
    assert fig.data and all(t.marker.symbol == "circle-open" for t in fig.data)
    at.selectbox(key="lb_dataset").set_value("digits").run()

    # opening a run from the leaderboard lands on the Run page with that run
    chosen = at.selectbox(key="lb_open").value
    at.button(key="lb_open_button").click().run()
    assert _ok(at).title[0].value == "Run" and at.query_params["run"] == chosen


def test_leaderboard_figure_draws_references_hollow_and_the_front_in_cost_order():
    board = pd.DataFrame({"method": ["kd", "kd", "baseline", "at"], "student": ["a", "b", "c", "d"],
                          "teacher": ["t"] * 4, "test_acc_mean": [0.9, 0.8, 0.85, 0.7], "test_acc_std": [0.01, 0, 0, 0],
                          "n_seeds": [2, 1, 1, 1], "macs": [400.0, 100.0, 300.0, 200.0], "key_hparams": [""] * 4,
                          "run_id": ["r1", "r2", "r3", "r4"], "pareto": [True, True, False, False]})
    refs = pd.DataFrame({"method": ["kd", "kd"], "student": ["p", "q"], "teacher": ["T", "T"],
                         "test_acc_mean": [0.75, 0.8], "macs": [1e6, float("nan")], "source": ["paper", "paper"]})
    fig = leaderboard_figure(board, refs, "macs", method_colours(["kd", "baseline", "at"]))
    front = next(t for t in fig.data if t.name == "Pareto front")
    stars = sorted((x, y) for t in fig.data if t.mode == "markers" and not t.name.endswith("(published)")
                   for x, y, symbol in zip(t.x, t.y, t.marker.symbol) if symbol == "star")
    assert [p for xy in zip(front.x, front.y) for p in xy] == pytest.approx([p for xy in stars for p in xy])
    assert list(front.y) == pytest.approx([80.0, 90.0])  # cheapest first: r2 (100 MACs), then r1 (400)
    assert front.x[0] == pytest.approx(100, rel=0.03) and front.x[1] == pytest.approx(400, rel=0.03)
    published = [t for t in fig.data if t.name.endswith("(published)")]
    assert len(published) == 1 and published[0].marker.symbol == "circle-open" and len(published[0].x) == 1
    ours_kd = next(t for t in fig.data if t.name == "kd")
    assert published[0].marker.color == ours_kd.marker.color


def test_sweeps_page_shows_history_importances_and_failed_trials(swept_app: AppTest, swept_store: dict):
    at = swept_app.run()
    at.switch_page("views/sweeps.py").run()
    _ok(at)
    assert at.title[0].value == "Sweeps" and at.selectbox(key="sw_name").value == "swept"
    counts = {m.label: int(m.value) for m in at.metric}
    assert counts["trials"] == 9 and counts["diverged"] >= 1 and counts["trials"] == (
        counts["completed"] + counts["early-stopped"] + counts["diverged"] + counts["failed"])
    names = " ".join(t.name for t in _chart(at, 0).data)
    assert "diverged" in names and "best so far" in names
    if counts["early-stopped"]:
        assert "early-stopped" in names
    assert any("never rank" in w.value and "non-finite" in w.value for w in at.warning)
    trials = _table(at)
    assert len(trials) == 9 and set(trials["status"]) >= {"completed", "diverged"}
    assert trials.loc[trials["status"] == "diverged", "reason"].str.contains("non-finite").all()

    for method in at.selectbox(key="sw_method").options:  # fitnets: every trial diverged
        at.selectbox(key="sw_method").set_value(method).run()
        _ok(at)
        kinds = {t.type for i in range(len(at.get("plotly_chart"))) for t in _chart(at, i).data}
        assert "parcoords" in kinds
        if method == "kd":  # three scored trials with differing values: too few for fANOVA's forest, so Spearman
            (how,) = [c.value for c in at.caption if "scored trials" in c.value]
            scored = trials[(trials["method"] == "kd") & trials["val_acc"].notna()]
            assert len(scored) < MIN_FANOVA_TRIALS
            assert how.startswith(f"|Spearman ρ| with val_acc over {len(scored)} scored trials"), how
            assert "bar" in kinds


def _importance_trials(n: int) -> pd.DataFrame:
    """n scored kd trials whose val_acc follows the temperature alone; alpha is noise."""
    rng = np.random.default_rng(n)
    temperature, alpha = rng.uniform(1, 20, n), rng.uniform(0, 1, n)
    return pd.DataFrame({"val_acc": 0.5 + 0.02 * temperature, "method": "kd",
                         "searched": [{"kd/temperature": float(t), "kd/alpha": float(a)}
                                      for t, a in zip(temperature, alpha)]})


def test_importances_are_fanova_from_enough_trials_and_spearman_below():
    """README: fANOVA over the trials, |Spearman ρ| when there are too few, and the caption says which."""
    from kdarena.dashboard.views.charts import param_importances

    few, how = param_importances(_importance_trials(MIN_FANOVA_TRIALS - 1))
    assert how == f"|Spearman ρ| with val_acc over {MIN_FANOVA_TRIALS - 1} scored trials"
    assert few["temperature"] == pytest.approx(1.0)  # val_acc rises with it, rank for rank
    many, how = param_importances(_importance_trials(MIN_FANOVA_TRIALS))
    assert how == f"fANOVA (Optuna) over {MIN_FANOVA_TRIALS} scored trials"
    # fANOVA's importances are shares of the variance: they sum to 1, and the temperature explains nearly all
    assert many.sum() == pytest.approx(1.0) and many["temperature"] > 0.8 > many["alpha"]


@pytest.fixture()
def download_capture(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """The bytes behind each st.download_button, by media file id (AppTest serves no files)."""
    files: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def capture(self, path_or_data, mimetype, kind, filename=None):
        file_id = original(self, path_or_data, mimetype, kind, filename)
        files[file_id] = path_or_data if isinstance(path_or_data, bytes) else Path(path_or_data).read_bytes()
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", capture)
    return files


@pytest.mark.slow
def test_run_page_download_is_the_exported_config_and_trains(swept_app: AppTest, swept_store: dict,
                                                              download_capture: dict[str, bytes], migrated_store,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _, entries = ranked_trials(swept_store["sweep_dir"], 100)
    # the best trial that distils from the teacher (a baseline trial may rank first; it has no teacher to pin)
    best = next(e for e in entries if METHODS[e["method"]].needs_teacher)
    at = swept_app
    at.query_params["run"] = best["mlflow_run_id"]
    at.run()
    at.switch_page("views/run.py").run()
    _ok(at)
    assert at.title[0].value == "Run" and best["mlflow_run_id"] in at.caption[0].value
    labels = {m.label: m.value for m in at.metric}
    assert labels["MACs"] == f"{int(best['macs']):,}" and labels["test acc"] == f"{100 * best['test_acc']:.2f}%"
    assert any(len(c.value) == 64 for c in at.code)  # the teacher's sha256
    [button] = at.download_button
    data = download_capture[Path(button.proto.url).stem]
    assert data == _artifact_path(swept_store, best["mlflow_run_id"]).read_bytes()  # the run's own artifact, byte for byte
    # the config `kdarena export` writes for this trial. Same document; the key order of free-form maps
    # (method.params) can differ, because export reads records.json, which is saved with sorted keys
    assert yaml.safe_load(data) == yaml.safe_load(config_yaml(best["config"]))

    path = tmp_path / "downloaded.yaml"
    path.write_bytes(data)
    cfg = parse_config(yaml.safe_load(data), str(path))
    assert cfg.teacher.sha256 and cfg.method.name == best["method"]
    monkeypatch.setenv("KDARENA_CACHE", str(swept_store["work"] / "cache"))  # the sweep's teacher, found by hash
    result = CliRunner().invoke(cli, ["train", str(path), "--set", "train.epochs=1", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["teacher_sha256"] == cfg.teacher.sha256
    assert not summary["teacher_trained_now"]


def _artifact_path(swept_store: dict, run_id: str) -> Path:
    from mlflow.tracking import MlflowClient

    uri = MlflowClient(swept_store["tracking_uri"]).get_run(run_id).info.artifact_uri
    return Path(uri.removeprefix("file://")) / "config.yaml"


def _empty_state_everywhere(at: AppTest) -> None:
    at.run()
    for page in ("views/leaderboard.py", "views/sweeps.py", "views/run.py"):
        at.switch_page(page).run()
        _ok(at)
        assert any("No kdarena runs" in i.value for i in at.info), page
        assert any(QUICKSTART in c.value for c in at.code), page
        assert not at.get("plotly_chart")


def test_empty_store_shows_how_to_start(migrated_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _empty_state_everywhere(_app(f"sqlite:///{tmp_path / 'mlflow.db'}", monkeypatch))  # migrated, no runs
    missing = tmp_path / "none" / "mlflow.db"
    _empty_state_everywhere(_app(f"sqlite:///{missing}", monkeypatch))
    assert not missing.exists()  # reading never creates a store


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under the store's folder (database, artifacts, journals)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and "cache" not in p.relative_to(folder).parts
            and "kdarena-sweeps" not in p.relative_to(folder).parts}


def test_every_page_on_every_run_reads_only(swept_app: AppTest, swept_store: dict):
    """All pages, every run (diverged, early-stopped, final, train), every sweep method: no error, no write."""
    work = swept_store["work"]
    before = _snapshot(work)
    at = swept_app.run()
    _ok(at)
    at.switch_page("views/sweeps.py").run()
    for method in at.selectbox(key="sw_method").options:
        at.selectbox(key="sw_method").set_value(method).run()
        _ok(at)
    runs = lb_runs.load_runs(swept_store["tracking_uri"])
    assert {"diverged", "early-stopped", "completed"} <= set(runs["status"])
    for run_id, status in zip(runs["run_id"], runs["status"]):
        at.query_params["run"] = run_id
        at.switch_page("views/run.py").run()
        _ok(at)
        assert at.query_params["run"] == run_id
        if status != "completed":
            assert any(status.replace("-", " ").split()[0].lower() in w.value.lower() for w in at.warning), status
    assert _snapshot(work) == before


def test_unreadable_store_is_an_error_message_not_a_traceback(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    at = _app("http://127.0.0.1:9", monkeypatch).run()
    assert not at.exception
    assert any("Cannot read the MLflow store" in e.value for e in at.error)


def test_dashboard_command_refuses_an_unreachable_server_and_a_busy_port(tmp_path: Path):
    result = CliRunner().invoke(cli, ["dashboard", "--tracking-uri", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "unreachable" in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli, ["dashboard", "--port", str(port),
                                          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 2 and "in use" in result.output
    assert not (tmp_path / "mlflow.db").exists()  # a refused start opens nothing


def test_pages_never_import_ray(swept_store: dict):
    """In a fresh interpreter (this one has Ray from the fixture): all three pages, and Ray stays out."""
    script = (f"from streamlit.testing.v1 import AppTest\n"
              f"at = AppTest.from_file({APP!r}, default_timeout={TIMEOUT}).run()\n"
              "for page in ('views/sweeps.py', 'views/run.py'):\n"
              "    at.switch_page(page).run()\n"
              "    assert not at.exception, [e.value for e in at.exception]\n"
              "import sys\nprint(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    env = {**os.environ, "KDARENA_TRACKING_URI": swept_store["tracking_uri"]}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
