"""How close a CPU training step comes to this machine's float32 peak, per model and memory format.

The peak: the best of float32 GEMMs of several sizes (what torch's BLAS reaches), and the theoretical FMA peak
from the CPU's vector flags and clock (2 FMA pipes assumed; the clock `/proc/cpuinfo` shows, which boost may
exceed). A model's training step (forward, backward, SGD step; batch 128) counts 3× its forward FLOPs as
`zoo/cost.py` counts them, in each memory format. Then the whole kd step of resnet56 → resnet20 (the teacher's
forward included) in float32, contiguous and channels_last (the engine's CPU path). `--tuning`: that kd step at
batch 64, 128 and 256, and with torch.compile, instead.

    .venv/bin/python -m benchmarks.cpu_efficiency [--threads 1 2] [--steps 6] [--tuning]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch
from kdarena.methods.base import PairInfo
from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import build_optimizer
from kdarena.methods.execution import Execution
from kdarena.methods.kd import KD
from kdarena.methods.recipe import Recipe
from kdarena.zoo.cost import profile_cost
from kdarena.zoo.data import Split
from kdarena.zoo.models import build_model, stage_shapes

from .engine_steps import Run, interleaved_times, step, steps

BATCH = 128
STUDENTS = [("cnn", {}, 32, 3), ("resnet20", {}, 32, 3), ("wrn_16_2", {}, 32, 3), ("mobilenetv2", {}, 32, 3),
            ("shufflenetv2", {}, 32, 3), ("mlp", {"hidden": [1200, 1200]}, 28, 1)]


def gemm_peak(threads: int) -> tuple[float, int]:
    """(best GFLOP/s, at which n) of n×n float32 matrix products."""
    torch.set_num_threads(threads)
    best = (0.0, 0)
    for n in (256, 512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        reps = max(3, int(2e9 / (2 * n**3)))
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, (2 * n**3 * reps / (time.perf_counter() - start) / 1e9, n))
    return best


def fma_peak_per_core() -> tuple[float, str]:
    """Theoretical float32 GFLOP/s of one core: lanes × 2 (an FMA is two FLOPs) × 2 pipes × clock."""
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M).group(1))
    lanes, isa = (16, "avx512f") if "avx512f" in flags else (8, "avx2+fma") if {"avx2", "fma"} <= flags else (4, "sse")
    return lanes * 2 * 2 * mhz / 1e3, f"{isa}, {lanes} fp32 lanes, 2 FMA pipes assumed, {mhz:.0f} MHz"


def _pair(student, teacher, channels: int, size: int, classes: int = 10) -> PairInfo:
    return PairInfo(stage_shapes(student, channels, size), stage_shapes(teacher, channels, size), classes, channels,
                    size)


def step_run(distiller, channels: int, size: int, channels_last: bool, batch: int = BATCH) -> Run:
    """`distiller` (baseline or kd) as a run of engine training steps on batches of random images, warmed up."""
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
        if distiller.teacher is not None:
            distiller.teacher.to(memory_format=torch.channels_last)
    split = Split(torch.randint(0, 256, (4 * batch, channels, size, size), dtype=torch.uint8),
                  torch.randint(0, 10, (4 * batch,)))
    optimizer = build_optimizer(distiller.student_optimizer_parameters(), Recipe(epochs=2))
    batches = steps(type(distiller), split, batch, (0.5,) * channels, (0.25,) * channels,
                    channels_last=channels_last and channels > 1)
    run = Run(distiller, optimizer, batches, Execution(torch.device("cpu"), bf16=False, channels_last=channels_last))
    for _ in range(2):
        step(run)
    return run


def step_ms(distiller, channels: int, size: int, channels_last: bool, count: int, batch: int = BATCH) -> float:
    """Median ms of one engine training step of `distiller` on batches of random images."""
    run = step_run(distiller, channels, size, channels_last, batch)
    return 1e3 * statistics.median(interleaved_times({"run": run}, count, 1)["run"])


def _kd(channels_last: bool) -> KD:
    torch.manual_seed(0)
    teacher = build_model("resnet56", num_classes=10, in_channels=3, input_size=32).eval()
    teacher.requires_grad_(False)
    student = build_model("resnet20", num_classes=10, in_channels=3, input_size=32)
    return KD(student, teacher, KD.Params(), _pair(student, teacher, 3, 32))


def tuning(count: int) -> None:
    """What else moves the kd step at this machine's threads: batch size, and torch.compile (inductor, C++ on CPU)
    of the student's and the teacher's stage passes. Each is timed alone, one after the other: interleaved, their
    convolutions' oneDNN primitives (one per layer, shape and pass) evict each other from its cache, and a step
    that rebuilds them ran up to 7x slower."""
    results = {}
    for batch in (64, 128, 256):
        results[f"eager, batch {batch}"] = step_ms(_kd(True), 3, 32, True, count, batch)
    kd = _kd(True)
    for net in (kd.student, kd.teacher):
        net.forward_stages = torch.compile(net.forward_stages)
    start = time.perf_counter()
    results[f"torch.compile, batch {BATCH}"] = step_ms(kd, 3, 32, True, count)  # its warm-up compiles
    print(f"\nkd step resnet56 -> resnet20, channels_last, {torch.get_num_threads()} threads "
          f"(torch.compile: {time.perf_counter() - start:.0f} s with compiling):")
    for name, ms in results.items():
        batch = int(name.rsplit(" ", 1)[1])
        print(f"  {name:<26}{ms:>9.1f} ms/step{ms / batch:>8.2f} ms/image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tuning", action="store_true", help="only the kd step's batch-size and torch.compile look")
    args = parser.parse_args()
    if args.tuning:
        torch.set_num_threads(max(args.threads))
        tuning(args.steps)
        return
    per_core, how = fma_peak_per_core()
    print(f"theoretical FMA peak: {per_core:.0f} GFLOP/s per core ({how})")
    for threads in args.threads:
        gflops, n = gemm_peak(threads)
        print(f"\n{threads} thread(s): GEMM peak {gflops:.0f} GFLOP/s (n={n}); theoretical {per_core * threads:.0f}")
        print(f"{'student (batch 128)':<28}{'format':<16}{'ms/step':>9}{'GFLOP/s':>9}{'of GEMM':>9}")
        for arch, options, size, channels in STUDENTS:
            flops = profile_cost(build_model(arch, num_classes=10, in_channels=channels, input_size=size, **options),
                                 in_channels=channels, input_size=size, latency=False).flops * 3 * BATCH
            for channels_last in ((False, True) if channels > 1 else (False,)):
                torch.manual_seed(0)
                student = build_model(arch, num_classes=10, in_channels=channels, input_size=size, **options)
                alone = Baseline(student, None, Baseline.Params(), _pair(student, student, channels, size))
                ms = step_ms(alone, channels, size, channels_last, args.steps)
                rate = flops / ms / 1e6
                print(f"{arch:<28}{'channels_last' if channels_last else 'contiguous':<16}{ms:>9.1f}{rate:>9.1f}"
                      f"{rate / gflops:>9.0%}")
        print("\nkd step resnet56 -> resnet20 (teacher forward included), batch 128:")
        for channels_last in (False, True):
            ms = step_ms(_kd(channels_last), 3, 32, channels_last, args.steps)
            print(f"  {'channels_last' if channels_last else 'contiguous':<16}{ms:>9.1f} ms/step")


if __name__ == "__main__":
    main()
