"""Faults injected for real into running sweeps: killed trial workers, a stopped tracking server, dead runs.

One sweep (a real `kdarena sweep` process on a local Ray, recording to a real
`mlflow server` on 127.0.0.1) takes three faults at once: a trial's worker is
SIGKILLed mid-epoch, the tracking server dies mid-sweep and stays down until
the sweep has ended, and one method's trials learn nothing (stuck at chance).
The tests below read what it left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import MlflowServer

FAULTY = {
    "name": "faulty",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 3}},
    "students": [{"arch": "cnn", "options": {"channels": 8}}],
    # weight decay 10 shrinks every weight to nothing: finite losses, a model stuck at chance
    "methods": {"kd": {}, "baseline": {"fix": {"weight_decay": 10.0}}},
    "budget": {"trials_per_method": 2, "epochs": 4, "early_stopping": False, "chance_patience": 2},
    "max_concurrent": 2,
}
KDARENA = str(Path(sys.executable).parent / "kdarena")


def _records(root: Path) -> dict:
    return json.loads((root / "records.json").read_text())


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    work = tmp_path_factory.mktemp("faulty")
    server = MlflowServer(work).start()
    env = os.environ | {"KDARENA_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    (work / "faulty.yaml").write_text(yaml.safe_dump(FAULTY))
    root = work / "kdarena-sweeps" / "faulty"
    proc = subprocess.Popen([KDARENA, "sweep", "faulty.yaml", "--tracking-uri", server.uri], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def running_kd_trial():
            if not (root / "records.json").exists():
                return None
            for key, r in _records(root)["trials"].items():
                last = r.get("last_result", {})
                if r["method"] == "kd" and r["status"] == "running" and last.get("epoch", 0) >= 1 and "pid" in last:
                    return key, last["pid"], last["epoch"]
            return None

        killed_key, pid, epoch_at_kill = _wait_for(running_kd_trial, 300, "a kd trial past its first epoch", proc)
        os.kill(pid, signal.SIGKILL)  # the trial's Ray worker, mid-epoch
        server.stop()  # and the tracking server with it, until after the sweep
        out, err = proc.communicate(timeout=600)
        sync_before_server = subprocess.run([KDARENA, "sync", str(root)], cwd=work, env=env, capture_output=True,
                                            text=True, timeout=120)
        server.start()
        first_sync = subprocess.run([KDARENA, "sync", str(root)], cwd=work, env=env, capture_output=True, text=True,
                                    timeout=300)
        second_sync = subprocess.run([KDARENA, "sync", "faulty.yaml"], cwd=work, env=env, capture_output=True,
                                     text=True, timeout=300)
        yield {"work": work, "root": root, "server": server, "proc": proc, "out": out, "err": err,
               "killed_key": killed_key, "killed_pid": pid, "sync_down": sync_before_server,
               "sync": first_sync, "sync_again": second_sync}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()


def test_sweep_completes_despite_a_killed_worker_and_a_dead_tracking_server(faulty):
    assert faulty["proc"].returncode == 0, faulty["err"][-3000:]
    assert "unreachable" in faulty["err"] and "kdarena sync" in faulty["err"]
    trials = _records(faulty["root"])["trials"]
    assert len(trials) == 4
    statuses = {k: r["status"] for k, r in trials.items()}
    assert all(s == "completed" for k, s in statuses.items() if trials[k]["method"] == "kd"), statuses


def test_killed_worker_retried_from_its_last_checkpoint(faulty):
    record = _records(faulty["root"])["trials"][faulty["killed_key"]]
    assert record["status"] == "completed"
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4]
    assert record["last_result"]["pid"] != faulty["killed_pid"]  # a new worker finished it
    # Ray's own log of the trial: after the restart it went on from the checkpoint, never from epoch 1 again. A
    # report that follows a (re)start has iterations_since_restore 1; only the very first may be epoch 1. (Tune
    # may copy result.json back from storage when the trial restarts, so lines before the kill can be missing.)
    trial_id = faulty["killed_key"].split("/")[1]
    (trial_dir,) = [d for d in (faulty["root"] / "ray" / "search").iterdir() if d.is_dir() and trial_id in d.name]
    reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    starts = [r["epoch"] for r in reports if r["iterations_since_restore"] == 1]
    assert [e for e in starts if e > 1], "the retried trial went on from a checkpoint"
    assert starts.count(1) <= 1 and reports[-1]["epoch"] == 4


def test_sync_refuses_while_the_server_is_down_and_then_sends_everything_once(faulty):
    down = faulty["sync_down"]
    assert down.returncode == 2 and "unreachable" in down.stderr and "Traceback" not in down.stderr
    assert faulty["sync"].returncode == 0, faulty["sync"].stderr
    assert "sent" in faulty["sync"].stderr
    assert faulty["sync_again"].returncode == 0 and "nothing to send" in faulty["sync_again"].stderr

    client = MlflowClient(faulty["server"].uri)
    exp = client.get_experiment_by_name("kdarena")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("kdarena.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("kdarena.role") == "trial"]
    assert len(children) == 4 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert parent.info.status == "FINISHED" and "kdarena.best_run_id" in parent.data.tags
    records = _records(faulty["root"])["trials"]
    for run in children:
        record = records[run.data.tags["kdarena.trial_key"]]
        assert record["run_id"] == run.info.run_id
        history = client.get_metric_history(run.info.run_id, "val_acc")
        steps = [m.step for m in history]
        assert steps == sorted(set(steps)) == [h["epoch"] for h in record["history"]]
        assert run.data.tags["kdarena.status"] == record["status"]
    killed = client.get_run(records[faulty["killed_key"]]["run_id"])
    assert killed.info.status == "FINISHED" and killed.data.tags["kdarena.status"] == "completed"
    assert "test_acc" in killed.data.metrics


def test_a_trial_stuck_at_chance_ends_diverged_and_never_ranks(faulty):
    trials = _records(faulty["root"])["trials"].values()
    stuck = [r for r in trials if r["method"] == "baseline"]
    assert len(stuck) == 2
    for r in stuck:
        assert r["status"] == "diverged" and "at chance" in r["reason"], r.get("reason")
        assert len(r["history"]) < FAULTY["budget"]["epochs"]  # ended early, the sweep went on
    board = subprocess.run([KDARENA, "leaderboard", "--format", "json", "--no-references", "--tracking-uri",
                            faulty["server"].uri], cwd=faulty["work"], capture_output=True, text=True, timeout=120)
    assert board.returncode == 0, board.stderr
    rows = json.loads(board.stdout)
    assert rows and {r["method"] for r in rows} == {"kd"}
    client = MlflowClient(faulty["server"].uri)
    run = client.get_run(stuck[0]["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["kdarena.status"] == "diverged"
    assert "at chance" in run.data.tags["kdarena.reason"]


# -- storage trouble: found before any trial starts, exit 2, nothing written -----------------------------------------

@pytest.fixture()
def mounted(tmp_path):
    """mount(name, options) → a fresh tmpfs at tmp_path/name (read-only, or tiny), unmounted afterwards."""
    points = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); CI runs as root, where it can")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _full(point: Path) -> None:
    with open(point / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


STORAGE_CASES = ["storage under a file", "read-only storage", "full storage", "read-only teacher cache"]


@pytest.mark.parametrize("case", STORAGE_CASES)
def test_storage_trouble_is_reported_before_any_work(case, tmp_path, mounted, monkeypatch):
    from typer.testing import CliRunner

    from kdarena.cli.app import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(FAULTY | {"name": "storage"}))
    storage = tmp_path / "plain-file" / "sweeps"
    expected = "storage"
    if case == "storage under a file":
        (tmp_path / "plain-file").write_text("not a folder")
        expected_reason = "not writable"
    elif case == "read-only storage":
        storage = mounted("ro", "ro,size=1m")
        expected_reason = "Read-only file system"
    elif case == "full storage":
        storage = mounted("full", "size=1m")
        _full(storage)
        expected_reason = "is full"
    else:
        storage = tmp_path / "sweeps"
        monkeypatch.setenv("KDARENA_CACHE", str(mounted("ro-cache", "ro,size=1m") / "cache"))
        expected, expected_reason = "teacher cache", "Read-only file system"
    result = CliRunner().invoke(app, ["sweep", "s.yaml", "--storage", str(storage)])
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert f"error: {expected}" in message and expected_reason in message, message
    assert "--storage" in message or "KDARENA_CACHE" in message  # how to fix it
    assert "Traceback" not in message
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.glob("**/records.json"))
    if case == "read-only teacher cache":  # `kdarena train` checks its cache the same way, before training
        result = CliRunner().invoke(app, ["train", "--set", "method.name=kd", "--set", "train.epochs=1"])
        assert result.exit_code == 2 and "teacher cache" in result.stderr and "Read-only" in result.stderr, result.output
