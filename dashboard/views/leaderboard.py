"""Leaderboard: students ranked by val_acc, their test accuracy against their cost, beside the published results.

Rows not shown to differ from the student trained alone (paired t-test over
shared seeds, p ≥ 0.05, or too few shared seeds) are marked ≈ in "vs alone".
"""

import pandas as pd
import streamlit as st

from kdarena.dashboard.views import SWEEPS_PAGE, cached_leaderboard, cached_references, finite, open_run, page_runs
from kdarena.dashboard.views.charts import COSTS, leaderboard_figure, method_colours
from kdarena.leaderboards.text import LEGEND, rank_labels, versus_alone_text

ALL = "All"
AXES = {"MACs": "macs", "params": "params", "latency": "latency"}

uri, ours = page_runs("Leaderboard")

# a dataset is its content (fingerprint); it is shown by its label, made unique with a short fingerprint
ours_datasets = sorted(ours["dataset"].dropna().astype(str).unique())
identity = ours.dropna(subset=["dataset"]).drop_duplicates("dataset").set_index("dataset")
published = cached_references(None)
datasets = ours_datasets + sorted(set(published["dataset"].dropna().astype(str)) - set(identity["dataset_label"]))
top = st.columns([1.2, 1.2, 1, 1.4])
dataset = top[0].selectbox("Dataset", datasets, key="lb_dataset",
                           format_func=lambda d: d if d in ours_datasets else f"{d} (published results only)")
axis = top[3].radio("Cost axis", list(AXES), horizontal=True, key="lb_axis",
                    help="MACs = FLOPs / 2, the convention of most papers; latency: CPU, batch 1")
by = AXES[axis]
base = cached_leaderboard(uri, dataset, None, None, None, None, None, by)
refs = cached_references(str(identity["dataset_label"].get(dataset, dataset)))
if dataset in ours_datasets:
    fingerprint = identity["dataset_fingerprint"].get(dataset)
    st.caption(f"Data: fingerprint `{fingerprint[:16]}…` (the content of its files: other data, or changed files, "
               "rank apart)" if isinstance(fingerprint, str) else
               "Data of unknown identity: these runs were recorded before kdarena identified data by content, "
               "so they are never merged with runs on identified data.")


def options(column: str, *frames: pd.DataFrame) -> list[str]:
    values = set()
    for frame in frames:
        values |= set(frame[column].dropna().astype(str)) - {""}
    return [ALL] + sorted(values)


def keep(frame: pd.DataFrame, column: str, value: str | None) -> pd.DataFrame:
    return frame if value is None else frame[frame[column].astype(str) == value]


# the filters apply to our rows and the published ones alike
teacher = top[1].selectbox("Teacher", options("teacher", base, refs), key="lb_teacher")
teacher = None if teacher == ALL else teacher
base_t, refs_t = keep(base, "teacher", teacher), keep(refs, "teacher", teacher)
row2 = st.columns([1.2, 1.2, 1, 1, 0.8])
method = row2[0].selectbox("Method", options("method", base_t, refs_t), key="lb_method")
method = None if method == ALL else method
student = row2[1].selectbox("Student", options("student", keep(base_t, "method", method), keep(refs_t, "method", method)),
                            key="lb_student")
student = None if student == ALL else student
max_macs = row2[2].number_input("Max MACs", min_value=0.0, value=None, step=1e6, format="%.0f", key="lb_max_macs",
                                placeholder="no limit")
max_params = row2[3].number_input("Max params", min_value=0.0, value=None, step=1e5, format="%.0f",
                                  key="lb_max_params", placeholder="no limit")
show_refs = row2[4].toggle("Published", value=True, key="lb_refs", help="results reported in the papers, as hollow markers")

board = cached_leaderboard(uri, dataset, teacher, method, student, max_macs, max_params, by)
refs = keep(keep(refs_t, "method", method), "student", student) if show_refs else refs.iloc[0:0]
for column, limit in (("macs", max_macs), ("params", max_params)):
    if limit is not None:
        refs = refs[pd.to_numeric(refs[column], errors="coerce").le(limit)]

if board.empty:
    if dataset not in ours_datasets:
        st.info(f"No run of ours on {dataset} yet: the points are published results, reported and not reproduced.",
                icon=":material/menu_book:")
    elif base.empty:
        st.info(f"No full-budget run on {dataset} yet: every trial so far stopped early, diverged or failed. "
                "The Sweeps page shows them.", icon=":material/hourglass:")
        st.page_link(SWEEPS_PAGE, label="Open the Sweeps page", icon=":material/query_stats:")
    else:
        st.info("None of our students matches these filters.", icon=":material/filter_alt_off:")
