"""What lives while one sweep's driver runs: its records, its MLflow mirror thread and its live view.

Ray Tune pickles its callbacks into the experiment state and unpickles
them on a restore, so the driver's Tune callback (`recorder.MLflowRecorder`)
holds only paths and names; it finds the running driver's session here, by
the path of the sweep's records file. A session exists from the start of a
sweep's work to its end (`driver_session`); outside one, nothing is kept.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .mirror import Mirror, MirrorWorker
from .records import SweepRecords

View = Callable[[str, str, dict[str, Any]], None]


@dataclass
class DriverSession:
    records: SweepRecords
    worker: MirrorWorker
    view: View | None = None

    @property
    def mirror(self) -> Mirror:
        return self.worker.mirror

    def notify(self, text: str) -> None:
        """A message for the user: through the live view if there is one, else on stderr."""
        if self.view is not None:
            self.view("message", "", {"text": text})
        else:
            print(text, file=sys.stderr, flush=True)


_ACTIVE: dict[str, DriverSession] = {}


def _key(records_path: Path) -> str:
    return str(Path(records_path).resolve())


def session_for(records_path: Path) -> DriverSession:
    """The running driver's session of the sweep whose records are at `records_path`."""
    return _ACTIVE[_key(records_path)]


@contextmanager
def driver_session(records: SweepRecords, tracking_uri: str, experiment_id: str,
                   view: View | None = None) -> Iterator[DriverSession]:
    """Open the sweep's session: its MLflow mirror thread runs until the block ends, then it is gone."""
    from mlflow.tracking import MlflowClient

    session: DriverSession | None = None

    def warn(text: str) -> None:
        session.notify(text)

    mirror = Mirror(MlflowClient(tracking_uri), experiment_id, records, warn=warn)
    session = DriverSession(records, MirrorWorker(mirror), view)
    _ACTIVE[_key(records.path)] = session
    try:
        yield session
    finally:
        _ACTIVE.pop(_key(records.path), None)
        session.worker.close()
