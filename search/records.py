"""A sweep's directory and its record file: plain files, readable without Ray or MLflow.

`records.json` is the sweep's source of truth: its parent run and, per
trial, its MLflow run, config, every epoch (with the time it was recorded),
status and final scores. The driver writes it before anything else hears of
a trial event; the MLflow mirror, `export`, `sync` and a rebuild read it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdarena.leaderboards.stats import best_first, sample_std
from kdarena.training.record import Metric, Status
from kdarena.zoo.errors import UserError

from .sweep_config import SweepConfig

RECORDS_FILE = "records.json"
SWEEP_FILE = "sweep.yaml"
DEFAULT_STORAGE = "kdarena-sweeps"
PHASES = {"trial": "search", "final": "final"}  # a trial's phase -> its Ray Tune experiment's folder


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
    """records.json: the sweep's parent run and, per trial, its run, config, last epoch and status.

    One instance per driver (its session holds it): the Tune callback and the
    MLflow mirror's thread share it under `lock`, so no writer overwrites
    another's change.
    """

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.RLock()
        self.data: dict[str, Any] = read_records(path) if path.exists() else {"parent_run_id": None, "trials": {}}

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

    def experiment(self, phase: str) -> Path:
        """The Ray Tune experiment of a phase (`trial`: the search, `final`: the final runs)."""
        return self.ray / PHASES[phase]

    @property
    def studies(self) -> Path:
        """The sweep's Optuna journal: one study per method, named after it (`optuna-dashboard` opens it)."""
        return self.root / "optuna.journal"

    def older_studies(self) -> list[Path]:
        """Per-method journals (`optuna-METHOD.journal`) of a sweep started before all studies shared one file."""
        return sorted(self.root.glob("optuna-*.journal"))


def sweep_paths(sweep: SweepConfig, storage: str | None) -> SweepPaths:
    root = Path(storage or sweep.storage or DEFAULT_STORAGE).expanduser().resolve()
    return SweepPaths(root / sweep.name)


# -- one trial's record ------------------------------------------------------------------------------------------
def trial_key(phase: str, trial_id: str) -> str:
    return f"{phase}/{trial_id}"


def trial_id_of(key: str) -> str:
    """Tune's trial id in a record key (`trial_key`'s inverse)."""
    return key.split("/", 1)[1]


def new_trial_record(key: str, trial_name: str, phase: str, trial_config: dict[str, Any], config: dict[str, Any],
                     tags: dict[str, str]) -> dict[str, Any]:
    return {"key": key, "trial_name": trial_name, "phase": phase, "method": config["method"]["name"],
            "trial_config": trial_config, "student": config["student"], "config": config, "tags": tags,
            "history": [], "status": Status.RUNNING, "metrics": {}, "run_id": None, "started": time.time(),
            "synced_epochs": 0, "run_ready": False, "synced_final": False}


def add_epoch(record: dict[str, Any], epoch: int, metrics: dict[str, float], ts_ms: int | None = None) -> None:
    """An epoch's metrics into the record; a re-run epoch (after a restore) replaces its earlier entry."""
    record["history"] = [h for h in record["history"] if h["epoch"] < epoch]
    record["history"].append({"epoch": epoch, "ts_ms": ts_ms if ts_ms is not None else int(time.time() * 1000),
                              "metrics": metrics})


def reported_epoch(result: dict[str, Any]) -> int | None:
    """The epoch a trial's report scores; None for the report that it diverged (its val_acc is a stand-in)."""
    if result.get("status") in Status.NO_SCORE or "epoch" not in result:
        return None
    return int(result["epoch"])


def ended_status(reported: str | None) -> str:
    """How a trial that Ray ended without an error finished, from the status its last report carried.

    The trial itself reports `completed` (its full budget run, the test split
    scored), `diverged`, or `failed` (refused untrained: over a constraint);
    a trial that ended reporting none of them was stopped by ASHA. records.json, a rebuilt one and the Optuna studies all decide
    by this rule.
    """
    return reported if reported in (Status.COMPLETED, *Status.NO_SCORE) else Status.EARLY_STOPPED


def epochs_done(record: dict[str, Any]) -> int:
    return max((h["epoch"] for h in record["history"]), default=0)


def final_metrics(last: dict[str, Any], status: str, record: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's scores from its last report: test accuracy only for a full-budget (completed) one."""
    final = {k: last[k] for k in Metric.FINAL if k in last and (k != Metric.TEST_ACC or status == Status.COMPLETED)}
    final[Metric.EPOCHS_COMPLETED] = epochs_done(record)
    scores = [h["metrics"][Metric.VAL_ACC] for h in record["history"] if Metric.VAL_ACC in h["metrics"]]
    if scores:
        final[Metric.BEST_VAL_ACC] = max(scores)
    return final


# -- what a sweep's records say -----------------------------------------------------------------------------------
def full_budget(records: SweepRecords, epochs: int, phase: str = "trial") -> list[dict[str, Any]]:
    """Completed trials that ran the whole budget: the only ones that rank (ASHA-stopped ones saw fewer epochs)."""
    return [r for r in records.trials.values() if r["phase"] == phase and r["status"] == Status.COMPLETED
            and r["metrics"].get(Metric.EPOCHS_COMPLETED, 0) >= epochs]


def best_trials(records: SweepRecords, epochs: int) -> dict[str, dict[str, Any]]:
    """Per method, its best full-budget trial by `best_first` (val_acc, then MACs), then the earlier one."""
    best: dict[str, dict[str, Any]] = {}
    for record in sorted(full_budget(records, epochs), key=lambda r: (
            best_first(r["metrics"][Metric.VAL_ACC], r["metrics"].get(Metric.MACS), 1), r["started"])):
        best.setdefault(record["method"], record)
    return best


def final_stats(records: SweepRecords) -> dict[str, dict[str, Any]]:
    """Per method, its final runs' test accuracy: mean, sample std (NaN for one seed), how many seeds, each seed's."""
    by_method: dict[str, list[float]] = {}
    for record in records.trials.values():
        if record["phase"] == "final" and record["status"] == Status.COMPLETED:
            by_method.setdefault(record["method"], []).append(record["metrics"][Metric.TEST_ACC])
    return {method: {"mean": sum(accs) / len(accs), "std": sample_std(accs), "n": len(accs), "test_accs": accs}
            for method, accs in by_method.items()}
