"""A node lost mid-sweep, on a real two-node Ray cluster with token authentication.

The test makes the two hosts itself: two network namespaces joined by a veth
pair, with addresses that exist only inside them (never a real network). The
head runs in one, a worker node in the other, both with RAY_AUTH_MODE=token;
the sweep's driver runs in the head's namespace. When a trial on the worker
node has reported an epoch, every process of that node is SIGKILLed: Ray
reschedules its trial on the head, from its last checkpoint, and the sweep
completes. Where namespaces cannot be made (not root, no `ip`), it says so
and skips.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "10.231.7.1", "10.231.7.2"
SWEEP = {
    "name": "two-nodes",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 3}},
    "students": [{"arch": "cnn", "options": {"channels": 8}}],
    "methods": {"kd": {}},
    "budget": {"trials_per_method": 4, "epochs": 6, "early_stopping": False},
    "resources": {"cpu": 1},
}


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _kill_namespace(ns: str) -> None:
    pids = _ip("netns", "pids", ns).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def cluster(tmp_path):
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2's `ip`; CI runs as root with both")
    tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
    head, worker = f"kdh{tag}", f"kdw{tag}"
    made = _ip("netns", "add", head)
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
    token = secrets.token_hex(16)
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1",
                        "KDARENA_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    temp_dir = f"/tmp/kdray{tag}"  # short: Ray's unix socket paths must stay under 108 bytes
    try:
        for step in (["netns", "add", worker], ["link", "add", f"vh{tag}", "type", "veth", "peer", "name", f"vw{tag}"],
                     ["link", "set", f"vh{tag}", "netns", head], ["link", "set", f"vw{tag}", "netns", worker],
                     ["-n", head, "addr", "add", f"{HEAD_IP}/24", "dev", f"vh{tag}"],
                     ["-n", worker, "addr", "add", f"{WORKER_IP}/24", "dev", f"vw{tag}"],
                     ["-n", head, "link", "set", "lo", "up"], ["-n", worker, "link", "set", "lo", "up"],
                     ["-n", head, "link", "set", f"vh{tag}", "up"], ["-n", worker, "link", "set", f"vw{tag}", "up"]):
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot wire the namespaces (ip {' '.join(step)}): {done.stderr.strip()}")
        ray = str(BIN / "ray")
        common = ["--num-cpus", "1", "--disable-usage-stats"]
        subprocess.run(["ip", "netns", "exec", head, ray, "start", "--head", "--node-ip-address", HEAD_IP, "--port", "6379",
                        "--include-dashboard", "false", "--temp-dir", temp_dir, *common],
                       env=env, check=True, capture_output=True, timeout=180)
        subprocess.run(["ip", "netns", "exec", worker, ray, "start", "--address", f"{HEAD_IP}:6379",
                        "--node-ip-address", WORKER_IP, *common], env=env, check=True, capture_output=True, timeout=180)
        yield {"head": head, "worker": worker, "env": env, "address": f"{HEAD_IP}:6379"}
    finally:
        _kill_namespace(worker)
        _kill_namespace(head)
        time.sleep(0.5)
        _ip("netns", "del", worker)
        _ip("netns", "del", head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _records(root: Path) -> dict:
    return json.loads((root / "records.json").read_text()) if (root / "records.json").exists() else {"trials": {}}


@pytest.mark.slow
def test_a_lost_node_reschedules_its_trial_and_the_sweep_completes(cluster, tmp_path):
    (tmp_path / "two-nodes.yaml").write_text(yaml.safe_dump(SWEEP))
    kdarena = [str(BIN / "kdarena"), "sweep", "two-nodes.yaml", "--address", cluster["address"]]

    # token authentication is on: a driver with the wrong token is refused before any work
    wrong = subprocess.run(["ip", "netns", "exec", cluster["head"], *kdarena], cwd=tmp_path, capture_output=True,
                           text=True, env=cluster["env"] | {"RAY_AUTH_TOKEN": "not-the-token"}, timeout=300)
    assert wrong.returncode == 2 and "RAY_AUTH_TOKEN" in wrong.stderr, wrong.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()

    proc = subprocess.Popen(["ip", "netns", "exec", cluster["head"], *kdarena], cwd=tmp_path, env=cluster["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = tmp_path / "kdarena-sweeps" / "two-nodes"
    seen_nodes: set[str] = set()
    deadline = time.time() + 400
    victim = None
    while time.time() < deadline and victim is None:
        for key, r in _records(root)["trials"].items():
            last = r.get("last_result", {})
            if "node_ip" in last:
                seen_nodes.add(last["node_ip"])
            if r["status"] == "running" and last.get("node_ip") == WORKER_IP and last.get("epoch", 0) >= 1:
                victim = key
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before a trial ran on the worker node: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    assert victim is not None, f"no trial reached the worker node (nodes seen: {seen_nodes})"
    _kill_namespace(cluster["worker"])  # the whole node: raylet, object store, the trial's worker

    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    trials = _records(root)["trials"]
    assert len(trials) == 4 and all(r["status"] == "completed" for r in trials.values())
    moved = trials[victim]
    assert moved["last_result"]["node_ip"] == HEAD_IP  # finished on the surviving node
    assert [h["epoch"] for h in moved["history"]] == list(range(1, 7))
    client = MlflowClient(cluster["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("kdarena")
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kdarena.role") == "trial"]
    assert len(children) == 4
    steps = [m.step for m in client.get_metric_history(moved["run_id"], "val_acc")]
    assert steps == list(range(1, 7))
