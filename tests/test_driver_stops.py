"""The sweep driver under the stops real jobs meet: a second driver, SIGTERM, kill -9 during the final runs, files
lost or damaged underneath. Real `kdarena sweep` processes, real signals, a real local Ray, MLflow and Optuna."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from kdarena.search.checkpoints import repair, restorable, saved_trials
from kdarena.search.phases import study_storage
from kdarena.search.records import SweepPaths

KDARENA = str(Path(sys.executable).parent / "kdarena")

TINY = {
    "name": "stops",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 8}, "recipe": {"epochs": 2}},
    "students": [{"arch": "cnn", "options": {"channels": 4}}],
    "methods": {"baseline": {}, "kd": {}},
    # every trial runs its full budget: the planned count of completed trials is exact
    "budget": {"trials_per_method": 2, "epochs": 8, "early_stopping": False, "chance_patience": None},
    "final": {"seeds": 3},
    "max_concurrent": 2,
}


def _env(tmp_path: Path) -> dict:
    return os.environ | {"KDARENA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
                         "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([KDARENA, "sweep", *args], cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _records(root: Path) -> dict:
    try:
        return json.loads((root / "records.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return {"trials": {}}


def _wait_for(proc: subprocess.Popen, root: Path, ready, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready(_records(root)["trials"].values()):
            return
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended ({proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}")


def _running(phase: str, min_epochs: int = 1):
    return lambda trials: any(r["phase"] == phase and r["status"] == "running" and len(r["history"]) >= min_epochs
                              for r in trials)


def _group_alive(pgid: int) -> list[int]:
    """Processes still in the killed driver's process group: every Ray process it started is in it."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout.split()
    return [int(p) for p, g in zip(out[::2], out[1::2]) if int(g) == pgid]


