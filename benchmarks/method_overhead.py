"""Per method, the train-step time of a CIFAR-sized pair divided by baseline's, on this machine's CPU.

resnet56 -> resnet20 at 32×32, 100 classes, batch 64, every registered
method with its defaults. Each step runs as the engine runs it: the batch
comes from the engine's own `BatchLoader` over a synthetic uint8 training
split (normalised, with the strong view a method asks for), its `StepInfo`
carries the batch's split indices where the method wants them, and the
step is the engine's `train_step`; so the time includes what a method's
batch costs to make (MLKD's strong view) and its memory bank (CRD's, sized
for CIFAR-100's 50,000 training images by default, `--num-train`). Methods
are timed in interleaved rounds (each round times every method once), so a
load change on a shared machine hits them alike; the figure per method is
its median over rounds. baseline and kd are always timed: the table's
ratios are to them.

    python -m benchmarks.method_overhead [--rounds 5] [--steps 3] [--batch-size 64] [--methods crd mlkd] [--quick]
"""

from __future__ import annotations

import argparse

import torch

from kdarena.methods import METHODS, PairInfo
from kdarena.methods.engine import build_optimizer
from kdarena.methods.recipe import Recipe
from kdarena.zoo.data import Split
from kdarena.zoo.models import build_model, stage_shapes

from .engine_steps import Run, interleaved_times, print_medians, step, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=50_000,
                        help="training-split size a memory bank is built for (CIFAR-100: 50,000)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                        help="only these (baseline and kd are always timed); default every registered method")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 round of 1 step at batch 16 (overrides --rounds/--steps/--batch-size)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.batch_size = 1, 1, 16
    names = list(dict.fromkeys(["baseline", "kd", *(args.methods or METHODS)]))

    torch.manual_seed(0)
    teacher = build_model(args.teacher, num_classes=100, in_channels=3, input_size=32).eval()
    # a few batches of random pixels: every step sees a fresh batch, as in training
    n = 4 * args.batch_size
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 100, (n,)))
    runs = {}
    for name in names:
        method = METHODS[name]
        student = build_model(args.student, num_classes=100, in_channels=3, input_size=32)
        pair = PairInfo(stage_shapes(student, 3, 32), stage_shapes(teacher, 3, 32), 100, 3, 32,
                        num_train=max(n, args.num_train))
        why = method.check_pair(method.Params(), pair)
        if why is not None:
            print(f"{name}: skipped, {why}")
            continue
        distiller = method(student, teacher if method.needs_teacher else None, method.Params(), pair)
        optimizer = build_optimizer(distiller.student_optimizer_parameters(), Recipe())
        distiller.train()
        runs[name] = Run(distiller, optimizer, steps(method, split, args.batch_size, (0.5,) * 3, (0.25,) * 3))
        step(runs[name])  # warm-up (and discriminator warm-up)

    print_medians(f"{args.teacher} -> {args.student}, 32x32, batch {args.batch_size}, CPU threads "
                  f"{torch.get_num_threads()}, {args.rounds} rounds of {args.steps} steps",
                  interleaved_times(runs, args.rounds, args.steps), "method", {"vs baseline": "baseline", "vs kd": "kd"})


if __name__ == "__main__":
    main()
