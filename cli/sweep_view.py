"""The live view of a running sweep: the teacher's training, a table of trials and an overall progress bar with ETA."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kdarena.leaderboards.text import format_hparams
from kdarena.methods.engine import EpochResult
from kdarena.training.record import Status, Tag
from kdarena.training.train_job import Callbacks

DONE = Status.FINISHED
MAX_ROWS = 12


def key_params(record: dict[str, Any], limit: int = 3) -> str:
    """The first few searched values of a trial, short: `temperature=3.2 alpha=0.71 lr=0.021`."""
    return format_hparams(record.get("trial_config", {}).get(record["method"], {}), limit)


class SweepView:
    def __init__(self, console: Console, total_trials: int, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.rows: dict[str, dict[str, Any]] = {}
        self.progress = Progress(TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=console)
        self.task = self.progress.add_task("trials", total=total_trials)
        # the teacher trains before the first trial (minutes): its epochs and batches, each with an ETA
        self.training = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console)
        self.epochs_task = self.batches_task = None
        self.live = Live(self._render(), console=console, refresh_per_second=2, transient=False) if enabled else None

    def __enter__(self) -> SweepView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def callbacks(self) -> Callbacks:
        """Progress of a model trained in the driver (the teacher), shown above the trials."""
        return Callbacks(start=self._start, batch=self._batch, epoch=self._epoch)

    def _start(self, label: str, epochs: int, steps: int) -> None:
        self.epochs_task = self.training.add_task(f"{label}: epochs", total=epochs, status="")
        self.batches_task = self.training.add_task("  batches", total=steps or None, status="")
        self._refresh()

    def _batch(self, done: int, total: int) -> None:
        self.training.update(self.batches_task, completed=done, total=total)
        self._refresh()

    def _epoch(self, label: str, result: EpochResult) -> None:
        self.training.update(self.epochs_task, advance=1, status=f"val_acc {100 * result.val_acc:.1f}%")
        if self.training.tasks[self.epochs_task].finished:
            self.training.update(self.batches_task, visible=False)
        self._refresh()

    def _refresh(self) -> None:
        if self.live:
            self.live.update(self._render())

    def set_total(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def __call__(self, kind: str, key: str, record: dict[str, Any]) -> None:
        if kind == "message":  # printed above the live table, which stays at the bottom
            self.console.print(record["text"], highlight=False)
            return
        was_done = self.rows.get(key, {}).get("status") in DONE
        self.rows[key] = record
        if record["status"] in DONE and not was_done:
            self.progress.advance(self.task)
        if self.live:
            self.live.update(self._render())
        elif kind in ("complete", "error"):
            self.console.print(f"{record['trial_name']} {record['method']} {record['status']} "
                               f"val_acc={record.get('last_result', {}).get('val_acc', float('nan')):.4f}", highlight=False)

    def _render(self) -> Group:
        table = Table("trial", "method", "student", "key params", "epoch", "val_acc", "status", expand=False)
        running = [r for r in self.rows.values() if r["status"] not in DONE]
        done = [r for r in self.rows.values() if r["status"] in DONE]
        for r in (running + done[::-1])[:MAX_ROWS]:
            last = r.get("last_result", {})
            val = last.get("val_acc")
            table.add_row(r["trial_name"], r["method"], r["tags"].get(Tag.STUDENT_LABEL, ""), key_params(r),
                          str(last.get("epoch", "")), f"{val:.4f}" if isinstance(val, float) else "", r["status"])
        parts = [self.training] if self.training.tasks else []
        return Group(*parts, table, self.progress)