def _finish(tmp_path: Path, sweep_file: Path, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([KDARENA, "sweep", str(sweep_file), "--resume"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def _child_runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdarena")
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("kdarena.role") in ("trial", "final")]


def _assert_complete_and_unduplicated(tmp_path: Path, root: Path) -> dict:
    trials = _records(root)["trials"]
    search = [r for r in trials.values() if r["phase"] == "trial"]
    finals = [r for r in trials.values() if r["phase"] == "final"]
    assert len(search) == 4 and all(r["status"] == "completed" for r in search), [
        (r["key"], r["status"], r.get("reason"), [h["epoch"] for h in r["history"]], r.get("last_result"))
        for r in search]
    assert sorted((r["method"], r["config"]["train"]["seed"]) for r in finals) == sorted(
        (m, s) for m in ("baseline", "kd") for s in (0, 1, 2)), "every final seed of every method, once"
    assert all(r["status"] == "completed" for r in finals), [(r["status"], r.get("reason")) for r in finals]
    runs = _child_runs(tmp_path)
    assert sorted(r.info.run_id for r in runs) == sorted(r["run_id"] for r in trials.values()), "one run per trial"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == list(range(1, 9)), (run.info.run_name, steps)
    return trials


@pytest.mark.slow
def test_sigterm_and_kill_9_anywhere_lose_no_trial_and_no_final_seed(tmp_path):
    sweep_file = tmp_path / "stops.yaml"
    sweep_file.write_text(yaml.safe_dump(TINY))
    root = tmp_path / "kdarena-sweeps" / "stops"

    # SIGTERM mid-search: a clean stop, exit 143, the way to resume on one line
    proc = _start(tmp_path, str(sweep_file))
    _wait_for(proc, root, lambda t: sum(r["status"] == "completed" for r in t) >= 1 and _running("trial", 2)(t),
              "a finished trial and a running one")
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert not _group_alive(proc.pid), "nothing of the stopped driver's Ray is left"

    before = _records(root)["trials"]
    # Tune registers a trial's checkpoint a step after its result, so a stop may come before the last one is
    # registered: a trial with k epochs recorded resumes from epoch k (or k + 1)
    interrupted = {k: len(r["history"]) for k, r in before.items() if r["status"] == "running" and len(r["history"]) >= 2}
    assert interrupted

    # a checkpoint Tune's saved state names, lost underneath: the trial restarts from an older one (or from
    # scratch) and says so, instead of failing
    lost = [t for t in saved_trials(root / "ray" / "search") if t.status != "TERMINATED" and t.checkpoint]
    assert lost
    for name in restorable(lost[0]):
        shutil.rmtree(lost[0].folder / name, ignore_errors=True)

    # a trial the killed driver had started but Ray's saved state never knew: dropped on resume, its MLflow run
    # deleted and its Optuna trial marked FAIL, so the sweep keeps its planned count
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    records = json.loads((root / "records.json").read_text())
    ghost_key = "trial/ghost000"
    template = next(iter(records["trials"].values()))
    ghost_run = client.create_run(records["experiment_id"], tags={"kdarena.role": "trial", "kdarena.trial_key": ghost_key,
                                                                  "mlflow.parentRunId": records["parent_run_id"]})
    records["trials"][ghost_key] = template | {"key": ghost_key, "status": "running", "run_id": ghost_run.info.run_id,
                                                "history": [], "metrics": {}}
    (root / "records.json").write_text(json.dumps(records))
    journal = study_storage(SweepPaths(root))
    ghost_trial = optuna.load_study(study_name="kd", storage=journal).ask()

    # resume, then SIGTERM again once the final runs are under way
    proc = _start(tmp_path, str(sweep_file), "--resume")
    _wait_for(proc, root, _running("final", 1), "a final run under way", timeout=400)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert f"trial {lost[0].trial_id}: {lost[0].checkpoint} is missing from storage" in err  # said, not failed

    after = _records(root)["trials"]
    assert ghost_key not in after and ghost_key in _records(root)["lost_trials"]
    assert client.get_run(ghost_run.info.run_id).info.lifecycle_stage == "deleted"
    assert journal.get_trial(ghost_trial._trial_id).state == optuna.trial.TrialState.FAIL
    # the trials interrupted by the first stop resumed from their checkpoints: their first epoch after the
    # resume was the one after their last, not epoch 1 (Ray's own log of each trial's reports)
    for key, epochs in interrupted.items():
        if key.split("/")[1] == lost[0].trial_id:
            continue
        [folder] = (root / "ray" / "search").glob(f"run_trial_{key.split('/')[1]}_*")
        reports = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        resumed = [r for r in reports if r.get("iterations_since_restore") == 1 and r["epoch"] > 1]
        assert resumed and epochs <= resumed[0]["epoch"] <= epochs + 1, (key, epochs, [r["epoch"] for r in reports])

    # kill -9 at several points across the final runs: every resume goes on, no Ray process of a killed driver
    # outlives it for more than a few seconds
    for delay in (0.5, 3.0):
        proc = _start(tmp_path, str(sweep_file), "--resume")
        _wait_for(proc, root, _running("final", 0), "the final runs to resume", timeout=400)
        time.sleep(delay)
        if proc.poll() is not None:
            break  # the finals ended first: the sweep is done
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        deadline = time.time() + 15
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not _group_alive(proc.pid), "Ray processes of the killed driver are still running"

    done = _finish(tmp_path, sweep_file)
    assert "fewer final seeds" not in done.stderr
    _assert_complete_and_unduplicated(tmp_path, root)
    for method in ("baseline", "kd"):
        study = optuna.load_study(study_name=method, storage=study_storage(SweepPaths(root)))
        assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.slow
def test_two_drivers_on_one_sweep_one_is_refused_and_every_trial_runs_once(tmp_path):
    doc = TINY | {"name": "twice", "budget": {"trials_per_method": 2, "epochs": 3, "early_stopping": False},
                  "final": {"seeds": 1}}
    sweep_file = tmp_path / "twice.yaml"
    sweep_file.write_text(yaml.safe_dump(doc))
    first = _start(tmp_path, str(sweep_file))
    time.sleep(1.0)  # a double-submitted job: the second start a second later
    second = _start(tmp_path, str(sweep_file))
    _, err2 = second.communicate(timeout=300)
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 2, err2[-3000:]
    assert f"is being run by pid {first.pid}" in err2 and "one driver per sweep" in err2
    assert err2.count("\n") == 1, "one line"
    root = tmp_path / "kdarena-sweeps" / "twice"
    trials = _records(root)["trials"]
    assert len(trials) == 2 * 2 + 2
    assert len(_child_runs(tmp_path)) == len(trials)
    # --resume is refused as well while the first one runs; afterwards it finds a finished sweep
    again = subprocess.run([KDARENA, "sweep", str(sweep_file)], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_a_held_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    from kdarena.search.driver_lock import LOCK_FILE, driver_lock
    from kdarena.zoo.errors import UserError

    root = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from kdarena.search.driver_lock import driver_lock\n"
        f"with driver_lock(Path({str(root)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid} on host .*one driver per sweep"):
        with driver_lock(root):
            pass
    holder.kill()  # kill -9: no chance to clean up; the kernel drops its lock
    holder.wait()
    said = []
    with driver_lock(root, say=said.append):
        assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert said == [f"taking over sweep 's' from driver pid {holder.pid}, which ended without releasing it"]
    # a sweep refused before it wrote anything leaves no folder behind
    fresh = tmp_path / "never"
    with pytest.raises(RuntimeError):
        with driver_lock(fresh):
            raise RuntimeError("refused")
    assert not fresh.exists()


def _state(folder: Path, trials: list[tuple[str, str, str | None]], pending: dict[str, str] | None = None) -> None:
    """An experiment state file as Ray Tune writes it (the fields kdarena reads), with the controller's pending
    decisions by trial id."""
    data = [[json.dumps({"trial_id": tid, "status": status, "relative_logdir": f"run_trial_{tid}_x"}),
             json.dumps({"last_result": {"checkpoint_dir_name": ckpt} if ckpt else {}})] for tid, status, ckpt in trials]
    runner = {"_cached_trial_decisions": dict(pending or {}), "_queued_trial_decisions": {}, "_iteration": 95}
    (folder / "experiment_state-2026.json").write_text(json.dumps({"trial_data": data, "runner_data": runner}))


def _checkpoint(folder: Path, name: str, epoch: int) -> None:
    (folder / name).mkdir(parents=True)
    (folder / name / "trial.pt").write_text(f"state after epoch {epoch}")
    (folder / name / "epoch").write_text(str(epoch))


def test_repair_gives_each_unfinished_trial_the_checkpoints_its_state_may_restore(tmp_path):
    # a: Tune registered 4 (epoch 5) after its state, naming 3, was saved, deleting 3; the worker then wrote 5
    # (epoch 6), whose result the driver never processed: resuming from it would leave epoch 6 out of the record
    _checkpoint(tmp_path / "run_trial_a_x", "checkpoint_000004", 5)
    _checkpoint(tmp_path / "run_trial_a_x", "checkpoint_000005", 6)
    (tmp_path / "run_trial_b_x").mkdir()
    _checkpoint(tmp_path / "run_trial_c_x", "checkpoint_000005", 6)
    _checkpoint(tmp_path / "run_trial_d_x", "checkpoint_000002", 3)
    _checkpoint(tmp_path / "run_trial_e_x", "checkpoint_000007", 8)  # only a checkpoint the driver never saw
    _checkpoint(tmp_path / "run_trial_f_x", "checkpoint_000007", 8)  # f: both checkpoints there, nothing stands in
    _checkpoint(tmp_path / "run_trial_f_x", "checkpoint_000006", 7)
    # Tune's STOP on e's last result (its budget reached) and on f's: applied to the first result a restored
    # trial reports, it would cut e, restarted from scratch, after one epoch
    _state(tmp_path, [("a", "PAUSED", "checkpoint_000003"), ("b", "RUNNING", "checkpoint_000000"),
                      ("c", "TERMINATED", "checkpoint_000005"), ("d", "RUNNING", "checkpoint_000002"),
                      ("e", "RUNNING", "checkpoint_000006"), ("f", "RUNNING", "checkpoint_000007")],
           pending={"e": "STOP", "f": "STOP"})
    said = repair(tmp_path, {"a": 5, "b": 1, "c": 6, "d": 3, "e": 7, "f": 8})
    runner = json.loads((tmp_path / "experiment_state-2026.json").read_text())["runner_data"]
    assert runner == {"_cached_trial_decisions": {"f": "STOP"}, "_queued_trial_decisions": {}, "_iteration": 95}
    assert [t.trial_id for t in saved_trials(tmp_path)] == list("abcdef")  # the rest of the state as it was
    for name in ("checkpoint_000002", "checkpoint_000003"):  # the state may restore a from either
        assert (tmp_path / "run_trial_a_x" / name / "trial.pt").read_text() == "state after epoch 5"
    assert (tmp_path / "run_trial_b_x" / "checkpoint_000000").is_dir()
    assert not list((tmp_path / "run_trial_b_x" / "checkpoint_000000").iterdir())  # empty: start from scratch
    assert not (tmp_path / "run_trial_c_x" / "checkpoint_000004").exists()  # finished trials are not restored
    assert (tmp_path / "run_trial_d_x" / "checkpoint_000001" / "trial.pt").read_text() == "state after epoch 3"
    assert not list((tmp_path / "run_trial_e_x" / "checkpoint_000006").iterdir())  # epoch 8 was never recorded
    assert said == [
        "trial a: checkpoint_000002 is missing from storage; it resumes from checkpoint_000004 (epoch 5) instead",
        "trial a: checkpoint_000003 is missing from storage; it resumes from checkpoint_000004 (epoch 5) instead",
        "trial b: checkpoint_000000 is missing from storage and no other checkpoint of a recorded epoch is there; "
        "it starts again from scratch",
        "trial d: checkpoint_000001 is missing from storage; it resumes from checkpoint_000002 (epoch 3) instead",
        "trial e: checkpoint_000005 is missing from storage and no other checkpoint of a recorded epoch is there; "
        "it starts again from scratch",
        "trial e: checkpoint_000006 is missing from storage and no other checkpoint of a recorded epoch is there; "
        "it starts again from scratch"]
    (tmp_path / "experiment_state-2026.json").write_text('{"trial_data": [')  # being written: nothing is touched
    assert repair(tmp_path, {}) == []


def test_tune_state_cut_short_by_a_kill_is_restored_from_rays_staging_copy(tmp_path):
    """kill -9 while Ray copied its state to storage left an empty searcher state; Tune could not restore."""
    import pickle

    from kdarena.search.checkpoints import heal_state_files
    from kdarena.zoo.errors import UserError

    experiment = tmp_path / "sweep" / "ray" / "search"
    experiment.mkdir(parents=True)
    whole = pickle.dumps({"searchers": {"kd": [1, 2, 3]}})
    (experiment / "searcher-state-2026-11-30_00-04-20.pkl").write_bytes(b"")  # cut short by the kill
    gen_state = pickle.dumps({"counter": 3})  # a pickle, despite Tune's name for it
    (experiment / "search_gen_state-2026-11-30_00-04-20.json").write_bytes(gen_state[:5])  # cut mid-write
    (experiment / "experiment_state-2026-11-30_00-04-20.json").write_text('{"trial_data": []}')  # whole
    staging = tmp_path / "ray-tmp" / "session_2026_1" / "artifacts" / "2026-11-30_00-04-20" / "search" / "driver_artifacts"
    staging.mkdir(parents=True)
    (staging / "searcher-state-2026-11-30_00-04-20.pkl").write_bytes(whole)
    (staging / "search_gen_state-2026-11-30_00-04-20.json").write_bytes(gen_state)
    said = heal_state_files(experiment, tmp_path / "ray-tmp")
    assert (experiment / "searcher-state-2026-11-30_00-04-20.pkl").read_bytes() == whole
    assert (experiment / "search_gen_state-2026-11-30_00-04-20.json").read_bytes() == gen_state
    assert len(said) == 2 and all("restored from Ray's staging copy" in line for line in said)
    assert heal_state_files(experiment, tmp_path / "ray-tmp") == []  # whole files are left alone
    # no complete copy left (another machine, a cleaned temp dir): one clear error, not a resume that stops at once
    (experiment / "searcher-state-2026-11-30_00-04-20.pkl").write_bytes(whole[:-3])
    shutil.rmtree(tmp_path / "ray-tmp")
    with pytest.raises(UserError, match="searcher-state-2026-11-30_00-04-20.pkl is cut short"):
        heal_state_files(experiment, tmp_path / "ray-tmp")


def test_a_killed_drivers_optuna_lock_is_cleared_under_the_driver_lock(tmp_path):
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    from kdarena.search.phases import clear_stale_study_lock

    paths = SweepPaths(tmp_path / "s")
    paths.root.mkdir()
    lock = JournalFileSymlinkLock(str(paths.studies))
    JournalFileBackend(str(paths.studies), lock_obj=lock)
    assert lock.acquire()  # held, as by a driver killed with -9 inside a journal write
    assert clear_stale_study_lock(paths)
    again = JournalFileSymlinkLock(str(paths.studies), grace_period=None)
    assert again.acquire()  # free at once, no 30-s wait
    again.release()
    assert not clear_stale_study_lock(paths)  # nothing to clear