else:
    column = COSTS[by][0]
    shown_cost = board[column].notna().sum()
    st.caption(f"{len(board)} students (dataset, teacher, student, method); ★ = on the Pareto front of test accuracy "
               f"vs {axis}"
               + (f" ({len(board) - shown_cost} without a {axis} figure are not drawn)" if shown_cost < len(board) else "")
               + ". Hollow markers: published results. Methods of equal cost are spread a little sideways. "
               "Click a point to open its run. " + LEGEND)
colours = method_colours(list(board["method"].dropna().astype(str)) + list(refs["method"].dropna().astype(str)))
if len(board) or len(refs):
    event = st.plotly_chart(leaderboard_figure(board, refs, by, colours), key="lb_chart", on_select="rerun",
                            selection_mode="points", config={"displaylogo": False})
    for point in (event.selection.points if event and event.selection else []):
        data = point.get("customdata") or []
        if isinstance(data, (list, tuple)) and data and data[0]:
            open_run(str(data[0]))

if len(board):
    acc = 100 * pd.to_numeric(board["test_acc_mean"], errors="coerce")
    table = board.assign(rank=rank_labels(board["rank"].astype(int).tolist(), board["dataset"].astype(str).tolist()),
                         pareto=board["pareto"].fillna(False).astype(bool), test_acc_mean=acc,
                         # the 95 % CI's half-width; none from one seed
                         test_acc_ci=100 * pd.to_numeric(board["test_acc_ci_high"], errors="coerce") - acc,
                         val_acc_mean=100 * pd.to_numeric(board["val_acc_mean"], errors="coerce"),
                         vs_alone=[versus_alone_text(r) for r in board.to_dict("records")])
    columns = ["rank", "pareto", "student", "method", "teacher", "val_acc_mean", "test_acc_mean", "test_acc_ci", "n_seeds",
               "vs_alone", "params", "macs", "latency_ms", "key_hparams", "run_id"]
    st.dataframe(table[[c for c in columns if c in table]], hide_index=True, key="lb_table", placeholder="—", column_config={
        "rank": st.column_config.TextColumn("#", width="small", help="=N: tied with another row on the ranking key"),
        "pareto": st.column_config.CheckboxColumn("★ Pareto", width="small"),
        "val_acc_mean": st.column_config.NumberColumn("val acc (%)", format="%.2f", help="ranks the rows"),
        "test_acc_mean": st.column_config.NumberColumn("test acc (%)", format="%.2f"),
        "test_acc_ci": st.column_config.NumberColumn("± 95 % CI", format="%.2f"),
        "n_seeds": st.column_config.NumberColumn("seeds", width="small"),
        "vs_alone": st.column_config.TextColumn("vs alone (pp)", help="paired difference in test accuracy from the "
                                                "student trained alone; ≈ = not distinguishable from it"),
        "params": st.column_config.NumberColumn("params", format="localized"),
        "macs": st.column_config.NumberColumn("MACs", format="localized"),
        "latency_ms": st.column_config.NumberColumn("latency (ms)", format="%.3f"),
        "key_hparams": st.column_config.TextColumn("key hyper-parameters"),
        "run_id": st.column_config.TextColumn("MLflow run"),
    })
    labels = {str(r["run_id"]): f"#{r['rank']} {r['method']} · {r['student']} · "
              + (f"{100 * float(r['test_acc_mean']):.2f}%" if finite(r["test_acc_mean"]) else "—")
              for _, r in board.iterrows() if isinstance(r["run_id"], str) and r["run_id"]}
    pick = st.columns([3, 1])
    chosen = pick[0].selectbox("Open a run", list(labels), format_func=labels.get, key="lb_open",
                               label_visibility="collapsed")
    if pick[1].button("Open run", key="lb_open_button", icon=":material/open_in_new:") and chosen:
        open_run(chosen)

if len(refs):
    with st.expander(f"Published results ({len(refs)}): reported in the papers, not reproduced here",
                     expanded=board.empty):
        cols = ["student", "method", "teacher", "test_acc_mean", "params", "macs", "key_hparams", "source"]
        st.dataframe(refs.assign(test_acc_mean=100 * pd.to_numeric(refs["test_acc_mean"], errors="coerce"))
                     [[c for c in cols if c in refs]], hide_index=True, key="lb_refs_table", placeholder="—", column_config={
                         "test_acc_mean": st.column_config.NumberColumn("test acc (%)", format="%.2f"),
                         "params": st.column_config.NumberColumn("params", format="localized"),
                         "macs": st.column_config.NumberColumn("MACs", format="localized")})
