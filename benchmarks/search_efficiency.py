"""Search strategies at equal compute: random search without stopping, TPE + ASHA, and TPE + ASHA warm-started.

The task: kd on scikit-learn's digits, cnn(channels=32) teacher → a tiny
cnn(channels=2) student, 4 epochs per full trial, kd's whole space (lr from
1e-3 to 0.3 on a log scale, weight decay, temperature, alpha). Hyper-parameters matter here and
that is why it was chosen: with a short budget and a 2-channel student a poor
lr leaves the student far below a good one, where at 20 epochs and a wider student every sane
config reaches 100 % val accuracy on digits and nothing separates the strategies.

Compute is counted in epochs trained (so a busy machine cannot skew it).
Random search gets `--random-trials` full-budget trials; that many epochs
are the budget every strategy is measured against. TPE + ASHA runs more
trials (ASHA stops weak ones early) and is cut off where it has spent the
same budget. The warm-started variant first reads a sweep of a neighbouring
pair — the same teacher with a cnn(channels=4) student, run once before the
repetitions — and enqueues its best configs (`warm_start: [neighbour]`).
Each strategy runs `--repeats` times with different sampler seeds.

Printed: per strategy, the epochs it needed to reach the same repetition's
random search's final best val_acc (median and range; "never" when it did
not within the budget), and the median (min–max) best full-budget val_acc
after 25/50/100 % of the budget.

    python -m benchmarks.search_efficiency [--repeats 5] [--random-trials 8] [--epochs 4]
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

import ray

from .common import timed_sweep, workspace

FRACTIONS = (0.25, 0.5, 1.0)


def compute_curve(records: dict[str, Any], budget_epochs: int) -> list[tuple[int, float]]:
    """(epochs spent, best full-budget val_acc so far) after every epoch any trial ran, in time order."""
    events = []  # (time, trial key, epoch)
    for key, r in records["trials"].items():
        if r["phase"] != "trial":
            continue
        for h in r["history"]:
            events.append((h["ts_ms"], key, h["epoch"]))
    events.sort()
    full = {key: r["metrics"].get("val_acc") for key, r in records["trials"].items()
            if r["phase"] == "trial" and r["status"] == "completed"}
    last_epoch = {key: max(h["epoch"] for h in r["history"]) for key, r in records["trials"].items()
                  if r["phase"] == "trial" and r["history"]}
    best, curve = 0.0, []
    for spent, (_, key, epoch) in enumerate(events[:budget_epochs], start=1):
        if key in full and epoch == last_epoch[key] and full[key] is not None:
            best = max(best, full[key])
        curve.append((spent, best))
    return curve


def best_at(curve: list[tuple[int, float]], epochs: int) -> float:
    return max((b for spent, b in curve if spent <= epochs), default=0.0)


def epochs_to_reach(curve: list[tuple[int, float]], target: float) -> float:
    return next((spent for spent, b in curve if b >= target), math.inf)


def _spread(values: list[float], fmt: str) -> str:
    """Median (min–max), where a strategy that never got there counts as infinitely slow."""
    def show(v: float) -> str:
        return fmt.format(v) if math.isfinite(v) else "never"
    never = sum(1 for v in values if not math.isfinite(v))
    tail = f", never in {never} of {len(values)}" if never else ""
    return f"{show(statistics.median(values))} ({show(min(values))}–{show(max(values))}{tail})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--random-trials", type=int, default=8)
    parser.add_argument("--asha-trials", type=int, default=20, help="TPE + ASHA trials (cut off at the same epochs)")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    workspace("search")
    budget_epochs = args.random_trials * args.epochs
    space = {"space": {"lr": [1e-3, 0.3]}}
    base = {"dataset": {"name": "digits"},
            "teacher": {"arch": "cnn", "options": {"channels": 32}, "recipe": {"epochs": 15}},
            "students": [{"arch": "cnn", "options": {"channels": 2}}], "methods": {"kd": space},
            "resources": {"cpu": 1}, "warm_start": "off"}
    asha = {"trials_per_method": args.asha_trials, "epochs": args.epochs, "grace_period": 1, "reduction_factor": 3}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    neighbour = base | {"name": "neighbour", "students": [{"arch": "cnn", "options": {"channels": 4}}],
                        "budget": asha, "seed": 1000}
    timed_sweep(neighbour)
    strategies = {
        "random search, no stopping": lambda seed: base | {
            "name": f"random-{seed}", "sampler": "random", "seed": seed,
            "budget": {"trials_per_method": args.random_trials, "epochs": args.epochs, "early_stopping": False}},
        "TPE + ASHA": lambda seed: base | {"name": f"tpe-{seed}", "seed": seed, "budget": asha},
        "TPE + ASHA, warm-started": lambda seed: base | {"name": f"warm-{seed}", "seed": seed, "budget": asha,
                                                         "warm_start": ["neighbour"]},
    }
    curves: dict[str, list[list[tuple[int, float]]]] = {name: [] for name in strategies}
    for seed in range(args.repeats):
        for name, doc in strategies.items():
            _, records = timed_sweep(doc(seed))
            curves[name].append(compute_curve(records, budget_epochs))
    ray.shutdown()

    targets = [curve[-1][1] for curve in curves["random search, no stopping"]]
    marks = [round(budget_epochs * f) for f in FRACTIONS]
    print(f"kd on digits, cnn(32) -> cnn(2), {args.epochs} epochs per full trial, {args.repeats} repetitions; "
          f"budget {budget_epochs} epochs ({args.random_trials} full random trials); warm start from a "
          "cnn(32) -> cnn(4) sweep")
    print("| strategy | epochs to reach random search's final best | "
          + " | ".join(f"best val_acc at {int(100 * f)} % ({m} epochs)" for f, m in zip(FRACTIONS, marks)) + " |")
    print("|---|---|" + "---|" * len(marks))
    for name, runs in curves.items():
        reach = [epochs_to_reach(c, t) for c, t in zip(runs, targets)]
        cells = [_spread([100 * best_at(c, m) for c in runs], "{:.2f}") for m in marks]
        print(f"| {name} | {_spread(reach, '{:.0f}')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
