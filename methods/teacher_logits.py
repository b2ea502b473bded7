"""The teacher's logits on the training split, computed once and reused by every epoch, trial and sweep.

A method that reads the teacher only through its logits
(`Distiller.teacher_logits_only`), trained without augmentation (the
recipe's policy is `NoAugment`) and without a strong view, gives the teacher
the same input for an image every epoch. The engine then computes each
training image's logits once and hands a batch its rows in
`StepInfo.teacher_logits`; the teacher store keeps them across runs.

Bit-identical to running the teacher, not close to it: a CPU kernel may give
an image other bits in a batch of another size (measured with torch 2.14 on
AVX-512: MKL's GEMM differs in the last bits for batches of 1 to 11 rows,
oneDNN's convolutions for batches of 1), though not, as measured, when other
images share the batch. So each image is computed in a batch of exactly the
training size, on the training device, dtype, memory format and thread count
(`LogitPath`, part of the cache's identity); a batch of another size (an
epoch's short last batch) runs the teacher as usual; and the engine checks
one training batch against the teacher before it trusts a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdarena.zoo.augment import NoAugment
from kdarena.zoo.data import Dataset

from .base import Distiller
from .recipe import Recipe

# the largest cache kept in memory: ImageNet's 1.28 M images × 1000 classes (5 GiB in float32) run the teacher
MAX_BYTES = 2 * 2**30


@dataclass(frozen=True)
class LogitPath:
    """How logits were computed, beside the teacher's weights and its inputs: what else decides their bits."""

    device: str  # the device and what its kernels are built for: "cpu AVX512", "cuda NVIDIA H200"
    bf16: bool  # autocast to bfloat16 (`Execution.bf16`)
    channels_last: bool
    batch_size: int
    threads: int  # CPU threads; 0 on CUDA, where they decide nothing
    torch: str  # torch's version: kernels change between releases


@dataclass
class TeacherLogits:
    """Row i: the teacher's logits for image i of the training split, computed along `path`."""

    logits: torch.Tensor
    path: LogitPath

    def rows(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The logits of the images at `indices`; None for a batch of another size than the cache's (its bits may
        differ: the teacher computes it)."""
        return self.logits[indices] if len(indices) == self.path.batch_size else None


def cacheable(method: type[Distiller], recipe: Recipe, data: Dataset) -> bool:
    """Whether `method` trained by `recipe` on `data` may take its teacher's logits from a cache."""
    return (method.teacher_logits_only and method.strong_view is None
            and isinstance(recipe.augment_for(data), NoAugment)
            and recipe.batch_size <= len(data.train)  # a smaller split has no batch of the training size
            and len(data.train) * data.num_classes * 4 <= MAX_BYTES)
