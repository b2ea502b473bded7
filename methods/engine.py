"""The training engine: runs any `Distiller` for a recipe's epochs.

Per epoch it reports the mean of every loss term, the method's diagnostics,
train and validation accuracy, and writes a checkpoint that a resumed run
continues from (same batches, same random state). A method that reads only
the teacher's logits, trained without augmentation, gets them from a cache
computed once per training image (`teacher_logits.py`), bit for bit what
the teacher would have given. A non-finite loss ends the
run with status `diverged` and the term that went bad; so does val_acc at chance for
`recipe.chance_patience` epochs in a row (a run that learns nothing). Precision and
memory format come from an `Execution` (default: channels_last; bf16 autocast on
CUDA, float32 on CPU with `recipe.num_threads`, i.e. torch's own count by default:
OMP_NUM_THREADS or all cores).
"""

from __future__ import annotations

import math
import os
import pickle
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from kdarena.zoo.data import BatchLoader, Dataset, Split
from kdarena.zoo.streaming import FileSplit, loader_for
from kdarena.zoo.errors import UserError
from kdarena.zoo.models import StagedModel

from .base import Distiller, StepInfo
from .execution import Execution
from .recipe import Recipe
from .replica import GradientAverager, Replica, Shard
from .teacher_logits import LogitPath, TeacherLogits, cacheable


@dataclass
class EpochResult:
    epoch: int  # 0-based
    losses: dict[str, float]
    train_acc: float
    val_acc: float
    lr: float
    seconds: float
    diagnostics: dict[str, float] = field(default_factory=dict)


