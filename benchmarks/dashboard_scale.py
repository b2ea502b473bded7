"""The dashboard over a large MLflow store: 10,000 trial runs, the leaderboard query and a full page run.

Builds a sqlite store shaped like the one `kdarena sweep` writes (same
tags, params, per-epoch and final metrics as `search/recorder.py`: sweep
parent runs, trial runs completed / early-stopped at the ASHA rungs /
diverged / failed, two final seeds per method and sweep with their
config.yaml), then times, in this process:

- `load_runs` (one paged search over the store) and `leaderboard` on it;
- the Leaderboard page with `streamlit.testing.v1.AppTest`: the first run
  (it fills the st.cache_data caches), then runs after that warm-up, and a
  run with a changed filter; the Sweeps and Run pages likewise.

Writing 10,000 runs through `MlflowClient` takes ~70 ms a run here (~12
min), so the experiment and the sweep parent runs go through the client and
the trial and final runs are inserted in bulk with SQLAlchemy into MLflow's
own tables (its `dbmodels` table definitions, so the schema is whatever
this MLflow version made).

    python -m benchmarks.dashboard_scale [--trials 10000] [--sweeps 10] [--store DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

METHOD_LOSSES = {"baseline": ["ce"], "kd": ["ce", "kd"], "fitnets": ["ce", "kd", "hint"], "fsp": ["ce", "fsp"],
                 "svd": ["ce", "svd"], "adversarial": ["ce", "adv", "critic"], "wasserstein": ["ce", "wd"],
                 "at": ["ce", "at"]}
CHANNELS = [4, 8, 16, 32]  # the students: cnn(channels=c)
EPOCHS = 8  # full budget; ASHA (grace 1, reduction 2) stops at 1, 2 or 4 epochs


def _space_value(dim, rng: random.Random) -> Any:
    from kdarena.methods.space import Choice, IntRange

    if isinstance(dim, Choice):
        return rng.choice(list(dim.choices))
    if isinstance(dim, IntRange):
        return rng.randint(dim.low, dim.high)
    if dim.log:
        import math

        return math.exp(rng.uniform(math.log(dim.low), math.log(dim.high)))
    return rng.uniform(dim.low, dim.high)


def _costs() -> dict[int, dict[str, float]]:
    from kdarena.zoo.cost import profile_cost
    from kdarena.zoo.models import build_model

    out = {}
    for c in CHANNELS:
        cost = profile_cost(build_model("cnn", num_classes=10, in_channels=1, input_size=8, channels=c),
                            in_channels=1, input_size=8)
        out[c] = {"params": cost.params, "macs": cost.macs, "flops": cost.flops, "latency_ms": cost.latency_ms}
    return out


def build_store(folder: Path, n_trials: int, n_sweeps: int, seed: int = 0) -> str:
    """A sqlite MLflow store in `folder` with `n_trials` trial runs spread over `n_sweeps` sweeps."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
    from mlflow.tracking import MlflowClient

    from kdarena.training.config import config_yaml, export_config
    from kdarena.search.sweep_config import method_space, parse_sweep, trial_config
    from kdarena.training.tracking import flatten

    rng = random.Random(seed)
    db = folder / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    artifacts = folder / "mlartifacts"
    experiment_id = client.create_experiment("kdarena", artifact_location=artifacts.as_uri())
    costs = _costs()
    teacher_sha = hashlib.sha256(b"teacher").hexdigest()
    methods = list(METHOD_LOSSES)
    rows: dict[str, list[dict[str, Any]]] = {"runs": [], "tags": [], "params": [], "metrics": [], "latest": []}
    now = int(time.time() * 1000) - 86_400_000
    per_sweep = -(-n_trials // n_sweeps)
    made = 0

    def add_run(sweep_name: str, parent: str, role: str, key: str, name: str, method: str, channels: int,
                trial_point: dict[str, Any], config: dict[str, Any], status: str, epochs_done: int, final_val: float,
                reason: str | None, start: int) -> str:
        run_id = uuid.uuid4().hex
        end = start + 1000 * (epochs_done + 1)
        rows["runs"].append({"run_uuid": run_id, "name": name, "source_type": "LOCAL", "source_name": "", "entry_point_name": "",
                             "user_id": "bench", "status": "FAILED" if status in ("diverged", "failed") else "FINISHED",
                             "start_time": start, "end_time": end, "source_version": "", "lifecycle_stage": "active",
                             "artifact_uri": f"{artifacts.as_uri()}/{run_id}/artifacts",
                             "experiment_id": int(experiment_id)})
        tags = {"mlflow.parentRunId": parent, "kdarena.role": role, "kdarena.trial_key": key, "kdarena.method": method,
                "kdarena.student": "cnn", "kdarena.dataset": "digits", "kdarena.teacher": "cnn",
                "kdarena.sweep": sweep_name, "kdarena.student_label": f"cnn(channels={channels})",
                "kdarena.teacher_label": "cnn(channels=16)", "kdarena.teacher_sha256": teacher_sha,
                "mlflow.runName": name, "kdarena.status": status}
        if reason:
            tags["kdarena.reason"] = reason
        rows["tags"] += [{"key": k, "value": v, "run_uuid": run_id} for k, v in tags.items()]
        params = flatten("", config) | flatten("", trial_point, sep="/")
        rows["params"] += [{"key": k, "value": str(v)[:6000], "run_uuid": run_id} for k, v in params.items()]
        latest: dict[str, tuple[float, int, int]] = {}
        for epoch in range(1, epochs_done + 1):
            progress = epoch / EPOCHS
            values = {"val_acc": final_val * (0.6 + 0.4 * progress) if epoch < epochs_done else final_val,
                      "train_acc": min(1.0, final_val * (0.62 + 0.4 * progress)), "lr": 0.05 * (1 - progress),
                      "epoch_seconds": rng.uniform(0.5, 2.0), "diag_grad_norm": rng.uniform(0.1, 5.0)}
            values |= {f"train_loss_{t}": rng.uniform(0.05, 2.0) / epoch for t in METHOD_LOSSES[method]}
            stamp = start + 1000 * epoch
            for k, v in values.items():
                rows["metrics"].append({"key": k, "value": v, "timestamp": stamp, "step": epoch, "is_nan": False,
                                        "run_uuid": run_id})
                latest[k] = (v, stamp, epoch)
        final = dict(costs[channels]) | {"extra_params": 0.0 if method == "baseline" else 1000.0 * channels,
                                         "epochs_completed": float(epochs_done)}
        if status == "failed":  # the recorder keeps only how far it got
            final = {"epochs_completed": float(epochs_done)}
        if status == "completed":
            final["test_acc"] = max(0.0, min(1.0, final_val + rng.gauss(0, 0.01)))
        for k, v in final.items():
            rows["metrics"].append({"key": k, "value": float(v), "timestamp": end, "step": 0, "is_nan": False,
                                    "run_uuid": run_id})
            latest.setdefault(k, (float(v), end, 0))
        rows["latest"] += [{"key": k, "value": v, "timestamp": ts, "step": step, "is_nan": False, "run_uuid": run_id}
                           for k, (v, ts, step) in latest.items()]
        if role == "final":  # the Run page's download
            folder_ = artifacts / run_id / "artifacts"
            folder_.mkdir(parents=True, exist_ok=True)
            (folder_ / "config.yaml").write_text(config_yaml(export_config(config, teacher_sha)))
        return run_id

    for s in range(n_sweeps):
        name = f"scale-{s:02d}"
        doc = {"name": name, "dataset": {"name": "digits"},
               "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 3}},
               "students": [{"arch": "cnn", "options": {"channels": c}} for c in CHANNELS],
               "methods": {m: {} for m in methods},
               "budget": {"trials_per_method": 1, "epochs": EPOCHS, "grace_period": 1, "reduction_factor": 2}}
        sweep = parse_sweep(doc, name)
        parent = client.create_run(experiment_id, run_name=f"sweep-{name}",
                                   tags={"kdarena.role": "sweep", "kdarena.sweep": name, "kdarena.dataset": "digits",
                                         "kdarena.teacher": "cnn"}).info.run_id
        client.set_terminated(parent, "FINISHED")
        spaces = {m: method_space(sweep, m) for m in methods}
        skill = {m: rng.uniform(0.85, 0.97) for m in methods}
        best: dict[str, tuple[float, dict[str, Any], int]] = {}
        start = now + s * 3_600_000
        for i in range(min(per_sweep, n_trials - made)):
            method = methods[i % len(methods)]
            index = rng.randrange(len(CHANNELS))
            point = {k: _space_value(d, rng) for k, d in spaces[method].items()}
            trial_point = {"method": method, "student": index, method: point}
            config = trial_config(sweep, method, index, {}, point).model_dump(mode="json")
            roll = rng.random()
            quality = skill[method] - 0.02 * (3 - index) - abs(rng.gauss(0, 0.08))
            if roll < 0.06:
                status, epochs_done, reason = "diverged", rng.choice([0, 1]), "non-finite loss_ce (nan) in epoch 1"
            elif roll < 0.08:
                status, epochs_done, reason = "failed", rng.choice([0, 2]), "RuntimeError: CUDA out of memory"
            elif roll < 0.75:
                status, epochs_done, reason = "early-stopped", rng.choice([1, 2, 4]), None
            else:
                status, epochs_done, reason = "completed", EPOCHS, None
                if quality > best.get(method, (-1.0,))[0]:
                    best[method] = (quality, trial_point, index)
            add_run(name, parent, "trial", f"trial/{i:05d}", f"run_trial_{s:02d}_{i:05d}", method, CHANNELS[index],
                    trial_point, config, status, epochs_done, max(0.05, quality), reason, start + 2000 * i)
            made += 1
        for method, (quality, trial_point, index) in best.items():
            for seed_ in range(2):
                point = trial_point | {"seed": seed_}
                config = trial_config(sweep, method, index, {}, trial_point[method], seed=seed_).model_dump(mode="json")
                add_run(name, parent, "final", f"final/{method}-{seed_}", f"run_final_{s:02d}_{method}_{seed_}", method,
                        CHANNELS[index], point, config, "completed", EPOCHS, quality + rng.gauss(0, 0.005), None,
                        start + 2000 * per_sweep + 1000 * seed_)

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        for table, key in ((SqlRun, "runs"), (SqlTag, "tags"), (SqlParam, "params"), (SqlMetric, "metrics"),
                           (SqlLatestMetric, "latest")):
            conn.execute(table.__table__.insert(), rows[key])
    engine.dispose()
    return uri


def _timed(fn, repeat: int = 1) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--sweeps", type=int, default=10)
    parser.add_argument("--store", type=Path, help="a folder: reuse its mlflow.db if there, else build it there")
    parser.add_argument("--repeat", type=int, default=5, help="warm page runs to take the median of")
    args = parser.parse_args()

    folder = args.store or Path(tempfile.mkdtemp(prefix="kdarena-dashboard-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "mlflow.db").exists():
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        print(f"store: {uri} (reused)")
    else:
        build_s, uri = _timed(lambda: build_store(folder, args.trials, args.sweeps))
        print(f"store: {uri} built in {build_s:.1f} s")
    print(f"store size: {(folder / 'mlflow.db').stat().st_size / 1e6:.0f} MB")

    from streamlit.testing.v1 import AppTest

    import kdarena.dashboard
    from kdarena.leaderboards import board as lb_board
    from kdarena.leaderboards import runs as lb_runs
    from kdarena.leaderboards import sweeps as lb_sweeps

    load_s, runs = _timed(lambda: lb_runs.load_runs(uri))
    roles = runs["role"].value_counts().to_dict()
    print(f"load_runs: {load_s:.2f} s for {len(runs):,} runs {roles}")
    board_s, board = _timed(lambda: lb_board.leaderboard(runs, dataset="digits"), repeat=3)
    print(f"leaderboard: {board_s:.3f} s -> {len(board)} rows, {int(board['pareto'].sum())} on the Pareto front")

    os.environ["KDARENA_TRACKING_URI"] = uri
    app = str(Path(kdarena.dashboard.__file__).with_name("app.py"))
    at = AppTest.from_file(app, default_timeout=600)
    first_s, _ = _timed(lambda: at.run())
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.dataframe[0].value) == len(board)
    print(f"Leaderboard page, first run (fills the caches): {first_s:.2f} s")
    page_s, _ = _timed(lambda: at.run(), repeat=args.repeat)
    print(f"Leaderboard page, after warm-up (median of {args.repeat}): {page_s:.2f} s  (target < 3 s)")
    at.selectbox(key="lb_method").set_value("kd")
    filter_s, _ = _timed(lambda: at.run())
    print(f"Leaderboard page, a new filter (leaderboard() recomputed): {filter_s:.2f} s")
    at.selectbox(key="lb_method").set_value("All").run()

    at.switch_page("views/sweeps.py")
    sweeps_first, _ = _timed(lambda: at.run())
    assert not at.exception, [e.value for e in at.exception]
    sweeps_s, _ = _timed(lambda: at.run(), repeat=args.repeat)
    print(f"Sweeps page ({len(lb_sweeps.sweep_trials(runs, at.selectbox(key='sw_name').value)):,} trials in the sweep): "
          f"first {sweeps_first:.2f} s, after warm-up {sweeps_s:.2f} s")
    at.query_params["run"] = str(board["run_id"].iloc[0])
    at.switch_page("views/run.py")
    run_first, _ = _timed(lambda: at.run())
    assert not at.exception, [e.value for e in at.exception]
    run_s, _ = _timed(lambda: at.run(), repeat=args.repeat)
    print(f"Run page: first {run_first:.2f} s, after warm-up {run_s:.2f} s")
    print(f"\n| measurement | seconds |\n|---|---|\n| load_runs ({len(runs):,} runs) | {load_s:.2f} |\n"
          f"| leaderboard() | {board_s:.3f} |\n| Leaderboard page, first run | {first_s:.2f} |\n"
          f"| Leaderboard page, warm | {page_s:.2f} |\n| Leaderboard page, new filter | {filter_s:.2f} |\n"
          f"| Sweeps page, warm | {sweeps_s:.2f} |\n| Run page, warm | {run_s:.2f} |")


if __name__ == "__main__":
    main()
