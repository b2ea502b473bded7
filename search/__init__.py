"""Configs, the teacher store, MLflow recording and the CLI (later: the Ray Tune + Optuna sweep)."""
