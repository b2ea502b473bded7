"""Load: a sweep of 50 short trials at concurrency 2, its records, MLflow, leaderboard and dashboard.

Prints the driver's peak memory and the per-trial scheduling overhead
(wall time per trial beyond the trial's own training), the figures the
README reports; run with `-s` to see them (`KDARENA_LOAD_TRIALS=200`, the
README's figures, for another count: the suite keeps 50 for its time budget).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from streamlit.testing.v1 import AppTest

import kdarena.dashboard

TRIALS = int(os.environ.get("KDARENA_LOAD_TRIALS", "50"))
LOAD = {
    "name": "load",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 8}, "recipe": {"epochs": 2}},
    "students": [{"arch": "cnn", "options": {"channels": 4}}],
    "methods": {"baseline": {}, "kd": {}},
    "budget": {"trials": TRIALS, "epochs": 1, "early_stopping": False},
    "max_concurrent": 2,
}
KDARENA = str(Path(sys.executable).parent / "kdarena")


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@pytest.mark.slow
def test_many_trials_land_as_exactly_as_many_runs(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"KDARENA_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    (tmp_path / "load.yaml").write_text(yaml.safe_dump(LOAD))
    start = time.perf_counter()
    proc = subprocess.Popen([KDARENA, "sweep", "load.yaml"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:  # VmHWM is the driver's own peak resident memory so far
        peak = max(peak, _peak_rss_mib(proc.pid) or 0.0)
        time.sleep(0.5)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]

    records = json.loads((tmp_path / "kdarena-sweeps" / "load" / "records.json").read_text())["trials"]
    assert len(records) == TRIALS and all(r["status"] == "completed" for r in records.values())
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdarena")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    children = [r for r in runs if r.data.tags.get("kdarena.role") == "trial"]
    assert len(children) == TRIALS and len({r.data.tags["kdarena.trial_key"] for r in children}) == TRIALS
    assert {r.info.run_id for r in children} == {r["run_id"] for r in records.values()}

    # the trials' own time: training epochs plus the final test pass, as the trial measured it
    inside = sum(r["last_result"].get("time_this_iter_s", 0.0) for r in records.values())
    first_start = min(r["started"] for r in records.values())
    sweep_wall = max(r.get("finished_ts_ms", 0) for r in records.values()) / 1000 - first_start
    overhead = (2 * sweep_wall - inside) / TRIALS  # 2 trials at a time: slot-seconds not spent training
    print(f"\n{TRIALS} trials, concurrency 2: process wall {wall:.1f} s, trials phase {sweep_wall:.1f} s, "
          f"in-trial {inside:.1f} s; scheduling overhead {overhead:.2f} s per trial slot; driver peak RSS {peak:.0f} MiB")

    board = subprocess.run([KDARENA, "leaderboard", "--format", "json", "--no-references"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert board.returncode == 0, board.stderr
    assert {row["method"] for row in json.loads(board.stdout)} == {"baseline", "kd"}
    monkeypatch.setenv("KDARENA_TRACKING_URI", uri)
    at = AppTest.from_file(str(Path(kdarena.dashboard.__file__).parent / "app.py"), default_timeout=120).run()
    assert len(at.dataframe[0].value) >= 2  # the leaderboard
    for page in ("views/sweeps.py", "views/run.py"):
        at.switch_page(page).run()
        assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
