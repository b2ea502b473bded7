"""How far apart two latency measurements of one model land, against one measurement's own noise (its IQR).

The leaderboard ties latencies closer than `leaderboards.stats.latency_noise_ms`: the larger of the IQR, the
spread of a row's measurements and `LATENCY_RTOL` of their median. This measures why the floor is needed: the
same model measured again (a new `profile_cost`, as each trial does) moves by more than one measurement's IQR.

    .venv/bin/python -m benchmarks.latency_noise [--repeats 8]
"""

from __future__ import annotations

import argparse
import statistics

from kdarena.leaderboards.stats import LATENCY_RTOL
from kdarena.zoo.cost import LATENCY_THREADS, profile_cost
from kdarena.zoo.models import build_model

MODELS = [("cnn", {"channels": 32}, 1, 8), ("resnet20", {}, 3, 32), ("mobilenetv2", {}, 3, 32)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="separate measurements of each model")
    args = parser.parse_args()
    print(f"batch 1, {LATENCY_THREADS} thread(s), {args.repeats} separate measurements per model; "
          f"LATENCY_RTOL = {LATENCY_RTOL:.0%}")
    print(f"{'model':<22}{'median ms':>10}{'spread':>9}{'IQR':>8}  spread / IQR")
    for arch, options, channels, size in MODELS:
        model = build_model(arch, num_classes=10, in_channels=channels, input_size=size, **options)
        costs = [profile_cost(model, in_channels=channels, input_size=size) for _ in range(args.repeats)]
        medians = [c.latency_ms for c in costs]
        middle = statistics.median(medians)
        spread = (max(medians) - min(medians)) / middle
        iqr = statistics.median(c.latency_iqr_ms for c in costs) / middle
        print(f"{arch + ' ' + str(size) + 'x' + str(size):<22}{middle:>10.4f}{spread:>9.1%}{iqr:>8.1%}"
              f"  {spread / iqr if iqr else float('inf'):.1f}x")


if __name__ == "__main__":
    main()
