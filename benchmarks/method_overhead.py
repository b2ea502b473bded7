"""Per method, the train-step time of a CIFAR-sized pair divided by baseline's, on this machine's CPU.

resnet56 -> resnet20 at 32×32, 100 classes, batch 64, each method with its
defaults, every step through the engine's own `train_step`. Methods are
timed in interleaved rounds (each round times every method once), so a
load change on a shared machine hits them alike; the figure per method is
its median over rounds.

    python -m benchmarks.method_overhead [--rounds 5] [--steps 3] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdarena.methods import METHODS, PairInfo, StepInfo
from kdarena.methods.engine import build_optimizer, train_step
from kdarena.methods.recipe import Recipe
from kdarena.zoo.models import build_model, stage_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    teacher = build_model(args.teacher, num_classes=100, in_channels=3, input_size=32).eval()
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 100, (args.batch_size,))
    runs = {}
    for name, method in METHODS.items():
        student = build_model(args.student, num_classes=100, in_channels=3, input_size=32)
        pair = PairInfo(stage_shapes(student, 3, 32), stage_shapes(teacher, 3, 32), 100, 3, 32)
        distiller = method(student, teacher if method.needs_teacher else None, method.Params(), pair)
        optimizer = build_optimizer(distiller.student_optimizer_parameters(), Recipe())
        # epoch 10 of 100: past adversaries' warm-up; two-stage methods (fsp's default) in their
        # distillation stage, which is the one that costs more than baseline
        step = StepInfo(epoch=10, total_epochs=100, step=1000, steps_per_epoch=100)
        train_step(distiller, optimizer, images, labels, step)  # warm-up (and discriminator warm-up)
        runs[name] = (distiller, optimizer, step)

    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (distiller, optimizer, step) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(distiller, optimizer, images, labels, step)
            times[name].append((time.perf_counter() - start) / args.steps)

    base = statistics.median(times["baseline"])
    kd = statistics.median(times["kd"])
    print(f"{args.teacher} -> {args.student}, 32x32, batch {args.batch_size}, CPU threads {torch.get_num_threads()}")
    print("| method | ms per step | vs baseline | vs kd |")
    print("|---|---|---|---|")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"| {name} | {1000 * t:.0f} | {t / base:.2f}x | {t / kd:.2f}x |")


if __name__ == "__main__":
    main()
