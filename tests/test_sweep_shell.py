"""A sweep run from a shell as a user runs one, and what the README promises of it.

One real `kdarena sweep` process, its stdout and stderr piped (not a terminal),
attached by `RAY_ADDRESS` alone to a Ray cluster the test starts itself with
`ray start --head` (its own temp folder, a free port), with `--max-concurrent 1`
and `--final-seeds 3` on the command line and `sampler: random` in the file,
recording to a real `mlflow server` on 127.0.0.1 that the test stops once the
first trial is in it and starts again while the sweep goes on. The tests below
read what that one sweep left behind.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import MlflowServer, free_port

BIN = Path(sys.executable).parent
SHELL = {
    "name": "shell",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 3}},
    "students": [{"arch": "cnn", "options": {"channels": 4}}],
    "methods": {"kd": {}},
    # 0.1-0.2 s an epoch on two cores: each trial lasts 5-10 s, so after the server goes down the sweep still runs
    # ~25 s or more, past the server's restart and the driver's next probe (every 10 s: mirror.PROBE_INTERVAL_S,
    # which nothing lets a test shorten)
    "budget": {"trials_per_method": 4, "epochs": 50, "early_stopping": False},
    "sampler": "random",
    "seed": 7,
    "resources": {"cpu": 1},  # on the 2-CPU cluster the default concurrency would be 2
    "final": {"seeds": 1},  # the command line asks for 3
}
TRIALS, FINAL_SEEDS, EPOCHS = 4, 3, 50
BACK = "is back; sending the waiting trial results"  # what the driver's probe says, never its end-of-sweep flush
FINISHED_LINE = re.compile(r"^(\S+) kd (completed|early-stopped|diverged|failed) val_acc=\d")


def _records(root: Path) -> dict:
    try:
        return json.loads((root / "records.json").read_text())
    except (OSError, ValueError):
        return {"trials": {}}


class Lines:
    """A pipe read line by line in a thread, each line kept with the time it came."""

    def __init__(self, pipe):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append((time.time(), line.rstrip("\n")))

    @property
    def text(self) -> str:
        return " ".join(line for _, line in self.lines)  # rich wraps long messages at 80 columns in a pipe


def _poll(predicate, timeout_s: float, proc: subprocess.Popen):
    """The predicate's first true value; None if the sweep ended or the time ran out first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    return None


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real Ray head started as a user would (`ray start --head`), stopped (SIGTERM to its `--block` process,
    then SIGKILL to whatever of its process group is left) afterwards."""
    work = tmp_path_factory.mktemp("ray-head")
    temp_dir = f"/tmp/kdray-{os.getpid()}-{secrets.token_hex(2)}"  # short: Ray's unix socket paths stay < 108 bytes
    port = free_port()
    # the cluster and its driver agree on no token, whatever ~/.ray/auth_token this machine holds
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    log_path = work / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                 "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                                 "--disable-usage-stats", "--temp-dir", temp_dir],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"`ray start --head` did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "temp_dir": Path(temp_dir), "env": env}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its group still there
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def shell_sweep(ray_cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("shell")
    server = MlflowServer(work).start()
    (work / "shell.yaml").write_text(yaml.safe_dump(SHELL))
    root = work / "kdarena-sweeps" / "shell"
    env = ray_cluster["env"] | {"RAY_ADDRESS": ray_cluster["address"], "KDARENA_CACHE": str(work / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([str(BIN / "kdarena"), "sweep", "shell.yaml", "--tracking-uri", server.uri,
                             "--max-concurrent", "1", "--final-seeds", str(FINAL_SEEDS)],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    # what happened to the tracking server, step by step; a step that does not happen ends the story there and
    # the sweep is waited for all the same, so only the test of that promise fails
    story: dict = {}
    try:
        # the first trial's run is in MLflow: stop the server while the sweep goes on
        if _poll(lambda: any(r["run_ready"] for r in _records(root)["trials"].values()), 400, proc):
            server.stop()
            story["unreachable said"] = bool(_poll(lambda: "is unreachable" in err.text, 120, proc))

            def waiting() -> set[str]:  # trials that ended while the server was down: their end waits in records
                trials = _records(root)["trials"]
                return {k for k, r in trials.items() if r["status"] != "running" and not r["synced_final"]}

            story["waited"] = _poll(waiting, 300, proc) or set()
            server.start()
            if _poll(lambda: BACK in err.text, 120, proc):
                client = MlflowClient(server.uri)

                def in_mlflow() -> set[str]:
                    exp = client.get_experiment_by_name("kdarena")
                    return {r.data.tags.get("kdarena.trial_key") for r in
                            client.search_runs([exp.experiment_id], max_results=1000)
                            if "kdarena.status" in r.data.tags}  # a finished run: its end reached MLflow

                # what waited is sent while the sweep still has trials to run, not by the flush at its end
                if _poll(lambda: story["waited"] <= in_mlflow(), 120, proc):
                    trials = _records(root)["trials"].values()
                    story["unfinished when sent"] = sum(r["status"] == "running" for r in trials) + (
                        TRIALS + FINAL_SEEDS - len(trials))
        proc.wait(timeout=600)
        out.thread.join(timeout=30)
        err.thread.join(timeout=30)
        (work / "driver.stderr").write_text("\n".join(f"{t:.3f} {line}" for t, line in err.lines))
        yield {"work": work, "root": root, "server": server, "proc": proc, "out": out, "err": err,
               "cluster": ray_cluster, "story": story}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()


def _runs(sweep) -> list:
    client = MlflowClient(sweep["server"].uri)
    exp = client.get_experiment_by_name("kdarena")
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_attached_by_ray_address_the_sweep_runs_on_that_cluster(shell_sweep):
    proc = shell_sweep["proc"]
    assert proc.returncode == 0, shell_sweep["err"].text[-3000:]
    logs = shell_sweep["cluster"]["temp_dir"] / "session_latest" / "logs"
    names = [p.name for p in logs.iterdir()]
    # the driver joined that cluster as a job (a local Ray of its own would log in a session of its own) ...
    assert any(n.startswith("python-core-driver-") and n.endswith(f"_{proc.pid}.log") for n in names), names
    # ... and every trial and final run ran in that cluster's workers
    trials = _records(shell_sweep["root"])["trials"].values()
    pids = {r["last_result"]["pid"] for r in trials}
    assert len(trials) == TRIALS + FINAL_SEEDS and pids
    for pid in pids:
        assert any(n.startswith("python-core-worker-") and n.endswith(f"_{pid}.log") for n in names), (pid, names)


@pytest.mark.slow
def test_the_tracking_server_back_mid_sweep_gets_what_waited_before_the_sweep_ends(shell_sweep):
    err = shell_sweep["err"]
    assert shell_sweep["proc"].returncode == 0, err.text[-3000:]
    story = shell_sweep["story"]
    assert story.get("unreachable said") and story.get("waited"), story  # trials ended while the server was down
    assert story.get("unfinished when sent", 0) > 0, story  # in MLflow while the sweep still had trials to run
    said = err.text
    assert said.count("is unreachable") == 1 and said.count(BACK) == 1  # said once each
    # the probe came before the sweep's last trial ended, and nothing waited at the end
    lines = [line for _, line in err.lines]
    back_line = next(i for i, line in enumerate(lines) if "is back;" in line)
    assert any(FINISHED_LINE.match(line) for line in lines[back_line:])
    assert "not in MLflow yet" not in said
    # nothing lost, nothing twice: one run per trial and final run, one value per epoch
    records = _records(shell_sweep["root"])
    trials = records["trials"]
    runs = _runs(shell_sweep)
    (parent,) = [r for r in runs if r.data.tags.get("kdarena.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["kdarena.trial_key"] for r in children) == sorted(trials)
    assert {r.info.run_id for r in children} == {t["run_id"] for t in trials.values()}
    client = MlflowClient(shell_sweep["server"].uri)
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (run.info.run_name, steps)
        assert run.data.tags["kdarena.status"] == trials[run.data.tags["kdarena.trial_key"]]["status"]
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_piped_stderr_has_one_line_per_finished_trial(shell_sweep):
    err = shell_sweep["err"]
    finished = [m.group(1) for m in (FINISHED_LINE.match(line) for _, line in err.lines) if m]
    names = sorted(r["trial_name"] for r in _records(shell_sweep["root"])["trials"].values())
    assert sorted(finished) == names and len(names) == TRIALS + FINAL_SEEDS  # each finished trial once
    assert not [line for _, line in err.lines if "\x1b" in line or "\r" in line]  # no live table drawn in a pipe


@pytest.mark.slow
def test_final_seeds_and_max_concurrent_from_the_command_line(shell_sweep):
    assert shell_sweep["proc"].returncode == 0
    records = _records(shell_sweep["root"])
    trials = list(records["trials"].values())
    finals = [r for r in trials if r["phase"] == "final"]
    base = records["trials"][records["best"]["kd"]]["config"]["train"]["seed"]  # the best trial's own seed, then on
    assert sorted(r["config"]["train"]["seed"] for r in finals) == [base, base + 1, base + 2]  # 3, not the file's 1
    finals_in_mlflow = [r for r in _runs(shell_sweep) if r.data.tags.get("kdarena.role") == "final"]
    assert len(finals_in_mlflow) == FINAL_SEEDS
    # at most one trial at once: from a trial's start to its last epoch, no other trial runs
    spans = sorted((r["started"] * 1000, max(h["ts_ms"] for h in r["history"])) for r in trials)
    assert len(spans) == TRIALS + FINAL_SEEDS
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= end, spans


@pytest.mark.slow
def test_sampler_random_is_what_each_study_ran(shell_sweep):
    from kdarena.search.phases import study_storage
    from kdarena.search.points import DefineByRun
    from kdarena.search.records import SweepPaths
    from kdarena.search.sweep_config import method_space, parse_sweep

    root = shell_sweep["root"]
    # the study Tune's searcher drove (its saved state) sampled with Optuna's RandomSampler ...
    (state,) = sorted((root / "ray" / "search").glob("searcher-state-*.pkl"))[-1:]
    with open(state, "rb") as f:
        searcher = pickle.load(f)["searchers"]["kd"]
    assert isinstance(searcher._ot_study.sampler, optuna.samplers.RandomSampler)
    # ... seeded with the sweep's seed: its trials are RandomSampler(seed=7)'s draws, in order
    ran = optuna.load_study(study_name="kd", storage=study_storage(SweepPaths(root))).trials
    sweep = parse_sweep(SHELL, "shell.yaml")
    space = DefineByRun("kd", method_space(sweep, "kd"), tuple(s.search for s in sweep.students))
    replay = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=SHELL["seed"]))
    expected = []
    for _ in ran:
        trial = replay.ask()
        space(trial)
        expected.append(trial.params)
    assert len(ran) == TRIALS and [t.params for t in ran] == expected
