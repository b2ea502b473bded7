"""A sweep's directory and its record file: plain files, readable without Ray or MLflow."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdarena.zoo.errors import UserError

from .sweep_config import SweepConfig

RECORDS_FILE = "records.json"
SWEEP_FILE = "sweep.yaml"


class DamagedRecords(UserError):
    """records.json cannot be read: cut short, overwritten, not JSON, or not a sweep's records."""


def read_records(path: Path) -> dict[str, Any]:
    """A sweep's records, or DamagedRecords naming the file and the way to rebuild it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("trials"), dict):
            raise ValueError("not a sweep's records (no trials)")
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DamagedRecords(
            f"{path} is damaged ({reason}); rebuild it from MLflow and Ray's saved state with "
            f"`kdarena sweep SWEEP_FILE --resume --rebuild-records` (the damaged file is kept beside it)") from None
    return data


class SweepRecords:
    """records.json: the sweep's parent run and, per trial, its run, config, last epoch and status."""

    _open: dict[str, SweepRecords] = {}

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.RLock()  # the driver's thread and the MLflow mirror's share the records
        self.data: dict[str, Any] = read_records(path) if path.exists() else {"parent_run_id": None, "trials": {}}

    @classmethod
    def open(cls, path: Path) -> SweepRecords:
        """The one in-memory copy per file in this process, so no writer overwrites another's change."""
        key = str(path.resolve())
        if key not in cls._open:
            cls._open[key] = cls(path)
        return cls._open[key]

    @property
    def trials(self) -> dict[str, dict[str, Any]]:
        return self.data["trials"]

    def save(self) -> None:
        with self.lock:
            # compact: the C encoder, ~10x faster than indented output; the driver saves on every trial event
            text = json.dumps(self.data, separators=(",", ":"))
            tmp = self.path.with_name(self.path.name + ".partial")
            tmp.write_text(text)
            os.replace(tmp, self.path)


@dataclass
class SweepPaths:
    root: Path  # the sweep's own directory

    @property
    def records(self) -> Path:
        return self.root / RECORDS_FILE

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    def study(self, method: str) -> Path:
        return self.root / f"optuna-{method}.journal"


def sweep_paths(sweep: SweepConfig, storage: str | None) -> SweepPaths:
    root = Path(storage or sweep.storage or "kdarena-sweeps").expanduser().resolve()
    return SweepPaths(root / sweep.name)
