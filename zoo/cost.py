"""What a deployed model costs: parameters, FLOPs / MACs and CPU latency.

Conventions: FLOPs are counted with
`torch.utils.flop_counter.FlopCounterMode` on one forward pass of a batch of
one at the model's evaluation resolution, in eval mode; `macs = flops // 2`
(a multiply-accumulate is two FLOPs — the convention of torchvision's
"GFLOPS" column and of most papers). Only what the counter sees counts:
convolutions, matrix products, attention; batch norm, activations, pooling
and interpolation add nothing. Only the model passed in is measured, so a
method's training-only modules (regressors, adapters, critics) never count.

Latency is a deployment's: batch 1, CPU, float32, inference mode, on
`LATENCY_THREADS` threads whatever the caller runs on (a trial that trains on
four threads and one that trains on one measure alike), timed by
`torch.utils.benchmark.Timer.blocked_autorange` (its block-size estimate warms
up allocator and kernels; then blocks of runs for at least
`LATENCY_MIN_RUN_S`). The median is the latency, the interquartile range of
the blocks its noise: the leaderboard treats latencies closer than their
noise as ties (`leaderboards.stats.latency_noise_ms`).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

LATENCY_THREADS = 1
LATENCY_MIN_RUN_S = 0.2


@dataclass(frozen=True)
class Cost:
    params: int  # trainable and frozen parameters, each shared tensor once
    flops: int  # floating-point operations of one forward pass, batch 1
    macs: int  # multiply-accumulates = flops // 2
    latency_ms: float  # CPU, batch 1, LATENCY_THREADS threads, median of the timed blocks; nan when not measured
    latency_iqr_ms: float = math.nan  # the interquartile range of those blocks: the measurement's noise


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters once)."""
    return sum(p.numel() for p in module.parameters())


def profile_cost(model: nn.Module, *, in_channels: int, input_size: int, latency: bool = True) -> Cost:
    """Profile a copy of `model` on CPU at batch 1; `model` itself is left untouched.

    `latency=False` skips the latency measurement (`latency_ms` is nan): it
    takes `LATENCY_MIN_RUN_S` and more, counting takes milliseconds.
    """
    params = count_params(model)
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    # a private generator: profiling must not move the global RNG a training run depends on
    x = torch.randn(1, in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            probe(x)
        flops = int(counter.get_total_flops())
        latency_ms = latency_iqr_ms = math.nan
        if latency:
            timer = _timer_class()(stmt="model(x)", globals={"model": probe, "x": x}, num_threads=LATENCY_THREADS)
            measured = timer.blocked_autorange(min_run_time=LATENCY_MIN_RUN_S)
            latency_ms, latency_iqr_ms = measured.median * 1e3, measured.iqr * 1e3
    return Cost(params=params, flops=flops, macs=flops // 2, latency_ms=latency_ms, latency_iqr_ms=latency_iqr_ms)



def _timer_class() -> type:
    """`torch.utils.benchmark.Timer`, imported when first needed and quietly: the import loads
    `torch.utils.cpp_extension`, which logs a warning on a machine with a CUDA_HOME but no CUDA runtime, and that
    line would land in the stderr of every command that measures latency."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        logger.setLevel(level)
    return Timer
