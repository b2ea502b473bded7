"""The same trials as a plain Python loop vs under `kdarena sweep` (Ray Tune + Optuna + MLflow recording).

Every trial is the same fixed kd config (nothing searched, no early
stopping), one trial at a time with one thread on both sides, so the ratio
is what the sweep machinery costs: Ray start-up, the object store, the
trial actor, per-epoch reports and checkpoints, the driver's MLflow writes.
The teacher is trained before either side is timed.

    python -m benchmarks.sweep_overhead [--trials 4] [--epochs 30] [--channels 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from kdarena.methods.engine import fit
from kdarena.search.config import parse_config
from kdarena.search.sweep_config import parse_sweep, trial_config
from kdarena.search.train_job import Callbacks, build_distiller, load_config_dataset, resolve_teacher, teacher_cache_dir

from .common import timed_sweep, workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--channels", type=int, default=32, help="student width: sets the seconds per trial")
    args = parser.parse_args()
    work = workspace("overhead")

    fixed = {"temperature": 4.0, "alpha": 0.9, "lr": 0.05, "weight_decay": 5e-4}
    doc = {"name": "overhead", "dataset": {"name": "digits"},
           "teacher": {"arch": "cnn", "options": {"channels": 32}, "recipe": {"epochs": 10}},
           "students": [{"arch": "cnn", "options": {"channels": args.channels, "depth": 2}}],
           "methods": {"kd": {"fix": fixed}},
           "budget": {"trials_per_method": args.trials, "epochs": args.epochs, "early_stopping": False},
           "resources": {"cpu": 1}, "max_concurrent": 1}

    # the teacher, once, outside both timings
    cfg = parse_config({"teacher": doc["teacher"], "train": {"num_threads": 1}})
    data = load_config_dataset(cfg.dataset)
    teacher = resolve_teacher(cfg.teacher, cfg.dataset, data, teacher_cache_dir(None), "kdarena",
                              f"sqlite:///{work / 'mlflow.db'}", Callbacks(), torch.device("cpu"))

    sweep = parse_sweep(doc, "overhead")
    torch.set_num_threads(1)
    start = time.perf_counter()
    for _ in range(args.trials):
        trial_cfg = trial_config(sweep, "kd", 0, {}, {})
        fit(build_distiller(trial_cfg, data, teacher.model), data, trial_cfg.train, device=torch.device("cpu"))
    plain = time.perf_counter() - start

    swept, records = timed_sweep(doc, num_cpus=2)
    per_trial = plain / args.trials
    print(f"{args.trials} trials of kd, cnn(channels={args.channels}, depth=2) on digits, {args.epochs} epochs, 1 thread, one at a time")
    print(f"plain loop: {plain:.1f} s ({per_trial:.1f} s per trial)")
    print(f"kdarena sweep: {swept:.1f} s, {len(records['trials'])} trials recorded")
    print(f"ratio (sweep / plain loop): {swept / plain:.3f}")


if __name__ == "__main__":
    main()
