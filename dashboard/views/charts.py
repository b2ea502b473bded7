"""The dashboard's figures and the parameter-importance computation: plain functions, no Streamlit.

Parameter importances are fANOVA (Optuna's `FanovaImportanceEvaluator`, a
random forest of 32 trees over the trials) computed from the MLflow trial runs: each
trial becomes an Optuna `FrozenTrial` (`optuna.trial.create_trial`) with the
searched values as its params and its last val_acc as its value, which is
the value Optuna itself recorded (an ASHA-stopped trial is COMPLETE with its
partial score). With too few trials for a forest (fewer than
`MIN_FANOVA_TRIALS` scored ones), or when the forest cannot be fitted, the
absolute Spearman correlation with val_acc stands in, and the caption says so.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from kdarena.training.record import Status

COSTS = {  # `by` -> (column, axis title)
    "macs": ("macs", "MACs (deployed student, log scale)"),
    "params": ("params", "parameters (deployed student, log scale)"),
    "latency": ("latency_ms", "latency, ms (CPU, batch 1, log scale)"),
}
# below this many scored trials a forest of fANOVA's trees splits a handful of points: its importances are noise
MIN_FANOVA_TRIALS = 10
STATUS_STYLE = {  # status -> (marker symbol, description)
    Status.COMPLETED: ("circle", "completed (full budget)"),
    Status.EARLY_STOPPED: ("diamond-open", "early-stopped by ASHA"),
    Status.DIVERGED: ("x", "diverged (no val_acc)"),
    Status.FAILED: ("cross", "failed (no val_acc)"),
    Status.RUNNING: ("circle-dot", Status.RUNNING),
}
NO_SCORE = Status.NO_SCORE


def method_colours(methods: list[str]) -> dict[str, str]:
    """One colour per method, stable for a given set of names (ours and the published ones)."""
    palette = qualitative.Plotly + qualitative.D3
    return {m: palette[i % len(palette)] for i, m in enumerate(sorted(set(methods)))}


def _num(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce")


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def leaderboard_figure(board: pd.DataFrame, refs: pd.DataFrame, by: str, colours: dict[str, str]) -> go.Figure:
    """Test accuracy vs cost (log x), a colour per method, the Pareto front as a staircase, references hollow."""
    column, title = COSTS[by]
    fig = go.Figure()
    ours = board.assign(_x=_num(board.get(column, pd.Series(dtype=float))), _y=100 * _num(board["test_acc_mean"]),
                        _e=100 * _num(board["test_acc_std"]).fillna(0.0))
    ours = ours[(ours["_x"] > 0) & ours["_y"].notna()]
    # students of one architecture share a cost: spread the methods a hair sideways (±3 %) so none hides another
    names = sorted(ours["method"].astype(str).unique())
    spread = {m: 10 ** (0.025 * ((i / (len(names) - 1)) - 0.5)) if len(names) > 1 else 1.0 for i, m in enumerate(names)}
    ours = ours.assign(_cost=ours["_x"], _x=ours["_x"] * np.array([spread[m] for m in ours["method"].astype(str)], dtype=float))
    for method, rows in ours.groupby("method", sort=True):
        pareto = rows["pareto"].fillna(False).astype(bool)
        fig.add_trace(go.Scatter(
            x=rows["_x"], y=rows["_y"], mode="markers", name=str(method), legendgroup=str(method),
            error_y={"type": "data", "array": rows["_e"], "visible": True, "thickness": 1},
            marker={"color": colours.get(method), "size": np.where(pareto, 15, 10),
                    "symbol": np.where(pareto, "star", "circle").tolist(),
                    "line": {"color": "black", "width": np.where(pareto, 1.5, 0.5).tolist()}},
            customdata=np.column_stack([rows["run_id"].astype(str), rows["student"].map(_text),
                                        rows["teacher"].map(_text), rows["n_seeds"].map(_text),
                                        rows["key_hparams"].map(_text), np.where(pareto, "yes", "no"),
                                        rows["_cost"].map(lambda v: f"{v:,.6g}")]),
            hovertemplate=("<b>%{customdata[1]}</b> · " + str(method) + "<br>test acc %{y:.2f}% "
                           "± %{error_y.array:.2f} (%{customdata[3]} seeds)<br>" + column + " %{customdata[6]}<br>"
                           "teacher %{customdata[2]}<br>%{customdata[4]}<br>Pareto: %{customdata[5]}"
                           "<br><i>click to open the run</i><extra></extra>")))
    front = ours[ours["pareto"].fillna(False).astype(bool)].sort_values(["_x", "_y"])
    if len(front):
        fig.add_trace(go.Scatter(x=front["_x"], y=front["_y"], mode="lines", name="Pareto front",
                                 line={"color": "black", "dash": "dash", "width": 1.5, "shape": "hv"},
                                 hoverinfo="skip"))
    if refs is not None and len(refs):
        theirs = refs.assign(_x=_num(refs.get(column, pd.Series(np.nan, index=refs.index))),
                             _y=100 * _num(refs["test_acc_mean"]))
        theirs = theirs[(theirs["_x"] > 0) & theirs["_y"].notna()]
        for method, rows in theirs.groupby("method", sort=True):
            fig.add_trace(go.Scatter(
                x=rows["_x"], y=rows["_y"], mode="markers", name=f"{method} (published)", legendgroup=str(method),
                marker={"color": colours.get(method), "size": 10, "symbol": "circle-open", "line": {"width": 2}},
                customdata=np.column_stack([np.full(len(rows), ""), rows["student"].map(_text),
                                            rows["teacher"].map(_text), rows["source"].map(_text)]),
                hovertemplate=("<b>%{customdata[1]}</b> · " + str(method) + " (published, not reproduced)<br>"
                               "test acc %{y:.2f}%<br>" + column + " %{x:,.4~g}<br>teacher %{customdata[2]}<br>"
                               "%{customdata[3]}<extra></extra>")))
    fig.update_xaxes(type="log", title=title)
    fig.update_yaxes(title="test accuracy (%)")
    fig.update_layout(height=480, margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend_title_text="method",
                      clickmode="event+select")
    return fig


def with_trial_numbers(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials in start order, numbered from 1, with val_acc in percent (NaN when there is none)."""
    key = "order" if "order" in trials else "start_time" if "start_time" in trials else None
    order = (trials.sort_values(key, kind="stable") if key else trials).reset_index(drop=True)
    return order.assign(trial=np.arange(1, len(order) + 1), val_pct=100 * _num(order["val_acc"]),
                        status=order["status"].fillna(Status.RUNNING).astype(str),
                        reason=order["reason"].map(_text) if "reason" in order else "")


