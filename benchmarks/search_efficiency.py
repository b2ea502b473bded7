"""TPE + ASHA vs random search without early stopping, at equal compute, on digits.

Both search kd's space for the same student. TPE + ASHA runs `--trials`
trials and may stop weak ones early; random search then gets as many
full-budget trials as fit in the epochs TPE + ASHA spent. Printed: the best
val_acc each had reached after 25/50/75/100% of those epochs.

    python -m benchmarks.search_efficiency [--trials 24] [--epochs 10]
"""

from __future__ import annotations

import argparse
import math

from .common import timed_sweep, workspace


def best_by_epochs(records: dict, marks: list[int]) -> list[float]:
    """Best val_acc reported by any trial once `mark` epochs had been spent, in the order trials reported."""
    events = sorted((r["started"] + r["last_result"].get("time_total_s", 0), r["metrics"].get("epochs_completed", 0),
                     r["last_result"].get("val_acc", 0.0)) for r in records["trials"].values())
    best, spent, out, i = 0.0, 0, [], 0
    for mark in marks:
        while i < len(events) and spent + events[i][1] <= mark:
            spent += events[i][1]
            best = max(best, events[i][2])
            i += 1
        out.append(best)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--student-channels", type=int, default=4, help="a small student leaves room to find")
    args = parser.parse_args()
    workspace("search")
    base = {"dataset": {"name": "digits"},
            "teacher": {"arch": "cnn", "options": {"channels": 32}, "recipe": {"epochs": 15}},
            "students": [{"arch": "cnn", "options": {"channels": args.student_channels}}], "methods": {"kd": {}},
            "resources": {"cpu": 1}}
    tpe_doc = base | {"name": "tpe-asha", "sampler": "tpe",
                      "budget": {"trials_per_method": args.trials, "epochs": args.epochs, "grace_period": 1,
                                 "reduction_factor": 3}}
    _, tpe = timed_sweep(tpe_doc, num_cpus=2)
    spent = sum(r["metrics"].get("epochs_completed", 0) for r in tpe["trials"].values())
    random_trials = max(1, math.floor(spent / args.epochs))
    random_doc = base | {"name": "random-full", "sampler": "random",
                         "budget": {"trials_per_method": random_trials, "epochs": args.epochs, "early_stopping": False}}
    _, rnd = timed_sweep(random_doc, num_cpus=2)

    marks = [round(spent * f) for f in (0.25, 0.5, 0.75, 1.0)]
    print(f"kd on digits, cnn(32) -> cnn({args.student_channels}), {args.epochs} epochs per full trial, "
          f"{spent} epochs of compute each")
    print(f"TPE + ASHA: {args.trials} trials; random, no early stopping: {random_trials} trials")
    print("| epochs spent | " + " | ".join(map(str, marks)) + " |")
    print("|---|" + "---|" * len(marks))
    print("| TPE + ASHA best val_acc | " + " | ".join(f"{100 * v:.2f}" for v in best_by_epochs(tpe, marks)) + " |")
    print("| random best val_acc | " + " | ".join(f"{100 * v:.2f}" for v in best_by_epochs(rnd, marks)) + " |")


if __name__ == "__main__":
    main()
