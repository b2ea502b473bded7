"""One run of training: `kdarena train`'s job, the teacher store, the config schema train and sweep share,
and the MLflow record's vocabulary (`record`), which every writer and reader imports."""
