"""How the engine runs a network on its device: the arithmetic's precision and the tensors' memory format.

Both CUDA and CPU train and evaluate channels_last: on CPU it made every
CNN of the zoo's a training step faster — 1.02–1.6×, 1.23× for a kd step of
resnet56 → resnet20 (`benchmarks/cpu_efficiency.py`, figures in the README)
— and an MLP's flattened input is the same either way. CUDA adds bf16
autocast; the CPU stays float32. The two are one code path with two
settings, and torch runs bf16 autocast on CPU too, so the tests exercise the
CUDA settings on any machine: the
dtypes autocast gives each loss term (`features.promote` lifts bf16 to
float32), the float32 weights and optimiser state a checkpoint keeps, and a
resumed run. Only what needs CUDA itself is marked `gpu` in the tests.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Execution:
    device: torch.device
    bf16: bool  # autocast to bfloat16 (weights, optimiser and checkpoint stay float32)
    channels_last: bool  # the model and every batch in channels_last memory format

    @classmethod
    def default(cls, device: torch.device) -> Execution:
        """channels_last everywhere; bf16 autocast on CUDA, float32 elsewhere."""
        return cls(device, bf16=device.type == "cuda", channels_last=True)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
