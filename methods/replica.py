"""One of several data-parallel copies of a fit: which rows of each batch it trains on, and what it shares.

Every replica builds the same global batches (same seed, same order: the
one-worker loader's) and trains on its own contiguous block of rows of
each. After each backward pass, before each optimiser step, the gradients
of the optimiser's parameters are averaged across replicas, each weighted
by the share of the global batch it stands for, so every replica takes the
same step: the gradient of the mean loss over the global batch, where each
loss term is a mean over samples. Loss and accuracy sums, validation
accuracy and method diagnostics are combined across replicas; floating
buffers that training updates (BatchNorm's running statistics, OFD's
pre-activation sums) are averaged at the end of each epoch, so the replicas
hold the same state when it is checkpointed.

What stays per replica, as in PyTorch's DistributedDataParallel: BatchNorm's
batch statistics and any loss that relates the samples of a batch to each
other (RKD, SP, CC, …) are computed over the replica's rows, and a gradient
rule inside a method's `backward` (SVD's clipping) acts before the average.
A method whose state follows individual training images
(`Distiller.data_parallel_refusal`) cannot run so and is refused before any work.

The collectives are torch.distributed's on its default process group, which
the caller has set up (gloo on CPU, NCCL on CUDA); this module knows no
scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kdarena.zoo.data import Batch


@dataclass(frozen=True)
class Shard:
    """A replica's rows of one global batch, and what they stand for in it."""

    batch: Batch
    count: float  # images of the global batch these rows stand for (over the replicas: the batch's size)
    gradient_scale: float = 1.0  # × the rows' mean gradient, then the replicas' mean: the global batch's mean gradient

    @property
    def row_weight(self) -> float:
        """Images of the global batch one row stands for (1, or a share of a batch smaller than the world)."""
        return self.count / len(self.batch.labels)


@dataclass(frozen=True)
class Replica:
    """This process's place among `world_size` data-parallel copies of one fit."""

    rank: int
    world_size: int

    @classmethod
    def of_process_group(cls) -> Replica:
        """This process's place in torch.distributed's default process group (initialised by the caller)."""
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def chief(self) -> bool:
        """The replica that writes checkpoints and whose reports are kept."""
        return self.rank == 0

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This replica's block of `tensor`'s rows, split into `world_size` contiguous blocks whose sizes differ by
        one at most (a view: a channels_last batch stays channels_last)."""
        return torch.tensor_split(tensor, self.world_size)[self.rank]

    def own_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of a global training batch this replica trains: its block (`rows`), or all of a batch smaller
        than the world."""
        return tensor if len(tensor) < self.world_size else self.rows(tensor)

    def shard(self, batch: Batch) -> Shard:
        """This replica's rows of a global training batch (`own_rows`; already so where the loader read only them,
        `batch.global_size`); a batch smaller than the world is trained whole by every replica, each standing for an
        equal part of it."""
        size = len(batch.labels) if batch.global_size is None else batch.global_size
        if size < self.world_size:
            return Shard(batch, size / self.world_size)
        part = batch if batch.global_size is not None else Batch(
            self.rows(batch.images), self.rows(batch.labels), self.rows(batch.indices),
            None if batch.strong is None else self.rows(batch.strong))
        rows = len(part.labels)
        return Shard(part, float(rows), rows * self.world_size / size)

    def average_gradients(self, params: Iterable[nn.Parameter], scale: float) -> None:
        """Each parameter's gradient becomes the replicas' mean of (gradient × `scale`); a parameter without a
        gradient on every replica keeps none (an optimiser skips it), one with a gradient on some counts zero
        where it has none."""
        params = list(params)
        if not params:
            return
        device = params[0].device
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        dist.all_reduce(present)
        trained = [p for p, seen in zip(params, present.tolist()) if seen > 0]
        for p in trained:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in trained]
        self._all_reduce_in_place(grads, multiplier=scale / self.world_size)

    def summed(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """The elementwise sums over replicas of equally shaped tensors (returned, the inputs unchanged)."""
        out = [v.detach().to(torch.float64, copy=True) for v in values]  # a copy; counts stay exact
        self._all_reduce_in_place(out)
        return out

    def mean_of(self, values: dict[str, float]) -> dict[str, float]:
        """Per name, the mean over the replicas that have it (diagnostics: a method may record a name on some)."""
        gathered: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, values)
        names = sorted({name for part in gathered for name in part})
        return {name: sum(p[name] for p in gathered if name in p) / sum(name in p for p in gathered) for name in names}

    def broadcast_state(self, module: nn.Module) -> None:
        """Every parameter and buffer of `module` as the chief's: replicas start alike however they were built."""
        self._in_place(list(module.state_dict().values()), lambda flat: dist.broadcast(flat, 0))

    def average_buffers(self, module: nn.Module) -> None:
        """Floating buffers (running statistics each replica updated on its own rows) become the replicas' mean."""
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        self._all_reduce_in_place(buffers, multiplier=1.0 / self.world_size)

    def _all_reduce_in_place(self, tensors: list[torch.Tensor], multiplier: float = 1.0) -> None:
        def reduce(flat: torch.Tensor) -> None:
            if multiplier != 1.0:
                flat.mul_(multiplier)
            dist.all_reduce(flat)
        self._in_place(tensors, reduce)

    @staticmethod
    def _in_place(tensors: list[torch.Tensor], collective) -> None:
        """Run `collective` on one flat buffer per dtype holding `tensors`, then copy the result back into them
        (one message, not one per tensor; any memory format)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            if flat.dtype == torch.bool:  # gloo carries no bool: as bytes
                flat = flat.to(torch.uint8)
            collective(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view(t.shape).to(t.dtype))
                offset += t.numel()


class GradientAverager:
    """Averages the gradients of each optimiser's parameters across replicas just before it steps (a step pre-hook),
    so a method's own optimisers (critics, a paraphraser) are kept alike as the student's are, with no code of theirs
    knowing of replicas. `scale` is the current shard's `gradient_scale`."""

    def __init__(self, replica: Replica, optimizers: Iterable[torch.optim.Optimizer]):
        self.replica = replica
        self.scale = 1.0
        self._handles = [opt.register_step_pre_hook(self._before_step) for opt in optimizers]

    def _before_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.replica.average_gradients((p for group in optimizer.param_groups for p in group["params"]), self.scale)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
