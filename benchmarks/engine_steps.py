"""What the step benchmarks share: training steps as `engine.fit` makes them, timed in interleaved rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import NamedTuple

import torch

from kdarena.methods import Distiller, StepInfo
from kdarena.methods.engine import train_step
from kdarena.methods.execution import Execution
from kdarena.methods.teacher_logits import TeacherLogits
from kdarena.zoo.data import Batch, BatchLoader, Split

# the engine's view of the run: epoch 10 of 100 is past adversaries' warm-up, and two-stage methods
# (fsp's default) are in their distillation stage, the one that costs more than baseline
EPOCH, EPOCHS, STEPS_PER_EPOCH = 10, 100, 100

class Run(NamedTuple):
    """A run to time: the method, its optimizer, its endless steps, and how they run (default: the CPU's)."""

    distiller: Distiller
    optimizer: torch.optim.Optimizer
    batches: Iterator[tuple[Batch, StepInfo]]
    execution: Execution | None = None


def steps(method: type[Distiller], split: Split, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
          seed: int = 0, cache: TeacherLogits | None = None,
          channels_last: bool = False) -> Iterator[tuple[Batch, StepInfo]]:
    """Endless (batch, StepInfo) as `engine.fit` makes them for this method: shuffled, its strong view and indices,
    the batch's rows of `cache` when given, in the memory format asked for."""
    loader = BatchLoader(split, batch_size=batch_size, mean=mean, std=std, shuffle=True, seed=seed,
                         strong=method.strong_view, channels_last=channels_last)
    i = 0
    while True:
        loader.set_epoch(i)
        for batch in loader.batches():
            yield batch, StepInfo(EPOCH, EPOCHS, EPOCH * STEPS_PER_EPOCH + i, STEPS_PER_EPOCH,
                                  indices=batch.indices if method.wants_indices else None, strong_images=batch.strong,
                                  teacher_logits=cache.rows(batch.indices) if cache is not None else None)
        i += 1


def step(run: Run) -> None:
    """One engine training step of `run` on its next batch."""
    batch, info = next(run.batches)
    train_step(run.distiller, run.optimizer, batch.images, batch.labels, info, run.execution)


def interleaved_times(runs: dict[str, Run], rounds: int, steps_per_round: int) -> dict[str, list[float]]:
    """Seconds per step of each run, one figure per round; each round times every run in turn, so a load change
    on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step(run)
            times[name].append((time.perf_counter() - start) / steps_per_round)
    return times


def print_medians(title: str, times: dict[str, list[float]], row: str, versus: dict[str, str]) -> None:
    """`title`, then a Markdown table of each run's median ms per step and its ratio to each run `versus` names
    (column heading → run)."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(title)
    print(f"| {row} | ms per step | " + " | ".join(versus) + " |")
    print("|---|---|" + "---|" * len(versus))
    for name, t in medians.items():
        print(f"| {name} | {1000 * t:.1f} | " + " | ".join(f"{t / medians[ref]:.2f}x" for ref in versus.values()) + " |")
