"""The Streamlit dashboard: `app.py` and its pages (`views/`), over `kdarena.leaderboards`, which ranks."""
