"""N distillation runs with the teacher store (teacher trained once) vs retraining the teacher in every run.

Both sides run `kdarena train`'s job for the same N students (kd with
different seeds); one keeps one teacher cache, the other gives every run
an empty cache, as a tool without a teacher store would.

    python -m benchmarks.teacher_reuse [--runs 4] [--teacher-epochs 30] [--student-epochs 20]
"""

from __future__ import annotations

import argparse
import time

from kdarena.training.config import parse_config
from kdarena.training.train_job import run_train

from .common import workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--student-epochs", type=int, default=20)
    args = parser.parse_args()
    work = workspace("reuse")
    uri = f"sqlite:///{work / 'mlflow.db'}"

    def runs(cache_for) -> float:
        start = time.perf_counter()
        for seed in range(args.runs):
            cfg = parse_config({"teacher": {"recipe": {"epochs": args.teacher_epochs}},
                                "train": {"epochs": args.student_epochs, "seed": seed}, "cache_dir": str(cache_for(seed))})
            run_train(cfg, uri)
        return time.perf_counter() - start

    stored = runs(lambda seed: work / "shared-cache")
    retrained = runs(lambda seed: work / f"cache-{seed}")
    print(f"{args.runs} kd runs on digits: teacher cnn(32) {args.teacher_epochs} epochs, student cnn(8) {args.student_epochs} epochs")
    print(f"with the teacher store: {stored:.1f} s; retraining the teacher every run: {retrained:.1f} s")
    print(f"speed-up from the store: {retrained / stored:.2f}x")


if __name__ == "__main__":
    main()
