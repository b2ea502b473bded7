"""Every method with its defaults on digits, 3 seeds: mean ± std test accuracy beside the student alone.

The first honest comparison table: a CNN teacher (channels 32) distils a CNN
student (channels 4, 1.7 k params) for 20 epochs with each method's default parameters and
the default recipe. Defaults are not tuned per pair — that is what a sweep
is for — so a method below the student alone here says its defaults do not
fit this pair, not that the method cannot help.

Every registered method runs by default, each through `kdarena train`'s own
job (`run_train`, hence the engine's batching: a method that asks for a
strong view or for the batch's split indices gets them); baseline always
runs, as the column the others are compared with. A method that refuses the
pair is listed as refused.

    python -m benchmarks.methods_digits [--seeds 3] [--epochs 20] [--methods kd at] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from kdarena.methods import METHODS
from kdarena.training.config import parse_config
from kdarena.training.train_job import run_train
from kdarena.zoo.errors import UserError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                        help="only these (baseline always runs); default every registered method")
    parser.add_argument("--student-channels", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=None, help="default: the teacher recipe's own (30)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 seed, 1 epoch, a 2-epoch teacher (overrides --seeds/--epochs/--teacher-epochs)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs = 1, 1, 2
    methods = list(dict.fromkeys(["baseline", *(args.methods or METHODS)]))
    teacher = {"arch": "cnn", "options": {"channels": 32}}
    if args.teacher_epochs is not None:
        teacher["recipe"] = {"epochs": args.teacher_epochs, "lr": 0.05}

    work = Path(tempfile.mkdtemp(prefix="kdarena-bench-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    rows = []
    for method in methods:
        accs, seconds, summary = [], [], {"teacher_test_acc": None}
        for seed in range(args.seeds):
            cfg = parse_config({"method": {"name": method}, "train": {"epochs": args.epochs, "seed": seed},
                                "teacher": teacher,
                                "student": {"arch": "cnn", "options": {"channels": args.student_channels}},
                                "cache_dir": str(work / "teachers")})
            start = time.perf_counter()
            try:
                summary = run_train(cfg, uri)
            except UserError as exc:  # the method refuses this pair, before any training
                print(f"{method}: refused: {exc}", flush=True)
                break
            seconds.append(time.perf_counter() - start)
            accs.append(summary["test_acc"] if summary["status"] == "completed" else float("nan"))
        if not accs:
            continue
        rows.append((method, accs, statistics.median(seconds), summary["teacher_test_acc"]))
        print(f"{method}: {accs}", flush=True)

    names = [r[0] for r in rows]
    base = statistics.mean(rows[names.index("baseline")][1]) if "baseline" in names else None
    teacher_epochs = args.teacher_epochs if args.teacher_epochs is not None else "default"
    print(f"\ndigits, cnn(channels=32, {teacher_epochs} teacher epochs) -> cnn(channels={args.student_channels}), "
          f"{args.epochs} epochs, {args.seeds} seeds, method defaults")
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
