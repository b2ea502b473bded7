"""Progress bars for epochs and batches (rich), silent when not on a terminal."""

from __future__ import annotations

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