def history_figure(trials: pd.DataFrame, colours: dict[str, str]) -> go.Figure:
    """val_acc per trial in start order (symbol = status), best-so-far per method over full-budget trials."""
    t = with_trial_numbers(trials)
    floor = 0.0
    fig = go.Figure()
    for (method, status), rows in t.groupby(["method", "status"], sort=True):
        symbol, desc = STATUS_STYLE.get(status, ("circle", status))
        y = rows["val_pct"].fillna(floor) if status in NO_SCORE else rows["val_pct"]
        fig.add_trace(go.Scatter(
            x=rows["trial"], y=y, mode="markers", name=f"{method}: {desc}", legendgroup=str(method),
            marker={"color": colours.get(method), "symbol": symbol, "size": 11 if status in NO_SCORE else 9,
                    "line": {"width": 2 if status != Status.COMPLETED else 0.5, "color": colours.get(method)}},
            customdata=np.column_stack([rows["run_id"].astype(str), rows["reason"].map(_text),
                                        rows["epochs_completed"].map(_text)]),
            hovertemplate=(f"trial %{{x}} · {method} · {status}<br>val acc %{{y:.2f}}%<br>"
                           "epochs %{customdata[2]}<br>%{customdata[1]}<extra></extra>")))
    for method, rows in t[t["status"] == Status.COMPLETED].groupby("method", sort=True):
        rows = rows[rows["val_pct"].notna()]
        if len(rows):  # a step line to the last trial: the best a method had found by then
            x = [*rows["trial"], int(t["trial"].max())]
            best = rows["val_pct"].cummax().tolist()
            fig.add_trace(go.Scatter(x=x, y=[*best, best[-1]], mode="lines",
                                     name=f"{method}: best so far", legendgroup=str(method),
                                     line={"color": colours.get(method), "shape": "hv", "width": 2},
                                     hoverinfo="skip"))
    fig.update_xaxes(title="trial (start order)")
    fig.update_yaxes(title="val accuracy (%)  — diverged/failed drawn at 0")
    fig.update_layout(height=420, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return fig


def val_acc_by_method_figure(trials: pd.DataFrame, colours: dict[str, str]) -> go.Figure:
    """val_acc per method: boxes with every trial as a point, one group per status; diverged/failed as x at 0."""
    t = with_trial_numbers(trials)
    fig = go.Figure()
    for status in (Status.COMPLETED, Status.EARLY_STOPPED):
        rows = t[(t["status"] == status) & t["val_pct"].notna()]
        if len(rows):
            fig.add_trace(go.Box(x=rows["method"], y=rows["val_pct"], name=STATUS_STYLE[status][1],
                                 boxpoints="all", jitter=0.4, pointpos=0,
                                 marker={"symbol": STATUS_STYLE[status][0], "size": 8},
                                 customdata=rows[["run_id"]].astype(str).to_numpy(),
                                 hovertemplate="%{x}<br>val acc %{y:.2f}%<extra></extra>"))
    bad = t[t["status"].isin(NO_SCORE)]
    if len(bad):
        fig.add_trace(go.Scatter(x=bad["method"], y=np.zeros(len(bad)), mode="markers", name="diverged / failed",
                                 marker={"symbol": "x", "size": 11, "color": "#d62728"},
                                 customdata=bad[["reason"]].to_numpy(),
                                 hovertemplate="%{x}: %{customdata[0]}<extra></extra>"))
    fig.update_layout(boxmode="group", height=380, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    fig.update_yaxes(title="val accuracy (%)")
    return fig


def _coerce(value: Any) -> Any:
    """MLflow params are strings: '0.5' -> 0.5, '3' -> 3, 'True' stays a string (a category)."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return None if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    text = str(value)
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
        return number if math.isfinite(number) else text
    except ValueError:
        return text


def hparam_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One column per searched parameter that varies across these trials (values coerced to numbers).

    The searched point under Optuna's names (`searched`: kd/temperature →
    shown as temperature), else the run's hyper-parameters (`hparams`), plus
    the student when the sweep searched over several.
    """
    column = "searched" if "searched" in trials and trials["searched"].map(bool).any() else "hparams"
    dicts = trials[column] if column in trials else pd.Series([{}] * len(trials), index=trials.index)
    records = [{k.split("/", 1)[-1] if k.count("/") == 1 and not k.startswith("student") else k: _coerce(v)
                for k, v in (h if isinstance(h, dict) else {}).items()} for h in dicts]
    table = pd.DataFrame(records, index=trials.index)
    if "student" in trials and trials["student"].nunique() > 1:
        table["student"] = trials["student"].astype(str)
    keep = [c for c in table.columns if table[c].dropna().astype(str).nunique() > 1]
    return table[keep]


def param_importances(trials: pd.DataFrame) -> tuple[pd.Series, str]:
    """(importance per parameter, how it was computed) over trials with a val_acc; empty when it cannot be said."""
    scored = trials[_num(trials["val_acc"]).notna()]
    table = hparam_table(scored)
    if len(scored) < 2 or table.empty:
        return pd.Series(dtype=float), "needs at least two scored trials whose searched parameters differ"
    # parameters every scored trial has: Optuna's importance works on the common search space
    table = table.dropna(axis=1)
    if table.empty:
        return pd.Series(dtype=float), "no searched parameter is shared by all scored trials"
    values = _num(scored["val_acc"]).to_numpy(dtype=float)
    if len(scored) >= MIN_FANOVA_TRIALS:
        try:
            return _fanova(table, values), f"fANOVA (Optuna) over {len(scored)} scored trials"
        except Exception:  # too uniform trials for a forest: the plainer measure below
            pass
    # too few trials for a forest (or it could not be fitted): a plainer measure
    # categorical values (the student, a choice) as category codes; pandas may hold strings as object or as str
    ranks = table.apply(lambda col: col if pd.api.types.is_numeric_dtype(col) else col.astype(str).astype("category").cat.codes)
    rho = ranks.corrwith(pd.Series(values, index=table.index), method="spearman").abs().fillna(0.0)
    return rho.sort_values(ascending=False), f"|Spearman ρ| with val_acc over {len(scored)} scored trials"


def _fanova(table: pd.DataFrame, values: np.ndarray) -> pd.Series:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {}
    for name in table.columns:
        col = table[name]
        if col.map(lambda v: isinstance(v, str)).any():
            distributions[name] = CategoricalDistribution(sorted(col.astype(str).unique()))
        elif col.map(lambda v: isinstance(v, int)).all():
            distributions[name] = IntDistribution(int(col.min()), int(col.max()))
        else:
            low, high = float(col.min()), float(col.max())
            distributions[name] = FloatDistribution(low, high, log=low > 0 and high / low >= 100)
    study = optuna.create_study(direction="maximize")
    for (_, row), value in zip(table.iterrows(), values):
        params = {n: (str(row[n]) if isinstance(distributions[n], CategoricalDistribution)
                      else int(row[n]) if isinstance(distributions[n], IntDistribution) else float(row[n]))
                  for n in table.columns}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(value)))
    scores = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=32, seed=0))  # half the default: 2x faster
    return pd.Series(scores, dtype=float).sort_values(ascending=False)


