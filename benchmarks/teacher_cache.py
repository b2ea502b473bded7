"""A kd step divided by a student-alone step, with the teacher run every step and with its logits cached.

Two pairs: an MLP pair on MNIST-sized images (1200-1200 teacher → 800-800
student, 28×28×1, 10 classes: the soft-target paper's MNIST nets) and a CNN
pair (resnet56 → resnet20, 32×32×3, 100 classes: the README's kd figure). Each
step runs as `engine.fit` runs it: batches from the engine's `BatchLoader`
over a synthetic uint8 split (no augmentation), the engine's `train_step`,
and for the cached kd the batch's rows of `compute_teacher_logits` in
`StepInfo.teacher_logits`. The three are timed in interleaved rounds (a load
change on a shared machine hits them alike); each figure is the median over
rounds. The cache's one-off cost (the teacher over the split once) is shown
beside an epoch of live kd steps.

    python -m benchmarks.teacher_cache [--rounds 7] [--steps 5] [--batch-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdarena.methods import PairInfo
from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import build_optimizer, compute_teacher_logits
from kdarena.methods.execution import Execution
from kdarena.methods.kd import KD
from kdarena.methods.recipe import Recipe
from kdarena.zoo.data import Dataset, Split
from kdarena.zoo.models import build_model, stage_shapes

from .engine_steps import Run, interleaved_times, print_medians, step, steps

# (label, teacher, student, channels, size, classes)
PAIRS = [
    ("MLP 1200-1200 -> 800-800, 28x28", ("mlp", {"hidden": [1200, 1200]}), ("mlp", {"hidden": [800, 800]}), 1, 28, 10),
    ("CNN resnet56 -> resnet20, 32x32", ("resnet56", {}), ("resnet20", {}), 3, 32, 100),
]


def synthetic(channels: int, size: int, classes: int, n: int) -> Dataset:
    """Random pixels in a `Dataset`: a step's time does not depend on what the images show."""
    split = Split(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8), torch.randint(0, classes, (n,)))
    return Dataset("synthetic", split, split, split, classes, mean=(0.5,) * channels, std=(0.25,) * channels)


def time_pair(label: str, teacher_spec: tuple[str, dict], student_spec: tuple[str, dict], channels: int, size: int,
              classes: int, args: argparse.Namespace) -> None:
    """Print the pair's three step times and the cache's one-off cost."""
    torch.manual_seed(0)
    teacher = build_model(teacher_spec[0], num_classes=classes, in_channels=channels, input_size=size,
                          **teacher_spec[1]).eval()
    data = synthetic(channels, size, classes, 8 * args.batch_size)  # whole batches only: none runs the teacher
    recipe = Recipe(batch_size=args.batch_size, num_threads=args.threads)
    start = time.perf_counter()
    cache = compute_teacher_logits(teacher, data, recipe, Execution.default(torch.device("cpu")))
    build_s = time.perf_counter() - start

    runs: dict[str, Run] = {}
    for name, method, logits in [("student alone", Baseline, None), ("kd, teacher every step", KD, None),
                                 ("kd, cached logits", KD, cache)]:
        student = build_model(student_spec[0], num_classes=classes, in_channels=channels, input_size=size,
                              **student_spec[1])
        pair = PairInfo(stage_shapes(student, channels, size), stage_shapes(teacher, channels, size), classes,
                        channels, size)
        distiller = method(student, teacher if method.needs_teacher else None, method.Params(), pair).train()
        optimizer = build_optimizer(distiller.student_optimizer_parameters(), recipe)
        runs[name] = Run(distiller, optimizer, steps(method, data.train, args.batch_size, data.mean, data.std,
                                                  cache=logits))
        step(runs[name])  # warm-up

    times = interleaved_times(runs, args.rounds, args.steps)
    print_medians(f"\n{label}, batch {args.batch_size}, CPU threads {torch.get_num_threads()}, {args.rounds} rounds "
                  f"of {args.steps} steps", times, "step", {"÷ student alone": "student alone"})
    per_epoch = len(data.train) / args.batch_size
    live_epoch = statistics.median(times["kd, teacher every step"]) * per_epoch
    print(f"cache of {len(data.train)} images built once in {build_s:.2f} s "
          f"(an epoch of kd steps with the teacher: {live_epoch:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 1 step at batch 16")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.batch_size = 1, 1, 16
    torch.set_num_threads(args.threads)
    for pair in PAIRS:
        time_pair(*pair, args)


if __name__ == "__main__":
    main()
