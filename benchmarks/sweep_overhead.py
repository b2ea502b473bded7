"""The same trials as a plain Python loop vs under `kdarena sweep` (Ray Tune + Optuna + MLflow recording).

Every trial is the same fixed kd config (nothing searched, no early
stopping), one trial at a time with one thread on both sides, so the ratio
is what the sweep machinery costs: Ray start-up, the object store, the
trial actor, per-epoch reports and checkpoints, the driver's MLflow writes.
The teacher is trained before either side is timed.

A shared 2-vCPU machine drifts by 10-20 % in speed over minutes, so the
plain loop runs before and after the sweep and the ratio is against their
mean; the seconds the trials spent inside their epochs are printed for both
sides, so a drift (or epochs slowed by Ray's processes) shows.

With `--address`, the sweep attaches to a Ray that is already running
(`ray start --head --num-cpus 2`), as on a cluster: Ray's own start-up is
then not part of the sweep's time.

    python -m benchmarks.sweep_overhead [--trials 4] [--epochs 40] [--channels 32] [--address ADDR]
"""

from __future__ import annotations

import argparse
import time

import ray
import torch

from kdarena.methods.engine import fit
from kdarena.training.config import parse_config
from kdarena.search.sweep_config import parse_sweep, trial_config
from kdarena.training.train_job import Callbacks, build_distiller, load_config_dataset, resolve_teacher, teacher_cache_dir

from .common import timed_sweep, workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--channels", type=int, default=32, help="student width: sets the seconds per trial")
    parser.add_argument("--address", default=None, help="a running Ray to attach to instead of starting one")
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

    def plain_loop() -> tuple[float, float]:
        """Wall seconds of the trials as a plain loop, and the seconds spent inside their epochs."""
        start, in_epochs = time.perf_counter(), 0.0
        for _ in range(args.trials):
            trial_cfg = trial_config(sweep, "kd", 0, {}, {})
            result = fit(build_distiller(trial_cfg, data, teacher.model), data, trial_cfg.train,
                         device=torch.device("cpu"))
            in_epochs += sum(e.seconds for e in result.history)
        return time.perf_counter() - start, in_epochs

    before, before_epochs = plain_loop()
    swept, records = timed_sweep(doc, address=args.address, num_cpus=None if args.address else 2)
    swept_epochs = sum(h["metrics"]["epoch_seconds"] for r in records["trials"].values() for h in r["history"])
    ray.shutdown()  # the plain loop after must not share the machine with an idle Ray
    after, after_epochs = plain_loop()
    plain = (before + after) / 2
    print(f"{args.trials} trials of kd, cnn(channels={args.channels}, depth=2) on digits, {args.epochs} epochs, "
          "1 thread, one at a time")
    print(f"plain loop before: {before:.1f} s ({before_epochs:.1f} s in epochs)")
    print(f"kdarena sweep:     {swept:.1f} s ({swept_epochs:.1f} s in epochs), {len(records['trials'])} trials recorded")
    print(f"plain loop after:  {after:.1f} s ({after_epochs:.1f} s in epochs)")
    print(f"ratio (sweep / mean of the plain loops): {swept / plain:.3f}")
    print(f"sweep seconds beyond its epochs: {swept - swept_epochs:.1f} s; the plain loops': "
          f"{before - before_epochs:.1f} s, {after - after_epochs:.1f} s")

if __name__ == "__main__":
    main()
