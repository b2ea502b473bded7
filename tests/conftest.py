from __future__ import annotations

import os

# One torch thread per process, set before torch loads: on 2 shared cores, two
# OpenMP threads beside any other busy process run ~10x slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from kdarena.zoo.data import load_dataset  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch sees no GPU here (benchmarks/device_check.py runs these where "
                                   "one is lent)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture()
def local_ray():
    """A real local Ray of 2 CPUs: the session's (`helpers.shared_ray`)."""
    from helpers import shared_ray

    shared_ray()


@pytest.fixture(scope="session", autouse=True)
def _shut_down_the_shared_ray():
    yield
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


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


# A small real sweep, run once per test session, whose MLflow store the
# leaderboard and dashboard tests read: two students, three methods (one
# forced to diverge), final runs on two seeds, plus one `kdarena train` run.
SWEPT = {
    "name": "swept",
    "dataset": {"name": "digits"},
    "teacher": {"arch": "cnn", "options": {"channels": 16}, "recipe": {"epochs": 3}},
    "students": [{"arch": "cnn", "options": {"channels": 4}}, {"arch": "cnn", "options": {"channels": 8}}],
    "methods": {"baseline": {}, "kd": {}, "fitnets": {"fix": {"lr": 1.0e4}}},
    "budget": {"trials_per_method": 3, "epochs": 3, "grace_period": 1, "reduction_factor": 2},
    "final": {"seeds": 2},
}


@pytest.fixture(scope="session")
def swept_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{'tracking_uri', 'work', 'sweep_dir'}: a store written by a real sweep on a real local Ray."""
    import yaml

    from helpers import sweep_workspace

    from kdarena.training.config import parse_config
    from kdarena.search.sweep import run_sweep
    from kdarena.search.sweep_config import parse_sweep
    from kdarena.training.train_job import run_train

    work = tmp_path_factory.mktemp("swept")
    with sweep_workspace(work) as uri:
        (work / "swept.yaml").write_text(yaml.safe_dump(SWEPT))
        outcome = run_sweep(parse_sweep(SWEPT, "swept.yaml"), SWEPT)
        run_train(parse_config({"teacher": SWEPT["teacher"], "train": {"epochs": 3}}), uri)
    return {"tracking_uri": uri, "work": work, "sweep_dir": outcome.paths.root}
