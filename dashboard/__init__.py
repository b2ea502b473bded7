"""The leaderboard: pure query functions over MLflow (`queries`, `pareto`) and the Streamlit app over them.

`queries` and `pareto` import neither Streamlit nor Ray, so the CLI
(`kdarena leaderboard`) and the app share one ranking.
"""
