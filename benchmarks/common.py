"""What several benchmarks share: a private workspace and running a sweep in it."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from kdarena.search.sweep import SweepOptions, run_sweep
from kdarena.search.sweep_config import parse_sweep


def workspace(prefix: str) -> Path:
    """A temp dir holding this benchmark's MLflow store and teacher cache, made the working directory."""
    work = Path(tempfile.mkdtemp(prefix=f"kdarena-{prefix}-"))
    os.environ["KDARENA_CACHE"] = str(work / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.chdir(work)
    return work


def timed_sweep(doc: dict[str, Any], **options: Any) -> tuple[float, dict[str, Any]]:
    """Run a sweep document; return its wall time and its records."""
    sweep = parse_sweep(doc, doc["name"])
    start = time.perf_counter()
    outcome = run_sweep(sweep, doc, SweepOptions(**options))
    seconds = time.perf_counter() - start
    return seconds, json.loads((outcome.paths.records).read_text())
