"""The one short check to run where a GPU is lent: a kd pair trained through the engine in bf16 + channels_last
beside the same run in float32, with images/s and the loss curve of each.

It needs torch, pydantic, numpy and pyyaml (and Pillow for JPEG folders): none of Ray, MLflow or Optuna, so it runs
on a machine with torch and a GPU and no network, the engine's few packages carried as wheels. On CPU (CI runs
it so, on digits) the same code runs with CPU autocast.

    python -m benchmarks.device_check --data DIR/cifar10-jpeg.tar.gz      # an imagefolder .tar.gz: CIFAR-10 as JPEGs
    python -m benchmarks.device_check --data digits --epochs 1 --teacher-epochs 1   # seconds, anywhere

The teacher is trained first (bf16 + channels_last on CUDA); each student run then starts from the same seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass

import torch

from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import EpochResult, fit
from kdarena.methods.execution import Execution
from kdarena.methods.kd import KD
from kdarena.methods.recipe import Recipe
from kdarena.training.build import pair_info
from kdarena.zoo.data import Dataset, load_dataset
from kdarena.zoo.models import build_model


@dataclass
class Run:
    label: str
    history: list[EpochResult]
    test_acc: float | None
    images_per_s: float  # training images per second, each epoch's validation pass counted in
    model: torch.nn.Module  # the network it trained


def train(label: str, data: Dataset, arch: str, teacher: torch.nn.Module | None, recipe: Recipe,
          execution: Execution, seed: int = 0, options: dict | None = None) -> Run:
    """`arch` trained by kd from `teacher`, or alone without one; the seed fixes its initial weights."""
    torch.manual_seed(seed)
    student = build_model(arch, num_classes=data.num_classes, in_channels=data.in_channels,
                          input_size=data.input_size, **(options or {}))
    distiller = (KD(student, teacher, KD.Params(), pair_info(student, teacher, data)) if teacher is not None
                 else Baseline(student, None, Baseline.Params(), pair_info(student, student, data)))
    result = fit(distiller, data, recipe, execution=execution)
    seconds = sum(e.seconds for e in result.history)  # val_acc is read back each epoch: the GPU has finished
    return Run(label, result.history, result.test_acc, len(data.train) * len(result.history) / max(seconds, 1e-9),
               student)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="'digits', or an imagefolder tree or .tar.gz of one")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--epochs", type=int, default=3, help="each student run's epochs")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} ({device})", flush=True)
    start = time.perf_counter()
    data = (load_dataset("digits") if args.data == "digits"
            else load_dataset("imagefolder", root=args.data, label="cifar10-jpeg"))
    print(f"data {data.label}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, "
          f"{data.in_channels}x{data.input_size}x{data.input_size}, loaded in {time.perf_counter() - start:.1f} s",
          flush=True)
    small = data.input_size < 16  # digits: the zoo's CIFAR networks need 32 px; a CNN pair serves
    teacher_arch, student_arch = ("cnn", "cnn") if small else (args.teacher, args.student)

    fast = Execution(device, bf16=True, channels_last=True)
    teacher_options = {"channels": 32} if small else {}
    runs = [train(f"teacher {teacher_arch}", data, teacher_arch, None,
                  Recipe(epochs=args.teacher_epochs, batch_size=args.batch_size, lr=0.05), fast,
                  options=teacher_options)]
    print(f"{runs[0].label}: test_acc {runs[0].test_acc:.4f}, {runs[0].images_per_s:,.0f} images/s", flush=True)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=0.05)
    for label, execution in (("kd bf16 + channels_last", fast),
                             ("kd float32", Execution(device, bf16=False, channels_last=False))):
        runs.append(train(label, data, student_arch, runs[0].model, recipe, execution))
        print(f"{label}: done, {runs[-1].images_per_s:,.0f} images/s", flush=True)
    print(f"\n{'run':<26}{'images/s':>12}{'test_acc':>10}  loss (ce + kd) per epoch")
    for run in runs:
        curve = " ".join(f"{sum(e.losses.values()):.3f}" for e in run.history)
        print(f"{run.label:<26}{run.images_per_s:>12,.0f}{run.test_acc or float('nan'):>10.4f}  {curve}")
    bf16, fp32 = runs[1], runs[2]
    print(f"\nbf16 + channels_last vs float32: {bf16.images_per_s / fp32.images_per_s:.2f}x the images/s; "
          f"test_acc {bf16.test_acc:.4f} vs {fp32.test_acc:.4f}; total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "runs": [
                {"label": r.label, "images_per_s": r.images_per_s, "test_acc": r.test_acc,
                 "val_acc": [e.val_acc for e in r.history], "loss": [sum(e.losses.values()) for e in r.history]}
                for r in runs]}, f, indent=1)


if __name__ == "__main__":
    main()
