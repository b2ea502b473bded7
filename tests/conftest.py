from __future__ import annotations

import os

# One torch thread per process, set before torch loads: on 2 shared cores, two
# OpenMP threads beside any other busy process run ~10x slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from kdarena.zoo.data import load_dataset  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture()
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private teacher cache and MLflow store, so tests never touch ~/.cache or ./mlflow.db."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDARENA_CACHE", str(cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return cache


@pytest.fixture()
def migrated_store(cache_env: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cache_env` whose MLflow store starts as a copy of an empty, already-migrated one.

    A new sqlite store spends seconds on schema migrations; the run under
    test still goes through the CLI into its own private store.
    """
    import shutil

    from mlflow.tracking import MlflowClient

    template = tmp_path_factory.getbasetemp() / "mlflow-migrated-template.db"
    if not template.exists():
        MlflowClient(f"sqlite:///{template}").search_experiments()
    shutil.copy(template, tmp_path / "mlflow.db")
    return cache_env
