"""Where results are recorded: resolving and checking the MLflow tracking URI."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kdarena.zoo.errors import UserError


def resolve_tracking_uri(cli_value: str | None) -> str:
    """`--tracking-uri`, else `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the working directory.

    The default is the one the `mlflow` CLI uses, so `mlflow ui` started in
    the same directory shows the same runs.
    """
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    check_tracking_uri(uri)
    return uri


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> None:
    """Fail fast, before any training, when results could not be recorded."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
        except urllib.error.HTTPError as exc:
            if exc.code not in (401, 403):  # an auth-protected server is up; credentials are checked on use
                raise UserError(f"tracking server {uri} answered HTTP {exc.code} on /health; check --tracking-uri") from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"tracking server {uri} is unreachable ({reason}); start it (`mlflow server`) or pass "
                            "another --tracking-uri / MLFLOW_TRACKING_URI") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        folder = db.parent if str(db.parent) else Path.cwd()
        if not folder.is_dir() or not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise UserError(f"tracking store {db} is not writable; run from a writable directory or pass --tracking-uri")
    elif uri.startswith(("file:", "/", ".")) or "://" not in uri:
        raise UserError(f"tracking URI {uri!r}: MLflow's plain file store is not supported; use "
                        "sqlite:///PATH/mlflow.db or http://HOST:PORT")


def flatten(prefix: str, value: Any, sep: str = ".") -> dict[str, Any]:
    """Nested config → MLflow params with joined names (`teacher.recipe.lr`, or `kd/temperature` with sep="/")."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}{sep}{k}" if prefix else str(k), v, sep))
        return out
    return {prefix: value}


def source_commit() -> str | None:
    """The git commit of kdarena's own source, when it runs from a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
