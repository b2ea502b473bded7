"""Run: one student's learning curves, costs, teacher and the config that re-runs it."""

import pandas as pd
import streamlit as st

from kdarena.dashboard.views import SWEEPS_PAGE, cached_run_detail, finite, page_runs, run_labels
from kdarena.dashboard.views.charts import curves_figure
from kdarena.training.record import Metric, Param, Role, Status, Tag

uri, ours = page_runs("Run")

ours = ours.sort_values("start_time", ascending=False)
# runs by group, so a store of 10,000 trials never fills one list: finals and train runs, then each sweep's trials
FINALS = "final and train runs"
groups = {FINALS: ours[ours["role"] != "trial"]} if (ours["role"] != "trial").any() else {}
trials = ours[ours["role"] == "trial"]
groups |= {f"trials of sweep {s}": g for s, g in trials.groupby(trials["sweep"].fillna("?"), sort=True)}
wanted = st.query_params.get("run")
home = next((name for name, g in groups.items() if wanted in set(g["run_id"])), next(iter(groups)))
names = list(groups)
pick = st.columns([1, 3])
group = pick[0].selectbox("Runs", names, index=names.index(home), key=f"run_group_{wanted}")
labels = run_labels(groups[group])
if wanted and group == home and wanted not in labels:
    labels = {wanted: f"run {wanted}"} | labels
ids = list(labels)
run_id = pick[1].selectbox("Run", ids, index=ids.index(wanted) if wanted in labels else 0, format_func=labels.get,
                           key=f"run_pick_{wanted}_{group}")
st.query_params["run"] = run_id

try:
    detail = cached_run_detail(uri, run_id)
except LookupError:
    st.warning(f"No run `{run_id}` in `{uri}`.", icon=":material/search_off:")
    st.stop()
except Exception as exc:  # the store went away between reads: say so, never a traceback
    st.error(f"Cannot read run `{run_id}` from `{uri}`: {exc}")
    st.stop()

tags, metrics, params, histories = detail["tags"], detail["metrics"], detail["params"], detail["histories"]
method = tags.get(Tag.METHOD) or params.get(Param.METHOD_NAME) or "?"
student = tags.get(Tag.STUDENT_LABEL) or tags.get(Tag.STUDENT) or params.get("student.arch") or "?"
status = tags.get(Tag.STATUS) or detail["state"].lower()
role = tags.get(Role.TAG, "?")
sweep = tags.get(Tag.SWEEP)
dataset = tags.get(Tag.DATASET_LABEL) or tags.get(Tag.DATASET, "?")
st.subheader(f"{method} → {student}")
where = f" · sweep `{sweep}`" if sweep else ""
st.caption(f"{role} run `{run_id}` ({detail['run_name']}) · dataset {dataset}{where} · "
           f"status **{status}** · started {pd.to_datetime(detail['start_time'], unit='ms', utc=True):%Y-%m-%d %H:%M} UTC")
if status not in (Status.COMPLETED, Status.RUNNING):
    reason = tags.get(Tag.REASON)
    text = {Status.EARLY_STOPPED: "Stopped early by ASHA: it saw part of the budget, so it never ranks.",
            Status.DIVERGED: "Diverged: training stopped on a non-finite loss, so it never ranks.",
            Status.FAILED: "Failed: the trial raised an error, so it never ranks."}.get(status, f"Status {status}.")
    st.warning(text + (f" Reason: {reason}" if reason else ""), icon=":material/warning:")
if sweep:
    st.page_link(SWEEPS_PAGE, label=f"Sweep {sweep}", icon=":material/query_stats:", query_params={"sweep": sweep})


def figure(value, fmt: str) -> str:
    return fmt.format(value) if finite(value) else "—"


st.markdown("##### Accuracy and cost")
cols = st.columns(7)
cols[0].metric("test acc", figure(100 * metrics[Metric.TEST_ACC] if Metric.TEST_ACC in metrics else None, "{:.2f}%"))
val = metrics.get(Metric.FINAL_VAL_ACC, metrics.get(Metric.VAL_ACC))
cols[1].metric("val acc (last epoch)", figure(100 * val if finite(val) else None, "{:.2f}%"))
cols[2].metric("params", figure(metrics.get(Metric.PARAMS), "{:,.0f}"))
cols[3].metric("MACs", figure(metrics.get(Metric.MACS), "{:,.0f}"), help="FLOPs / 2, deployed student, one input")
cols[4].metric("FLOPs", figure(metrics.get(Metric.FLOPS), "{:,.0f}"))
cols[5].metric("latency", figure(metrics.get(Metric.LATENCY_MS), "{:.3f} ms"), help="CPU, batch 1")
cols[6].metric("training-only", figure(metrics.get(Metric.EXTRA_PARAMS), "{:,.0f}"),
               help="the method's extra modules (regressors, critics), excluded from the deployed cost")

st.markdown("##### Teacher")
teacher_label = tags.get(Tag.TEACHER_LABEL) or tags.get(Tag.TEACHER)
if teacher_label:
    tcols = st.columns([1, 3, 1])
    tcols[0].markdown(f"**{teacher_label}**")
    tcols[1].code(tags.get(Tag.TEACHER_SHA256) or "no sha256 recorded", language=None)
    tcols[2].metric("teacher test acc", figure(100 * metrics[Metric.TEACHER_TEST_ACC]
                                               if Metric.TEACHER_TEST_ACC in metrics else None, "{:.2f}%"))
else:
    st.caption("No teacher: this method trains the student alone.")

st.markdown("##### Learning curves")
losses = sorted(k for k in histories if k.startswith(Metric.LOSSES))
accs = [k for k in (Metric.VAL_ACC, Metric.TRAIN_ACC) if k in histories]
diags = sorted(k for k in histories if k.startswith(Metric.DIAG_PREFIX))
if not (losses or accs or diags):
    st.info("No per-epoch metrics recorded (the run stopped before its first epoch ended).", icon=":material/info:")
left, right = st.columns(2)
if losses:
    left.plotly_chart(curves_figure(histories, losses, "training loss (per term)"), key="run_losses",
                      config={"displaylogo": False})
if accs:
    right.plotly_chart(curves_figure(histories, accs, "accuracy (%)", percent=True), key="run_accs",
                       config={"displaylogo": False})
if diags:
    st.plotly_chart(curves_figure(histories, diags, "diagnostic"), key="run_diags", config={"displaylogo": False})

st.markdown("##### Config")
config = detail.get("config_yaml")
if config is None:
    st.info("This run has no config.yaml artifact.", icon=":material/info:")
else:
    data = config if isinstance(config, bytes) else config.encode("utf-8")
    st.download_button("Download config.yaml", data=data, file_name=f"{method}-{run_id[:8]}.yaml",
                       mime="application/x-yaml", icon=":material/download:", key="run_download", on_click="ignore",
                       help="exactly what `kdarena export` writes for this run; re-run it with `kdarena train FILE`")
    st.code(data.decode("utf-8"), language="yaml")

with st.expander(f"All params ({len(params)}) and tags"):
    st.dataframe(pd.DataFrame(sorted(params.items()), columns=["param", "value"]), hide_index=True)
    st.dataframe(pd.DataFrame(sorted((k, v) for k, v in tags.items() if not k.startswith("mlflow.")),
                              columns=["tag", "value"]), hide_index=True)
