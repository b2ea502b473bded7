"""kdarena dashboard: `kdarena dashboard` (or `streamlit run dashboard/app.py -- --tracking-uri URI`).

Three pages over the MLflow records a sweep writes: the Leaderboard
(students by test accuracy vs cost, Pareto front, published results), the
Sweeps (each search's history, parameter importances, parallel
coordinates) and one Run (curves, costs, teacher, its re-runnable config).
Read-only: nothing here writes to MLflow.
"""

import os

import streamlit as st

# MLflow draws a progress bar on the server's console for every artifact a page reads
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
st.set_page_config(page_title="kdarena", page_icon=":material/leaderboard:", layout="wide")

pages = [
    st.Page("views/leaderboard.py", title="Leaderboard", icon=":material/leaderboard:", url_path="leaderboard",
            default=True),
    st.Page("views/sweeps.py", title="Sweeps", icon=":material/query_stats:", url_path="sweeps"),
    st.Page("views/run.py", title="Run", icon=":material/monitoring:", url_path="run"),
]
st.navigation(pages).run()
