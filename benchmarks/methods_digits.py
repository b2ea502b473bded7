"""Every method with its defaults on digits, 3 seeds: mean ± std test accuracy beside the student alone.

The first honest comparison table: a CNN teacher (channels 32) distils a CNN
student (channels 4, 1.7 k params) for 20 epochs with each method's default parameters and
the default recipe. Defaults are not tuned per pair — that is what a sweep
is for — so a method below the student alone here says its defaults do not
fit this pair, not that the method cannot help.

    python -m benchmarks.methods_digits [--seeds 3] [--epochs 20] [--methods kd at]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from kdarena.methods import METHODS
from kdarena.search.config import parse_config
from kdarena.search.train_job import run_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--student-channels", type=int, default=4)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kdarena-bench-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    rows = []
    for method in args.methods:
        accs, seconds = [], []
        for seed in range(args.seeds):
            cfg = parse_config({"method": {"name": method}, "train": {"epochs": args.epochs, "seed": seed},
                                "student": {"arch": "cnn", "options": {"channels": args.student_channels}},
                                "cache_dir": str(work / "teachers")})
            start = time.perf_counter()
            summary = run_train(cfg, uri)
            seconds.append(time.perf_counter() - start)
            accs.append(summary["test_acc"] if summary["status"] == "completed" else float("nan"))
        rows.append((method, accs, statistics.median(seconds), summary["teacher_test_acc"]))
        print(f"{method}: {accs}", flush=True)

    base = statistics.mean(rows[[r[0] for r in rows].index("baseline")][1]) if "baseline" in args.methods else None
    print(f"\ndigits, cnn(channels=32) -> cnn(channels={args.student_channels}), {args.epochs} epochs, "
          f"{args.seeds} seeds, method defaults")
    teacher_acc = next((r[3] for r in rows if r[3] is not None), None)
    if teacher_acc is not None:
        print(f"teacher test_acc: {100 * teacher_acc:.2f}%")
    print("| method | test_acc (mean ± std) | vs student alone | s per run |")
    print("|---|---|---|---|")
    for method, accs, secs, _ in rows:
        mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        delta = f"{100 * (mean - base):+.2f}" if base is not None and method != "baseline" else "—"
        print(f"| {method} | {100 * mean:.2f} ± {100 * std:.2f} | {delta} | {secs:.1f} |")


if __name__ == "__main__":
    main()
