"""Data-parallel fits (`methods/replica.py`): two real gloo processes train one run as one worker would."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import fit
from kdarena.methods.kd import KD
from kdarena.methods.recipe import Recipe
from kdarena.methods.replica import Replica
from kdarena.zoo.data import load_dataset

from helpers import digits_cnn, digits_model, digits_pair

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


def _replica_process(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        replica = Replica.of_process_group()
        folder = Path(out)
        mlp, result = _mlp_fit(replica, folder / f"mlp-{rank}.pt")
        cnn = _cnn_kd_fit(replica)
        torch.save({"mlp": mlp.state_dict(), "cnn": cnn.state_dict(),
                    "history": [(e.losses, e.train_acc, e.val_acc) for e in result.history],
                    "test_acc": result.test_acc}, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_replicas_train_as_one_worker_does(tmp_path):
    mp.spawn(_replica_process, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # the replicas end alike, BatchNorm's running statistics included
    for name in ("mlp", "cnn"):
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
