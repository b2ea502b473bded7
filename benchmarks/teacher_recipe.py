"""The classic MLP teacher recipe vs kdarena's earlier fixed one: test errors of a 1200-1200 MLP, same epochs.

Both sides train `mlp(hidden=[1200, 1200], dropout=0.5)` through the engine,
with the same optimiser, schedule, epochs, batch size and seed:

- before: what kdarena could express until recipes took `augment:` and the
  MLP took `input_dropout` / `max_norm` (no augmentation for digit-like
  data, hidden dropout only) — `sweeps/mnist-mlp.yaml`'s earlier teacher;
- classic: the dropout paper's MNIST teacher recipe as `sweeps/mnist-mlp.yaml`
  now writes it — ±2 px random translation (`augment: translate`), input
  dropout 0.2, max-norm 3.5 on each hidden unit's incoming weights.

    python -m benchmarks.teacher_recipe [--dataset fashion-mnist] [--epochs 30] [--seed 0]

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (offline).
"""

from __future__ import annotations

import argparse
import time

import torch

from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import fit
from kdarena.methods.recipe import Recipe
from kdarena.training.build import pair_info
from kdarena.zoo.data import load_dataset
from kdarena.zoo.models import build_model

RECIPES = {
    "before": ({"dropout": 0.5}, None),
    "classic": ({"dropout": 0.5, "input_dropout": 0.2, "max_norm": 3.5}, "translate"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_dataset(args.dataset)
    print(f"{data.label}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images; "
          f"mlp 1200-1200, {args.epochs} epochs, batch {args.batch_size}, sgd lr {args.lr} cosine, seed {args.seed}, "
          f"torch threads {torch.get_num_threads()}")
    rows = []
    for name, (options, augment) in RECIPES.items():
        torch.manual_seed(args.seed)
        model = build_model("mlp", num_classes=data.num_classes, in_channels=data.in_channels,
                            input_size=data.input_size, hidden=[1200, 1200], **options)
        recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, augment=augment)
        start = time.perf_counter()
        result = fit(Baseline(model, None, Baseline.Params(), pair_info(model, model, data)), data, recipe,
                     device=torch.device("cpu"))
        seconds = time.perf_counter() - start
        errors = round((1 - result.test_acc) * len(data.test))
        rows.append((name, options, augment, errors, result.best_val_acc, seconds))
        print(f"{name:8s} {options} augment={augment}: {errors} test errors ({100 * result.test_acc:.2f} %), "
              f"best val_acc {100 * result.best_val_acc:.2f} %, {seconds:.0f} s", flush=True)
    before, classic = rows[0][3], rows[1][3]
    print(f"classic recipe: {classic} test errors vs {before} before ({before - classic:+d}, "
          f"{classic / before:.2f}x the errors)")


if __name__ == "__main__":
    main()
