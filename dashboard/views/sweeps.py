"""Sweeps: each search's optimisation history, parameter importances, parallel coordinates, val_acc per method."""

import pandas as pd
import streamlit as st

from kdarena.leaderboards.sweeps import count_column
from kdarena.training.record import Status
from kdarena.dashboard.views import (cached_importances, cached_sweep_trials, cached_sweeps, open_run, page_runs, run_labels)
from kdarena.dashboard.views.charts import (NO_SCORE, history_figure, importance_figure, method_colours,
                                            parallel_figure, val_acc_by_method_figure, with_trial_numbers)

uri, _ = page_runs("Sweeps")
table = cached_sweeps(uri)
if table.empty:
    st.info("No sweep in this store yet, only `kdarena train` runs (on the Leaderboard and Run pages). "
            "Start one with `kdarena sweep --preset quickstart`.", icon=":material/info:")
    st.stop()

names = table["name"].astype(str).tolist()
wanted = st.query_params.get("sweep")
name = st.selectbox("Sweep", names, index=names.index(wanted) if wanted in names else len(names) - 1, key="sw_name")
st.query_params["sweep"] = name
info = table[table["name"] == name].iloc[0]
st.caption(f"{info['dataset']} · teacher {info['teacher'] or '—'} · methods {', '.join(info['methods'])} · "
           f"experiment {info['experiment']} · started {pd.Timestamp(info['start_time']):%Y-%m-%d %H:%M} UTC")
counts = st.columns(6)
for col, (label, key) in zip(counts, [("trials", "trials"), *((s, count_column(s)) for s in Status.FINISHED),
                                      ("final runs", "final_runs")]):
    col.metric(label, int(info[key]))

trials = cached_sweep_trials(uri, name)
if trials.empty:
    st.info("This sweep has no trial runs recorded yet.", icon=":material/hourglass:")
    st.stop()
trials = with_trial_numbers(trials)
colours = method_colours(trials["method"].dropna().astype(str).tolist())

st.subheader("Optimisation history")
st.caption("val_acc of each trial in start order; ◇ early-stopped by ASHA (partial budget), × diverged or failed "
           "(no val_acc, drawn at 0); the step line is each method's best full-budget val_acc so far.")
st.plotly_chart(history_figure(trials, colours), key="sw_history", config={"displaylogo": False})

st.subheader("val_acc per method")
st.plotly_chart(val_acc_by_method_figure(trials, colours), key="sw_by_method", config={"displaylogo": False})

methods = sorted(trials["method"].dropna().astype(str).unique())
method = st.selectbox("Method (each method is its own Optuna study)", methods, key="sw_method")
mine = trials[trials["method"] == method]
st.subheader("Parameter importances")
scores, how = cached_importances(uri, name, method)
if scores.empty:
    st.info(f"Not enough to say: {how}.", icon=":material/info:")
else:
    st.caption(how + "; early-stopped trials count with their last val_acc, as Optuna recorded them")
    st.plotly_chart(importance_figure(scores), key="sw_importance", config={"displaylogo": False})
st.subheader("Parallel coordinates")
st.caption("one line per trial of this method, through its searched values, its status and its val_acc "
           "(diverged and failed trials end at 0)")
st.plotly_chart(parallel_figure(mine), key="sw_parallel", config={"displaylogo": False})

st.subheader("Trials")
shown = trials.assign(val_acc=100 * pd.to_numeric(trials["val_acc"], errors="coerce"),
                      test_acc=100 * pd.to_numeric(trials["test_acc"], errors="coerce"))
warm = trials[trials["warm_start"].notna()]
if len(warm):
    st.caption(f"{len(warm)} trial(s) warm-started: their configs came from the best earlier runs on this data "
               "(the warm start column names each one's source run); the rest are the sampler's own.")
st.dataframe(shown[["trial", "method", "student", "status", "reason", "epochs_completed", "val_acc", "test_acc",
                    "warm_start", "run_id"]], hide_index=True, key="sw_trials", placeholder="—", column_config={
    "warm_start": st.column_config.TextColumn("warm start from"),
    "trial": st.column_config.NumberColumn("#", width="small"),
    "epochs_completed": st.column_config.NumberColumn("epochs", format="%d"),
    "val_acc": st.column_config.NumberColumn("val acc (%)", format="%.2f"),
    "test_acc": st.column_config.NumberColumn("test acc (%)", format="%.2f"),
    "reason": st.column_config.TextColumn("reason", width="large"),
    "run_id": st.column_config.TextColumn("MLflow run")})
bad = trials[trials["status"].isin(NO_SCORE)]
if len(bad):
    st.warning(f"{len(bad)} trial(s) diverged or failed; they never rank: "
               + "; ".join(sorted({r for r in bad["reason"] if isinstance(r, str) and r})), icon=":material/warning:")
labels = {run_id: f"#{n} {label}" for n, (run_id, label) in zip(trials["trial"], run_labels(trials).items())}
pick = st.columns([3, 1])
chosen = pick[0].selectbox("Open a trial", list(labels), format_func=labels.get, key="sw_open",
                           label_visibility="collapsed")
if pick[1].button("Open run", key="sw_open_button", icon=":material/open_in_new:") and chosen:
    open_run(chosen)