def importance_figure(scores: pd.Series) -> go.Figure:
    s = scores.sort_values()
    fig = go.Figure(go.Bar(x=s.to_numpy(), y=s.index.astype(str), orientation="h",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(height=max(220, 40 * len(s) + 80), margin={"l": 10, "r": 10, "t": 30, "b": 10})
    fig.update_xaxes(title="importance for val_acc")
    return fig


def parallel_figure(trials: pd.DataFrame) -> go.Figure:
    """One line per trial through its searched values, its status and its val_acc (0 for diverged/failed)."""
    t = with_trial_numbers(trials)
    table = hparam_table(t)
    dims = []
    for name in table.columns:
        col = table[name]
        if col.map(lambda v: isinstance(v, str)).any() or col.isna().any():
            labels = col.map(lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
            cats = sorted(labels.unique())
            dims.append({"label": name, "values": labels.map(cats.index).to_numpy(),
                         "tickvals": list(range(len(cats))), "ticktext": cats})
        else:
            dims.append({"label": name, "values": col.astype(float).to_numpy()})
    statuses = sorted(t["status"].unique())
    dims.append({"label": "status", "values": t["status"].map(statuses.index).to_numpy(),
                 "tickvals": list(range(len(statuses))), "ticktext": statuses})
    score = t["val_pct"].fillna(0.0).to_numpy()
    dims.append({"label": "val acc (%)", "values": score})
    fig = go.Figure(go.Parcoords(dimensions=dims, line={"color": score, "colorscale": "Viridis"}))
    fig.update_layout(height=420, margin={"l": 60, "r": 40, "t": 50, "b": 20})
    return fig


def curves_figure(histories: dict[str, list[tuple[int, float]]], names: list[str], y_title: str,
                  percent: bool = False) -> go.Figure:
    fig = go.Figure()
    for name in names:
        points = sorted(histories.get(name, []))
        if not points:
            continue
        steps = [p[0] for p in points]
        values = [100 * p[1] if percent else p[1] for p in points]
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=name))
    fig.update_xaxes(title="epoch")
    fig.update_yaxes(title=y_title)
    fig.update_layout(height=340, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return fig
