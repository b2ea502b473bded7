"""Data-parallel fits (`methods/replica.py`): two real gloo processes train one run as one worker would."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient
from ray.util import placement_group_table

from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import fit
from kdarena.methods.kd import KD
from kdarena.methods.recipe import Recipe
from kdarena.methods.replica import Replica
from kdarena.training.record import Metric, Tag
from kdarena.training.build import pair_info
from kdarena.zoo.augment import RandomResizedCrop
from kdarena.zoo.data import TreeOptions, load_dataset
from kdarena.zoo.models import build_model

from helpers import digits_cnn, digits_model, digits_pair, write_tree

# 1,295 training images in batches of 64: the last batch (15) splits 8 / 7, so unequal shards are covered too
RECIPE = Recipe(epochs=2, batch_size=64, lr=0.05, num_threads=1)


def _mlp_fit(replica: Replica | None, checkpoint: Path | None = None):
    student = digits_model("mlp", 3, hidden=[32, 16])  # no BatchNorm: the global batch's gradient, exactly
    result = fit(Baseline(student, None, Baseline.Params(), digits_pair(student, student)), load_dataset("digits"),
                 RECIPE, device=torch.device("cpu"), checkpoint_path=checkpoint, replica=replica)
    return student, result


def _cnn_kd_fit(replica: Replica | None):
    teacher, student = digits_cnn(0, channels=8), digits_cnn(1, channels=4)
    fit(KD(student, teacher, KD.Params(), digits_pair(student, teacher)), load_dataset("digits"), RECIPE,
        device=torch.device("cpu"), replica=replica)
    return student


def _streamed_mlp_fit(replica: Replica | None, tree: str):
    """An MLP on a streamed tree with a per-image crop: each replica reads and decodes only its rows."""
    data = load_dataset("imagefolder", root=tree, tree=TreeOptions(in_memory=False, image_size=16, workers=0))
    torch.manual_seed(5)
    student = build_model("mlp", num_classes=3, in_channels=3, input_size=16, hidden=[32])
    recipe = Recipe(epochs=2, batch_size=8, lr=0.05, num_threads=1, augment=RandomResizedCrop())
    result = fit(Baseline(student, None, Baseline.Params(), pair_info(student, student, data)), data, recipe,
                 device=torch.device("cpu"), replica=replica)
    return student, result


def _replica_process(rank: int, world: int, store: str, out: str, tree: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        replica = Replica.of_process_group()
        folder = Path(out)
        mlp, result = _mlp_fit(replica, folder / f"mlp-{rank}.pt")
        cnn = _cnn_kd_fit(replica)
        streamed, streamed_result = _streamed_mlp_fit(replica, tree)
        torch.save({"mlp": mlp.state_dict(), "cnn": cnn.state_dict(), "streamed": streamed.state_dict(),
                    "history": [(e.losses, e.train_acc, e.val_acc) for e in result.history],
                    "streamed_history": [(e.losses, e.val_acc) for e in streamed_result.history],
                    "test_acc": result.test_acc}, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_replicas_train_as_one_worker_does(tmp_path):
    tree = write_tree(tmp_path / "tree", (20, 40))
    mp.spawn(_replica_process, args=(2, str(tmp_path / "store"), str(tmp_path), str(tree)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # the replicas end alike, BatchNorm's running statistics included
    for name in ("mlp", "cnn", "streamed"):
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), f"{name}.{key} differs between the replicas"
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["test_acc"] == ranks[1]["test_acc"]
    # only the chief writes the checkpoint
    assert (tmp_path / "mlp-0.pt").exists() and not (tmp_path / "mlp-1.pt").exists()

    # without BatchNorm, two replicas take the one-worker run's steps: the mean gradient of each global batch
    alone, result = _mlp_fit(None)
    for key, value in alone.state_dict().items():
        torch.testing.assert_close(ranks[0]["mlp"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for (losses, train_acc, val_acc), e in zip(ranks[0]["history"], result.history):
        assert abs(losses["loss_ce"] - e.losses["loss_ce"]) < 1e-5
        assert abs(train_acc - e.train_acc) < 1e-6 and val_acc == e.val_acc
    assert ranks[0]["test_acc"] == result.test_acc
    # streamed, each replica decoding only its rows of every batch (its crops drawn from the images' own seeds): the
    # one-worker run's steps too
    alone, result = _streamed_mlp_fit(None, str(tree))
    for key, value in alone.state_dict().items():
        torch.testing.assert_close(ranks[0]["streamed"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for (losses, val_acc), e in zip(ranks[0]["streamed_history"], result.history):
        assert abs(losses["loss_ce"] - e.losses["loss_ce"]) < 1e-5 and val_acc == e.val_acc


def _nccl_replica_process(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.cuda.set_device(rank)
        student = digits_model("mlp", 3, hidden=[32, 16])
        fit(Baseline(student, None, Baseline.Params(), digits_pair(student, student)), load_dataset("digits"), RECIPE,
            device=torch.device("cuda", rank), replica=Replica.of_process_group())
        torch.save({k: v.cpu() for k, v in student.state_dict().items()}, Path(out) / f"nccl{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per replica: fewer than 2 here")
def test_two_nccl_replicas_on_two_gpus_end_alike(tmp_path):
    mp.spawn(_nccl_replica_process, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"nccl{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(value, ranks[1][key]) for key, value in ranks[0].items())


# -- a real sweep on a real local Ray: `resources.workers: 2` -------------------------------------------------------

SWEEP = {
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 1}},
    "students": [{"arch": "cnn", "options": {"channels": 16}}],  # ~0.5 s an epoch: a kill lands mid-epoch
    "methods": {"kd": {}},
    "budget": {"trials_per_method": 1, "epochs": 3, "early_stopping": False},
    "warm_start": "off",
}


def _train_workers() -> set[int]:
    """Pids of the Ray Train workers on this machine: this module's sweep is the only one of the session's Ray (and
    of the suite) that starts any."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """A two-worker sweep; a Train worker of its trial SIGKILLed once it has reported an epoch."""
    from helpers import sweep_workspace

    from kdarena.search.sweep import run_sweep
    from kdarena.search.sweep_config import parse_sweep

    work = tmp_path_factory.mktemp("data-parallel")
    out: dict = {"work": work}
    with sweep_workspace(work) as uri:
        out["uri"] = uri
        two = SWEEP | {"name": "two", "resources": {"cpu": 1, "workers": 2}}
        root = work / "kdarena-sweeps" / "two"
        seen: set[int] = set()
        stop = threading.Event()

        def kill_once_an_epoch_is_in() -> None:
            while not stop.is_set():
                records = root / "records.json"
                trials = json.loads(records.read_text())["trials"] if records.exists() else {}
                running = [(k, r) for k, r in trials.items()
                           if r["status"] == "running" and r.get("last_result", {}).get("epoch", 0) >= 1]
                workers = _train_workers()
                seen.update(workers)
                if running and workers and "killed" not in out:
                    pid = max(workers)
                    os.kill(pid, signal.SIGKILL)
                    out["killed"] = (running[0][0], pid, running[0][1]["last_result"]["epoch"], set(workers))
                time.sleep(0.05)

        killer = threading.Thread(target=kill_once_an_epoch_is_in, daemon=True)
        killer.start()
        try:
            out["two"] = run_sweep(parse_sweep(two, "two.yaml"), two).paths.root
        finally:
            stop.set()
            killer.join()
        out["workers_seen"] = seen
        # Tune ends a trial's actor on its last report, before its Train run has shut down: nothing may stay held
        out["groups_left"] = [g["bundles"] for g in placement_group_table().values() if g["state"] != "REMOVED"]
    return out


def _trials(root: Path) -> dict:
    return json.loads((root / "records.json").read_text())["trials"]


def test_a_two_worker_sweep_records_what_a_one_worker_sweep_does(sweeps, swept_store):
    """The two-worker kd trial against the one-worker kd trials of the session's sweep that ran all 3 epochs."""
    def shapes(root: Path, uri: str) -> set:
        """Each completed kd trial's record and MLflow run, less their values."""
        client = MlflowClient(uri)
        out = set()
        for r in _trials(root).values():
            if r["method"] != "kd" or r["phase"] != "trial" or r["status"] != "completed":
                continue
            run = client.get_run(r["run_id"])
            out.add((tuple(r), r["status"], tuple(h["epoch"] for h in r["history"]), tuple(r["last_result"]),
                     tuple(r["history"][0]), run.info.status, run.data.tags[Tag.STATUS], tuple(sorted(run.data.metrics)),
                     tuple(sorted(k for k in run.data.tags if not k.startswith("mlflow."))),
                     tuple(m.step for m in client.get_metric_history(r["run_id"], Metric.VAL_ACC))))
        return out

    assert len(_trials(sweeps["two"])) == 1
    one = shapes(swept_store["sweep_dir"], swept_store["tracking_uri"])
    assert one == shapes(sweeps["two"], sweeps["uri"])
    assert {(s[1], s[2], s[6]) for s in one} == {("completed", (1, 2, 3), "completed")}
    assert not any((sweeps["two"] / "ray" / "train").iterdir())  # no Train run left behind
    assert sweeps["groups_left"] == []  # nor its workers' CPUs held


def test_a_killed_train_worker_resumes_its_trial_from_the_checkpoint(sweeps):
    key, pid, epoch_at_kill, workers_then = sweeps["killed"]
    record = _trials(sweeps["two"])[key]
    assert record["status"] == "completed"
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]  # each epoch once: none lost, none re-run
    assert sweeps["workers_seen"] - workers_then, "a new worker group took over"
    trial_id = key.split("/")[1]
    (trial_dir,) = [d for d in (sweeps["two"] / "ray" / "search").iterdir() if d.is_dir() and trial_id in d.name]
    reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    # had the new workers started over, epoch 1 would be reported again after the kill
    assert [r["epoch"] for r in reports] == [1, 2, 3] and epoch_at_kill >= 1