@dataclass
class FitResult:
    status: Literal["completed", "diverged"]
    history: list[EpochResult]
    reason: str | None = None
    test_acc: float | None = None

    @property
    def val_acc(self) -> float | None:
        """Validation accuracy after the last epoch run (final, not best)."""
        return self.history[-1].val_acc if self.history else None

    @property
    def best_val_acc(self) -> float | None:
        return max((e.val_acc for e in self.history), default=None)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build_optimizer(params: list[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def lr_factor(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at optimiser step `step`: warm-up, then the schedule."""
    total = recipe.epochs * steps_per_epoch
    warmup = recipe.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if recipe.schedule == "cosine":
        progress = (step - warmup) / max(1.0, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if recipe.schedule == "step":
        epoch = step / steps_per_epoch
        return recipe.gamma ** sum(epoch >= m * recipe.epochs for m in recipe.milestones)
    return 1.0


def evaluate(model: nn.Module, loader: BatchLoader, execution: Execution | None = None,
             replica: Replica | None = None) -> float:
    """Top-1 accuracy of `model` over a loader, in eval mode (precision: `execution`, default the device's); with a
    `replica`, each replica counts its rows of every batch and the counts are summed."""
    execution = execution or Execution.default(loader.device)
    was_training = model.training
    model.eval()
    correct = total = 0
    if replica is not None:
        loader.keep_rows(replica.rows)  # a streamed split: each replica reads only its rows
    with torch.inference_mode(), execution.autocast():
        for batch in loader.batches():
            images, labels = batch.images, batch.labels
            if replica is not None and batch.global_size is None:
                images, labels = replica.rows(images), replica.rows(labels)
            if len(labels):
                correct += int((model(images).argmax(1) == labels).sum())
                total += int(labels.numel())
    model.train(was_training)
    if replica is not None:
        correct, total = (int(v) for v in replica.summed([torch.tensor([correct, total], device=loader.device)])[0])
    return correct / max(1, total)


def eval_loader(split: Split | FileSplit, data: Dataset, device: torch.device, batch_size: int = 512,
                execution: Execution | None = None, persistent: bool = False) -> BatchLoader:
    """A split's batches in order, unaugmented (`persistent`: a streamed split's decoders stay up, for a split read
    every epoch)."""
    execution = execution or Execution.default(device)
    return loader_for(split, batch_size=batch_size, mean=data.mean, std=data.std, device=device,
                      channels_last=execution.channels_last, persistent=persistent)


def training_loader(distiller: Distiller, data: Dataset, recipe: Recipe, device: torch.device,
                    execution: Execution | None = None) -> BatchLoader:
    """The shuffled, augmented training batches: their order depends on the recipe's seed alone, never the method."""
    execution = execution or Execution.default(device)
    return loader_for(data.train, batch_size=recipe.batch_size, mean=data.mean, std=data.std, device=device,
                      shuffle=True, augment=recipe.augment_for(data), seed=recipe.seed,
                      channels_last=execution.channels_last, strong=distiller.strong_view, persistent=True)


def train_step(distiller: Distiller, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               step: StepInfo, execution: Execution | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step of any method: its adversaries' updates, then the student's."""
    execution = execution or Execution.default(images.device)
    distiller.aux_step(images, labels, step)
    with execution.autocast():
        logits, losses = distiller.forward_train(images, labels, step)
    optimizer.zero_grad(set_to_none=True)
    distiller.backward(losses, step)
    optimizer.step()
    distiller.student.apply_constraints()
    return logits, losses


def logit_path(recipe: Recipe, execution: Execution) -> LogitPath:
    """How the engine runs a teacher for `recipe` under `execution`: what, beside weights and inputs, decides its
    bits."""
    device = execution.device
    cuda = device.type == "cuda"
    return LogitPath(device=f"cuda {torch.cuda.get_device_name(device)}" if cuda
                     else f"cpu {torch.backends.cpu.get_cpu_capability()}",
                     bf16=execution.bf16, channels_last=execution.channels_last, batch_size=recipe.batch_size,
                     threads=0 if cuda else recipe.num_threads or torch.get_num_threads(), torch=torch.__version__)


def compute_teacher_logits(teacher: StagedModel, data: Dataset, recipe: Recipe, execution: Execution) -> TeacherLogits:
    """`teacher`'s logits on every training image, each computed as a training step of `recipe` would compute it."""
    path = logit_path(recipe, execution)
    _freeze(teacher, execution)
    logits = None
    with _threads(path.threads), torch.no_grad(), execution.autocast():
        for batch in eval_loader(data.train, data, execution.device, recipe.batch_size, execution).windows():
            out = teacher.forward_stages(batch.images).logits
            if logits is None:
                logits = out.new_empty((len(data.train), out.shape[1]))
            logits[batch.indices] = out
    return TeacherLogits(logits, path)


def fit(distiller: Distiller, data: Dataset, recipe: Recipe, *, device: torch.device | None = None,
        checkpoint_path: Path | None = None, evaluate_test: bool = True,
        on_epoch: Callable[[EpochResult], None] | None = None,
        on_batch: Callable[[int, int], None] | None = None, execution: Execution | None = None,
        teacher_logits: TeacherLogits | None = None, replica: Replica | None = None) -> FitResult:
    """Train `distiller.student` (and its training-only modules) for `recipe.epochs`.

    With `checkpoint_path`, a checkpoint is written after every epoch and, if
    one is already there, training continues from it. `on_epoch` sees each
    epoch run now (not those restored); `on_batch(done, total)` each step.
    Test accuracy is measured once, after the last epoch of a completed run.
    Where the method and recipe allow a cache (`teacher_logits.cacheable`),
    `teacher_logits` computed along this fit's path are used, else they are
    computed now.

    With a `replica`, this process is one of several training the same run
    data-parallel (`replica.py`): each trains its rows of every global batch,
    all take the same optimiser steps, and only the chief writes the checkpoint
    (every replica restores from one, when `checkpoint_path` holds it).
    """
    execution = execution or Execution.default(device or pick_device())
    device = execution.device
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    distiller.to(device)
    if distiller.teacher is not None:  # not a submodule: moved on its own
        _freeze(distiller.teacher, execution)
    if execution.channels_last:
        distiller.to(memory_format=torch.channels_last)

    train_loader = training_loader(distiller, data, recipe, device, execution)
    val_loader = eval_loader(data.val, data, device, execution=execution, persistent=True)
    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(distiller.student_optimizer_parameters(), recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(recipe, s, steps_per_epoch))

    history: list[EpochResult] = []
    start_epoch = 0
    if checkpoint_path is not None and checkpoint_path.exists():
        start_epoch, history = _restore(checkpoint_path, distiller, optimizer, scheduler)
    averager = None
    if replica is not None:
        train_loader.keep_rows(replica.own_rows)  # where it leaves every draw as it is: a streamed split's saving
        replica.broadcast_state(distiller)
        averager = GradientAverager(replica, [optimizer, *distiller.aux_optimizers().values()])
    try:
        return _epochs(distiller, data, recipe, execution, optimizer, scheduler, train_loader, val_loader, history,
                       start_epoch, checkpoint_path, evaluate_test, on_epoch, on_batch, teacher_logits, replica,
                       averager)
    finally:
        if averager is not None:
            averager.remove()


def _epochs(distiller: Distiller, data: Dataset, recipe: Recipe, execution: Execution,
            optimizer: torch.optim.Optimizer, scheduler, train_loader: BatchLoader, val_loader: BatchLoader,
            history: list[EpochResult], start_epoch: int, checkpoint_path: Path | None, evaluate_test: bool,
            on_epoch: Callable[[EpochResult], None] | None, on_batch: Callable[[int, int], None] | None,
            teacher_logits: TeacherLogits | None, replica: Replica | None,
            averager: GradientAverager | None) -> FitResult:
    """`fit`'s epochs from `start_epoch` on."""
    device = execution.device
    steps_per_epoch = len(train_loader)

    cache = _teacher_cache(distiller, data, recipe, execution, teacher_logits, train_loader, start_epoch, replica)
    chance = chance_accuracy(data.val.labels)
    judged_from = distiller.classifier_free_epochs(recipe.epochs)  # a hint/FSP stage is at chance by design
    at_chance = _epochs_at_chance(history, chance, judged_from)
    for epoch in range(start_epoch, recipe.epochs):
        t0 = time.perf_counter()
        distiller.train()
        train_loader.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device)
        seen = 0.0
        for i, global_batch in enumerate(train_loader.batches()):
            shard = (replica.shard(global_batch) if replica is not None
                     else Shard(global_batch, float(len(global_batch.labels))))
            if averager is not None:
                averager.scale = shard.gradient_scale
            batch = shard.batch
            images, labels = batch.images, batch.labels
            step = StepInfo(epoch, recipe.epochs, epoch * steps_per_epoch + i, steps_per_epoch,
                            indices=batch.indices if distiller.wants_indices else None, strong_images=batch.strong,
                            teacher_logits=cache.rows(batch.indices) if cache is not None else None)
            logits, losses = train_step(distiller, optimizer, images, labels, step, execution)
            scheduler.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0) + value.detach().float() * shard.count
            correct += (logits.detach().argmax(1) == labels).sum() * shard.row_weight
            seen += shard.count
            if on_batch is not None:
                on_batch(i + 1, steps_per_epoch)
        diagnostics = distiller.pop_diagnostics()
        if replica is not None:  # the epoch's sums over every replica's rows; the state they updated made alike
            *totals, correct, seen = replica.summed([*sums.values(), correct, torch.tensor(seen, device=device)])
            sums = dict(zip(sums, totals))
            replica.average_buffers(distiller)
            diagnostics = replica.mean_of(diagnostics)
        losses_mean = {name: float(total) / float(seen) for name, total in sums.items()}
        bad = [name for name, value in losses_mean.items() if not math.isfinite(value)]
        if bad:
            reason = f"non-finite {bad[0]} ({losses_mean[bad[0]]}) in epoch {epoch + 1}"
            return FitResult("diverged", history, reason=reason)
        result = EpochResult(
            epoch=epoch, losses=losses_mean, train_acc=float(correct) / float(seen),
            val_acc=evaluate(distiller.student, val_loader, execution, replica), lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - t0, diagnostics=diagnostics,
        )
        at_chance = at_chance + 1 if epoch >= judged_from and result.val_acc <= chance + CHANCE_MARGIN else 0
        if recipe.chance_patience and at_chance >= recipe.chance_patience:
            reason = (f"val_acc at chance ({result.val_acc:.3f}, majority class {chance:.3f}) for {at_chance} epochs "
                      f"in a row, up to epoch {epoch + 1}")
            return FitResult("diverged", history, reason=reason)
        history.append(result)
        if checkpoint_path is not None and (replica is None or replica.chief):
            _save(checkpoint_path, epoch + 1, history, distiller, optimizer, scheduler)
        if on_epoch is not None:
            on_epoch(result)

    test_acc = (evaluate(distiller.student, eval_loader(data.test, data, device, execution=execution), execution,
                         replica) if evaluate_test else None)
    return FitResult("completed", history, test_acc=test_acc)


# a model that learned nothing predicts one class: the majority's share, plus sampling noise
CHANCE_MARGIN = 0.01


def chance_accuracy(labels: torch.Tensor) -> float:
    """Accuracy of always answering the most frequent label."""
    return float(torch.bincount(labels).max()) / max(1, labels.numel())


def _epochs_at_chance(history: list[EpochResult], chance: float, judged_from: int) -> int:
    """Trailing epochs at chance in a restored history, so a resumed run counts on."""
    count = 0
    for e in reversed(history):
        if e.epoch < judged_from or e.val_acc > chance + CHANCE_MARGIN:
            break
        count += 1
    return count


def _teacher_cache(distiller: Distiller, data: Dataset, recipe: Recipe, execution: Execution,
                   given: TeacherLogits | None, loader: BatchLoader, epoch: int,
                   replica: Replica | None) -> TeacherLogits | None:
    """The cached teacher logits this fit hands its method: `given` where computed along this fit's path, else
    computed now; None where the method or recipe rules a cache out, where no epoch is left from `epoch` on, where a
    data-parallel replica runs the teacher on its rows (fewer images than the cache's batches: other bits), or where
    the teacher, run on the first training batch of `epoch`, gives other bits than the cache (kernels whose result
    depends on the other images in a batch)."""
    if (epoch >= recipe.epochs or distiller.teacher is None or not cacheable(type(distiller), recipe, data)
            or (replica is not None and replica.world_size > 1)):
        return None
    path = logit_path(recipe, execution)
    if given is not None and given.path == path and given.logits.shape == (len(data.train), data.num_classes):
        cache = TeacherLogits(given.logits.to(execution.device), path)
    else:
        cache = compute_teacher_logits(distiller.teacher, data, recipe, execution)
    loader.set_epoch(epoch)
    batch = next(loader.batches())
    with execution.autocast():
        live = distiller.teacher_forward(batch.images).logits
    cached = cache.rows(batch.indices)
    if not torch.equal(live, cached):
        warnings.warn(f"cached teacher logits not used: on a training batch they differ from the teacher's own by up "
                      f"to {float((live.float() - cached.float()).abs().max()):.3g}; the teacher runs every step",
                      RuntimeWarning, stacklevel=3)
        return None
    return cache


def _freeze(teacher: StagedModel, execution: Execution) -> None:
    """The teacher in eval mode without gradients, on the execution's device and in its memory format (set either
    way: a teacher an earlier execution left in channels_last would give other bits)."""
    teacher.to(execution.device).eval().requires_grad_(False)
    teacher.to(memory_format=torch.channels_last if execution.channels_last else torch.contiguous_format)


@contextmanager
def _threads(count: int):
    """torch's CPU threads at `count` (unchanged at 0), restored after: the driver of a sweep computes with a
    trial's threads."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _save(path: Path, epochs_done: int, history: list[EpochResult], distiller: Distiller,
          optimizer: torch.optim.Optimizer, scheduler) -> None:
    state = {
        "epochs_done": epochs_done,
        "history": [asdict(e) for e in history],
        "distiller": distiller.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "aux_optimizers": {k: o.state_dict() for k, o in distiller.aux_optimizers().items()},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint


def _restore(path: Path, distiller: Distiller, optimizer: torch.optim.Optimizer, scheduler) -> tuple[int, list[EpochResult]]:
    try:  # tensors and plain containers only: a checkpoint that would run code is refused, never executed
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"checkpoint {path} cannot be read safely ({str(exc).strip().splitlines()[0][:200]}); "
                        "delete it to start the run afresh") from None
    distiller.load_state_dict(state["distiller"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for name, opt in distiller.aux_optimizers().items():
        opt.load_state_dict(state["aux_optimizers"][name])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["epochs_done"], [EpochResult(**e) for e in state["history"]]
