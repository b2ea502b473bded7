"""Data-parallel scaling: one epoch's training throughput of one worker vs two (`methods/replica.py`).

The same fit (a zoo CNN on CIFAR-sized random images, the baseline method,
batch 128) run by one process with `--cpus` torch threads, then by two gloo
processes with `--cpus / 2` threads each (what `resources: {cpu: C, workers: 2}`
gives a trial on the same CPUs). Throughput is the training split's images
over the epoch's seconds (the engine's `EpochResult.seconds`, validation on a
small split included), the best of the epochs after the first. Scaling
efficiency = two workers' throughput / (2 × one worker's at half the CPUs),
and the speed-up over one worker holding all the CPUs is printed beside it.
Ray is not involved: this measures the engine's gradient averaging, not
Ray Train's start-up (paid once per trial).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import fit
from kdarena.methods.recipe import Recipe
from kdarena.methods.replica import Replica
from kdarena.training.build import pair_info
from kdarena.zoo.data import Dataset, Split
from kdarena.zoo.models import build_model


def synthetic(images: int) -> Dataset:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                     torch.randint(0, 10, (n,), generator=gen))
    return Dataset("random", split(images), split(256), split(256), 10, mean=(0.5,) * 3, std=(0.25,) * 3)


def images_per_second(data: Dataset, channels: int, epochs: int, threads: int, replica: Replica | None) -> float:
    torch.manual_seed(0)
    student = build_model("cnn", num_classes=10, in_channels=3, input_size=32, channels=channels)
    seconds: list[float] = []
    fit(Baseline(student, None, Baseline.Params(), pair_info(student, student, data)), data,
        Recipe(epochs=epochs, batch_size=128, num_threads=threads), device=torch.device("cpu"), evaluate_test=False,
        on_epoch=lambda e: seconds.append(e.seconds), replica=replica)
    return len(data.train) / min(seconds[1:])


def _replica(rank: int, world: int, store: str, out: str, images: int, channels: int, epochs: int,
             threads: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rate = images_per_second(synthetic(images), channels, epochs, threads, Replica.of_process_group())
        if rank == 0:
            Path(out).write_text(json.dumps(rate))
    finally:
        dist.destroy_process_group()


def two_workers(images: int, channels: int, epochs: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "rate.json")
        mp.spawn(_replica, args=(2, str(Path(folder) / "store"), out, images, channels, epochs, threads), nprocs=2)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs in all: one worker's threads, two workers' sum")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    data = synthetic(args.images)
    half = max(1, args.cpus // 2)
    alone_half = images_per_second(data, args.channels, args.epochs, half, None)
    alone_all = images_per_second(data, args.channels, args.epochs, args.cpus, None)
    pair = two_workers(args.images, args.channels, args.epochs, half)
    print(f"cnn(channels={args.channels}), 32x32, batch 128, {args.images} images, best of epochs 2-{args.epochs}")
    print(f"1 worker x {half} thread(s):  {alone_half:8.1f} img/s")
    print(f"1 worker x {args.cpus} thread(s):  {alone_all:8.1f} img/s")
    print(f"2 workers x {half} thread(s): {pair:8.1f} img/s")
    print(f"scaling efficiency (2 workers / 2 x one at {half} thread(s)): {pair / (2 * alone_half):.2f}")
    print(f"speed-up over 1 worker holding all {args.cpus} CPUs: {pair / alone_all:.2f}x")


if __name__ == "__main__":
    main()
