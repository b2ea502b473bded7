"""What a deployed model costs: parameters, FLOPs / MACs and CPU latency.

Conventions: FLOPs are counted with
`torch.utils.flop_counter.FlopCounterMode` on one forward pass of a batch of
one at the model's evaluation resolution, in eval mode; `macs = flops // 2`
(a multiply-accumulate is two FLOPs — the convention of torchvision's
"GFLOPS" column and of most papers). Only what the counter sees counts:
convolutions, matrix products, attention; batch norm, activations, pooling
and interpolation add nothing. Only the model passed in is measured, so a
method's training-only modules (regressors, adapters, critics) never count.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Cost:
    params: int  # trainable and frozen parameters, each shared tensor once
    flops: int  # floating-point operations of one forward pass, batch 1
    macs: int  # multiply-accumulates = flops // 2
    latency_ms: float  # CPU, batch 1, median over repeats; nan when not measured


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters once)."""
    return sum(p.numel() for p in module.parameters())


def profile_cost(model: nn.Module, *, in_channels: int, input_size: int, latency_repeats: int = 20) -> Cost:
    """Profile a copy of `model` on CPU at batch 1; `model` itself is left untouched.

    `latency_repeats=0` skips the latency measurement (`latency_ms` is nan).
    """
    if latency_repeats < 0:
        raise ValueError(f"latency_repeats must be >= 0, got {latency_repeats}")
    params = count_params(model)
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    # a private generator: profiling must not move the global RNG a training run depends on
    x = torch.randn(1, in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            probe(x)
        flops = int(counter.get_total_flops())
        latency = math.nan
        if latency_repeats:
            for _ in range(max(2, min(10, latency_repeats // 4))):  # warm-up: allocator, kernels, caches
                probe(x)
            times = []
            for _ in range(latency_repeats):
                start = time.perf_counter()
                probe(x)
                times.append((time.perf_counter() - start) * 1e3)
            latency = statistics.median(times)
    return Cost(params=params, flops=flops, macs=flops // 2, latency_ms=latency)
