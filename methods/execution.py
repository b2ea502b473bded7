"""How the engine runs a network on its device: the arithmetic's precision and the tensors' memory format.

On CUDA the engine trains and evaluates in bf16 autocast with channels_last
tensors (`Execution.default`); on CPU in float32, contiguous. The two are one
code path with two settings, and torch runs bf16 autocast and channels_last
on CPU too, so the tests exercise the CUDA settings on any machine: the
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
        """bf16 autocast and channels_last on CUDA; float32 and contiguous elsewhere."""
        cuda = device.type == "cuda"
        return cls(device, bf16=cuda, channels_last=cuda)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
