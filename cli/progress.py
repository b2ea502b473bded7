"""Progress of a training: bars for epochs and batches on a terminal (rich), lines with an ETA otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdarena.methods.engine import EpochResult

from kdarena.training.train_job import Callbacks


class TrainProgress:
    def __init__(self, enabled: bool, console: Console):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                 console=console, disable=not enabled, transient=False)
        self.epochs_task = None
        self.batch_task = None

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def callbacks(self) -> Callbacks:
        return Callbacks(start=self._start, batch=self._batch, epoch=self._epoch)

    def _start(self, label: str, epochs: int, steps: int) -> None:
        for task in (self.epochs_task, self.batch_task):
            if task is not None:
                self.progress.update(task, visible=False)
        self.epochs_task = self.progress.add_task(f"{label} epochs", total=epochs, status="")
        self.batch_task = self.progress.add_task("  batches", total=None, status="")

    def _batch(self, done: int, total: int) -> None:
        self.progress.update(self.batch_task, completed=done, total=total)

    def _epoch(self, label: str, result: EpochResult) -> None:
        self.progress.update(self.epochs_task, advance=1, status=f"val_acc {100 * result.val_acc:.1f}%")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLines:
    """Progress when stderr is no terminal (a log, CI, a pipe): a plain line at most every `every` seconds, with an
    ETA, and one at the end of each model's training, so a long teacher never trains in silence."""

    def __init__(self, console: Console, every: float = 15.0, clock: Callable[[], float] = time.monotonic):
        self.console, self.every, self.clock = console, every, clock
        self.label, self.epochs, self.done, self.steps, self.batches = "", 0, 0, 0, 0
        self.started = self.last = 0.0
        self.val_acc: float | None = None

    def callbacks(self) -> Callbacks:
        return Callbacks(start=self._start, batch=self._batch, epoch=self._epoch)

    def _start(self, label: str, epochs: int, steps: int) -> None:
        self.label, self.epochs, self.done, self.steps, self.batches, self.val_acc = label, epochs, 0, steps, 0, None
        self.started = self.last = self.clock()

    def _batch(self, done: int, total: int) -> None:
        self.batches, self.steps = done, total
        self._maybe_print()

    def _epoch(self, label: str, result: EpochResult) -> None:
        self.done, self.batches, self.val_acc = self.done + 1, 0, result.val_acc
        self._maybe_print(force=self.done == self.epochs)

    def _maybe_print(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.last < self.every:
            return
        self.last = now
        fraction = (self.done + (self.batches / self.steps if self.steps else 0)) / max(self.epochs, 1)
        elapsed = now - self.started
        eta = "done" if self.done >= self.epochs else \
            f"ETA {_duration(elapsed * (1 - fraction) / fraction)}" if fraction > 0 else "ETA unknown yet"
        val = f", val_acc {100 * self.val_acc:.1f}%" if self.val_acc is not None else ""
        self.console.print(f"{self.label}: epoch {self.done}/{self.epochs}{val}, {_duration(elapsed)} elapsed, {eta}",
                           highlight=False, soft_wrap=True)
