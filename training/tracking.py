"""Where results are recorded: resolving and checking the MLflow tracking URI."""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdarena.zoo.errors import UserError


def resolve_tracking_uri(cli_value: str | None) -> str:
    """`--tracking-uri`, else `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the working directory.

    The default is the one the `mlflow` CLI uses, so `mlflow ui` started in
    the same directory shows the same runs.
    """
    uri = pick_tracking_uri(cli_value)
    check_tracking_uri(uri)
    return uri


def pick_tracking_uri(given: str | None) -> str:
    """The store a command uses: the one given, else `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` here."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def quiet_mlflow() -> None:
    """What a command sets before it imports MLflow (MLflow reads these at import, or as a run ends).

    MLflow announces schema migrations at INFO on every new store: noise for a
    CLI user; it sets its logger's level from `MLFLOW_LOGGING_LEVEL` when it is
    imported, so a setLevel before that import would be undone. With a
    tracking server MLflow writes "View run NAME at: URL" to stdout as each run
    ends: that would break `train --json` (one JSON object on stdout, nothing
    else), and the summaries already name the run.
    """
    import logging

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # artifact downloads (`kdarena deploy`) would draw progress bars into the command's own output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def fail_fast_http() -> None:
    """A dead tracking server must cost seconds, not minutes: MLflow retries each request up to 7 times with
    exponential back-off by default. Set where a sweep or a sync starts (MLflow reads them per request)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


@contextmanager
def writes_allowed(uri: str, experiment: str, fix: str) -> Iterator[None]:
    """A server's 403 (a user who may read the experiment but not write to it) as one UserError, not a traceback."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code != "PERMISSION_DENIED":
            raise
        raise UserError(f"the MLflow server at {uri} refused to record into experiment {experiment!r} (HTTP 403: "
                        f"this user may not write to it); ask its owner for EDIT permission, or {fix}") from None


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
        check_credentials(uri)
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        folder = db.parent if str(db.parent) else Path.cwd()
        if not folder.is_dir() or not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise UserError(f"tracking store {db} is not writable; run from a writable directory or pass --tracking-uri")
    elif uri.startswith(("file:", "/", ".")) or "://" not in uri:
        raise UserError(f"tracking URI {uri!r}: MLflow's plain file store is not supported; use "
                        "sqlite:///PATH/mlflow.db or http://HOST:PORT")


CREDENTIALS_HINT = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account on that server "
                    "(or MLFLOW_TRACKING_TOKEN for a bearer token)")


def check_credentials(uri: str) -> None:
    """A server with authentication (`mlflow server --app-name basic-auth`) must accept our credentials.

    /health answers without them, so an unauthenticated or mistyped login
    would otherwise surface only at the first write, as an MLflow traceback
    after the teacher has trained. One cheap read (search one experiment)
    with the credentials MLflow itself would send (MLFLOW_TRACKING_TOKEN,
    else MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD): a 401 or 403
    is a UserError naming the server, the user and the variables to set.
    Any other answer is left to MLflow. Skipped when MLFLOW_TRACKING_AUTH
    names an auth plugin, whose headers only MLflow can build.
    """
    if os.environ.get("MLFLOW_TRACKING_AUTH"):
        return
    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    elif user or password:
        pair = base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with urllib.request.urlopen(request, timeout=10):
            return
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            return
        if not (token or user or password):
            raise UserError(f"the MLflow server at {uri} requires authentication (HTTP {exc.code}) and no credentials "
                            f"are set; {CREDENTIALS_HINT}") from None
        who = "the token in MLFLOW_TRACKING_TOKEN" if token else f"the credentials of user {user!r}"
        raise UserError(f"the MLflow server at {uri} refused {who} (HTTP {exc.code}); {CREDENTIALS_HINT}") from None
    except (OSError, ValueError):
        return  # it answered /health a moment ago: let MLflow report whatever this is


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


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """The experiment's id, created here (one writer) before anything else writes to the store.

    With a sqlite store, artifacts go beside the database (`mlartifacts/`), not
    wherever the command happened to run.
    """
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def store_missing(tracking_uri: str) -> bool:
    """A sqlite store whose file does not exist yet (or is empty): no runs, and reading must not create it."""
    if not tracking_uri.startswith("sqlite:///"):
        return False
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    return not path.is_file() or path.stat().st_size == 0
