"""The sweep: a Ray Tune experiment of one Optuna study per method, recorded in records.json and mirrored to MLflow."""
