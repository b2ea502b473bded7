"""The CUDA settings — bf16 autocast and channels_last — run on CPU too, so their dtype handling, loss promotion,
checkpoints and resume are tested on any machine; the checks that need CUDA itself are marked `gpu`.

Imports stay within torch, pydantic and kdarena's engine, models and data: `benchmarks/device_check.py` runs this file
on a GPU machine that has none of Ray, MLflow or Optuna.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (CPU, assert_resumed_exactly, digits_batch, digits_distiller, digits_model,
                     uninterrupted_and_resumed, write_tree)
from kdarena.methods import METHODS
from kdarena.methods.base import StepInfo
from kdarena.methods.engine import fit, pick_device
from kdarena.methods.execution import Execution
from kdarena.methods.kd import KD
from kdarena.methods.recipe import Recipe

CUDA_SETTINGS_ON_CPU = Execution(CPU, bf16=True, channels_last=True)


def _distiller(name: str):
    teacher, student = digits_model("cnn", 0, channels=8), digits_model("cnn", 1, channels=4)
    distiller = digits_distiller(METHODS[name], student, teacher)
    if METHODS[name].wants_indices:  # a memory bank over a training split of 16
        distiller = METHODS[name](student, teacher, distiller.params, dataclasses.replace(distiller.pair, num_train=16))
    return distiller, teacher


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_loss_term_is_float32_under_bf16_autocast_with_channels_last(name):
    """Autocast runs convolutions in bf16; every loss term must still be computed and returned in float32."""
    distiller, teacher = _distiller(name)
    distiller.to(memory_format=torch.channels_last)
    teacher.to(memory_format=torch.channels_last)
    images, labels = digits_batch(16)
    images = images.contiguous(memory_format=torch.channels_last)
    step = StepInfo(0, 2, 0, 10, indices=torch.arange(16),
                    strong_images=images.clone() if distiller.strong_view is not None else None)
    distiller.aux_step(images, labels, step)
    with CUDA_SETTINGS_ON_CPU.autocast():
        logits, losses = distiller.forward_train(images, labels, step)
    assert logits.dtype == torch.bfloat16  # autocast did run the network in bf16
    assert {k: v.dtype for k, v in losses.items()} == {k: torch.float32 for k in losses}
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    distiller.backward(losses, step)  # the engine's own backward (a method may step some terms itself)
    assert all(p.dtype == torch.float32 for p in distiller.parameters())  # the weights stay float32


@pytest.mark.parametrize("name", ["kd", "fitnets", "wasserstein"])
def test_a_bf16_channels_last_fit_learns_keeps_float32_weights_and_resumes_exactly(name, digits, tmp_path):
    teacher = digits_model("cnn", 0, channels=8)

    def make():
        student = digits_model("cnn", 3, channels=4)
        return digits_distiller(METHODS[name], student, teacher)

    recipe = Recipe(epochs=3, batch_size=64)
    full, resumed = uninterrupted_and_resumed(make, digits, recipe, tmp_path, execution=CUDA_SETTINGS_ON_CPU)
    assert full.status == "completed" and full.val_acc > 0.3, full.history[-1]  # 3× chance in 3 epochs
    assert_resumed_exactly(full, resumed)
    checkpoint = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in checkpoint["distiller"].values() if t.is_floating_point())


def test_bf16_changes_the_arithmetic_not_the_result(digits):
    """The same kd run in float32 and in bf16 autocast: bf16 rounds (the runs differ) but learns as well."""
    teacher = digits_model("cnn", 0, channels=8)
    results = {}
    for label, execution in (("float32", Execution(CPU, bf16=False, channels_last=False)),
                             ("bf16", CUDA_SETTINGS_ON_CPU)):
        student = digits_model("cnn", 3, channels=8)
        results[label] = fit(KD(student, teacher, KD.Params(), digits_distiller(KD, student, teacher).pair), digits,
                             Recipe(epochs=4, batch_size=64), execution=execution)
    assert results["bf16"].history[0].losses != results["float32"].history[0].losses
    assert results["bf16"].test_acc == pytest.approx(results["float32"].test_acc, abs=0.1)


def test_the_default_is_channels_last_everywhere_and_bf16_on_cuda_only():
    assert Execution.default(torch.device("cpu")) == Execution(torch.device("cpu"), bf16=False, channels_last=True)
    assert Execution.default(torch.device("cuda")) == Execution(torch.device("cuda"), bf16=True, channels_last=True)


def test_the_device_check_runs_here_on_cpu(tmp_path):
    """`benchmarks/device_check.py`, the script run where a GPU is lent, in its smallest form: digits, one epoch."""
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--data", "digits", "--epochs", "1",
                           "--teacher-epochs", "2", "--batch-size", "64", "--json", str(out)],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bf16 + channels_last vs float32:" in done.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in runs] == ["teacher cnn", "kd bf16 + channels_last", "kd float32"]
    assert all(r["images_per_s"] > 0 and 0 < r["test_acc"] <= 1 and len(r["loss"]) >= 1 for r in runs)
    assert runs[0]["test_acc"] > 0.9  # the teacher learned digits in two epochs: its students had something to learn


@pytest.mark.gpu
def test_on_cuda_a_fit_picks_bf16_and_channels_last_and_learns(digits):
    assert pick_device().type == "cuda"
    teacher = digits_model("cnn", 0, channels=8)
    student = digits_model("cnn", 3, channels=8)
    distiller = KD(student, teacher, KD.Params(), digits_distiller(KD, student, teacher).pair)
    result = fit(distiller, digits, Recipe(epochs=6, batch_size=64))
    assert result.status == "completed" and result.test_acc > 0.7  # an untrained teacher: CE does the teaching
    conv = next(p for p in student.parameters() if p.dim() == 4)
    assert conv.is_cuda and conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_on_cuda_a_bf16_run_resumes_exactly(digits, tmp_path):
    teacher = digits_model("cnn", 0, channels=8)
    execution = Execution.default(torch.device("cuda"))

    def make():
        return digits_distiller(KD, digits_model("cnn", 3, channels=4), teacher)

    full, resumed = uninterrupted_and_resumed(make, digits, Recipe(epochs=3, batch_size=64), tmp_path,
                                              execution=execution)
    assert_resumed_exactly(full, resumed)


@pytest.mark.gpu
def test_on_cuda_a_streamed_jpeg_tree_decodes_on_the_gpu_and_resumes_exactly(tmp_path):
    from kdarena.methods.engine import training_loader
    from kdarena.training.build import pair_info
    from kdarena.zoo.data import TreeOptions, load_dataset
    from kdarena.zoo.models import build_model

    data = load_dataset("imagefolder", root=write_tree(tmp_path / "tree", (100, 160)),
                        tree=TreeOptions(in_memory=False, image_size=96, workers=2))
    cuda = torch.device("cuda")
    teacher = build_model("cnn", num_classes=3, in_channels=3, input_size=96, channels=8)

    def make():
        torch.manual_seed(3)
        student = build_model("cnn", num_classes=3, in_channels=3, input_size=96, channels=4)
        return KD(student, teacher, KD.Params(), pair_info(student, teacher, data))

    recipe = Recipe(epochs=2, batch_size=16)
    loader = training_loader(make(), data, recipe, cuda)
    assert loader.decode_on_device  # JPEGs this large: the workers read, the GPU decodes and crops
    epochs = []
    for _ in range(2):
        loader.set_epoch(1)
        epochs.append(torch.cat([b.images for b in loader.batches()]))
    assert epochs[0].is_cuda and epochs[0].shape == (len(data.train), 3, 96, 96) and torch.equal(*epochs)
    full, resumed = uninterrupted_and_resumed(make, data, recipe, tmp_path, execution=Execution.default(cuda))
    assert full.status == "completed" and len(full.history) == 2
    assert_resumed_exactly(full, resumed)


@pytest.mark.gpu
def test_on_cuda_small_streamed_jpegs_decode_in_workers_into_pinned_batches_as_held_ones(tmp_path):
    from kdarena.zoo.data import TreeOptions, load_dataset
    from kdarena.zoo.streaming import loader_for

    root = write_tree(tmp_path / "tree", (24, 24))
    cuda = torch.device("cuda")
    epochs = []
    for in_memory in (True, False):
        data = load_dataset("imagefolder", root=root, tree=TreeOptions(in_memory=in_memory, workers=2))
        loader = loader_for(data.train, batch_size=8, mean=data.mean, std=data.std, device=cuda, shuffle=True,
                            augment=data.augment, seed=4, channels_last=True, persistent=True)
        assert in_memory or not loader.decode_on_device  # small JPEGs: CPU workers, then pinned, then copied
        loader.set_epoch(2)
        epochs.append(torch.cat([b.images for b in loader.batches()]))
    assert epochs[1].is_cuda and torch.equal(*epochs)  # crop + flip drawn on the GPU from the same generator
