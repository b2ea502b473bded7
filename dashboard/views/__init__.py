"""The dashboard's pages and what they share: the tracking URI, cached reads, the empty state, run links.

`leaderboard.py`, `sweeps.py` and `run.py` here are Streamlit page scripts
(`dashboard/app.py` registers them with `st.navigation`): Streamlit runs
them, nothing imports them. `charts.py` builds their figures.

Read-only by construction: the pages call only `kdarena.leaderboards`'
readers and queries, and a sqlite store that does not exist yet
(or is an empty file) is never opened, because opening it would make MLflow
create its tables. The app never imports Ray.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pandas as pd
import streamlit as st

from kdarena.leaderboards.render import QUICKSTART_COMMAND
from kdarena.training.record import Role
from kdarena.training.tracking import pick_tracking_uri, store_missing

URI_ENV = "KDARENA_TRACKING_URI"
TTL = 30  # seconds: a running sweep shows up within half a minute
RUN_PAGE = "views/run.py"
SWEEPS_PAGE = "views/sweeps.py"


def tracking_uri() -> str:
    """`streamlit run app.py -- --tracking-uri URI`, else $KDARENA_TRACKING_URI, else what `kdarena train` uses."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--tracking-uri" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--tracking-uri="):
            return arg.split("=", 1)[1]
    return pick_tracking_uri(os.environ.get(URI_ENV))


@st.cache_data(ttl=TTL, show_spinner="Reading runs from MLflow…")
def cached_runs(uri: str) -> pd.DataFrame:
    from kdarena.leaderboards.runs import empty_runs, load_runs

    return empty_runs() if store_missing(uri) else load_runs(uri)


@st.cache_data(ttl=TTL, show_spinner=False)
def cached_leaderboard(uri: str, dataset: str | None, teacher: str | None, method: str | None, student: str | None,
                       max_macs: float | None, max_params: float | None, by: str) -> pd.DataFrame:
    from kdarena.leaderboards.board import leaderboard

    return leaderboard(cached_runs(uri), dataset=dataset, teacher=teacher, method=method, student=student,
                       max_macs=max_macs, max_params=max_params, by=by)


@st.cache_data(ttl=TTL, show_spinner=False)
def cached_references(dataset: str | None) -> pd.DataFrame:
    from kdarena.leaderboards.references import reference_rows

    return reference_rows(dataset)


@st.cache_data(ttl=TTL, show_spinner=False)
def cached_sweeps(uri: str) -> pd.DataFrame:
    from kdarena.leaderboards.sweeps import sweeps

    return sweeps(cached_runs(uri))


@st.cache_data(ttl=TTL, show_spinner=False)
def cached_sweep_trials(uri: str, sweep: str) -> pd.DataFrame:
    from kdarena.leaderboards.sweeps import sweep_trials

    return sweep_trials(cached_runs(uri), sweep)


@st.cache_data(ttl=TTL, show_spinner="Reading the run…")
def cached_run_detail(uri: str, run_id: str) -> dict[str, Any]:
    from kdarena.leaderboards.runs import run_detail

    return run_detail(uri, run_id)


@st.cache_data(ttl=TTL, show_spinner="Computing parameter importances…")
def cached_importances(uri: str, sweep: str, method: str) -> tuple[pd.Series, str]:
    from .charts import param_importances

    trials = cached_sweep_trials(uri, sweep)
    return param_importances(trials[trials["method"] == method])


def runs_or_stop(uri: str) -> pd.DataFrame:
    """All runs, or a clear error (and the page stops) when the store cannot be read."""
    try:
        return cached_runs(uri)
    except Exception as exc:  # an unreachable server or a foreign database: say so, never a traceback
        st.error(f"Cannot read the MLflow store at `{uri}`: {exc}")
        st.caption("Point the dashboard at another store: `kdarena dashboard --tracking-uri URI`.")
        st.stop()


def student_runs(runs: pd.DataFrame) -> pd.DataFrame:
    if runs.empty or "role" not in runs:
        return runs.iloc[0:0]
    return runs[runs["role"].isin(Role.STUDENTS)]


def page_runs(title: str) -> tuple[str, pd.DataFrame]:
    """Every page's start: its title, then the store's student runs — or the empty state, and the page stops."""
    uri = tracking_uri()
    st.title(title)
    ours = student_runs(runs_or_stop(uri))
    if ours.empty:
        empty_state(uri)
        st.stop()
    return uri, ours


def empty_state(uri: str) -> None:
    """No kdarena runs yet: how to make some."""
    st.info(f"No kdarena runs in `{uri}` yet.", icon=":material/info:")
    st.markdown("Run the quickstart sweep (digits, a few minutes on a laptop CPU), then reload this page:")
    st.code(f"{QUICKSTART_COMMAND}\nkdarena dashboard", language="bash")
    st.caption("Runs recorded in another store: `kdarena dashboard --tracking-uri sqlite:///PATH/mlflow.db` "
               "or `--tracking-uri http://HOST:PORT`.")


def open_run(run_id: str) -> None:
    st.switch_page(RUN_PAGE, query_params={"run": run_id})


def finite(value: Any) -> bool:
    try:
        return value is not None and pd.notna(value) and float(value) == float(value)
    except (TypeError, ValueError):
        return False


def run_labels(runs: pd.DataFrame) -> dict[str, str]:
    """run_id -> `final · kd · cnn(channels=8) · completed · 95.82% · 1a2b3c4d` (vectorised: 10,000 runs in ms)."""
    if runs.empty:
        return {}
    text = pd.Series("", index=runs.index)
    for column in ("role", "method", "student", "status"):
        if column in runs:
            part = runs[column].where(runs[column].map(lambda v: isinstance(v, str) and v != ""), None)
            text = text.where(part.isna(), text.where(text == "", text + " · ") + part.fillna(""))
    acc = pd.to_numeric(runs["test_acc"], errors="coerce").fillna(pd.to_numeric(runs["val_acc"], errors="coerce"))
    text = text.where(acc.isna(), text + " · " + (100 * acc).map("{:.2f}%".format))
    ids = runs["run_id"].astype(str)
    return dict(zip(ids, text + " · " + ids.str[:8]))
