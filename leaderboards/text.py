"""How the leaderboard's values read as text: hyper-parameters, large numbers, accuracies with their spread."""

from __future__ import annotations

import math
from typing import Any


def format_hparams(hparams: dict[str, Any] | None, limit: int | None = None) -> str:
    """`temperature=4 alpha=0.9 lr=0.05`: method knobs first, then lr and weight decay."""
    if not hparams:
        return ""
    items = [(k, v) for k, v in hparams.items() if k not in ("lr", "weight_decay")]
    items += [(k, hparams[k]) for k in ("lr", "weight_decay") if k in hparams]
    shown = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items]
    return " ".join(shown[:limit] if limit else shown)


# -- rendering (shared by the CLI's table and its Markdown export) ---------------------------------------------
def _num(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def human(v: Any) -> str:
    """12345678 → 12.3M; missing → —."""
    if not _num(v):
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def accuracy_text(row: dict[str, Any]) -> str:
    """`95.12 ± 0.43 % (2 seeds)`, `94.40 % (trial)`, `64.54 % reported`."""
    mean = row["test_acc_mean"]
    if not _num(mean):
        return "—"
    if row.get("reported"):
        return f"{100 * mean:.2f} % reported"
    n = int(row["n_seeds"])
    if row["source"] == "trial":
        return f"{100 * mean:.2f} % (best trial)"
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    return f"{100 * mean:.2f} ± {100 * row['test_acc_std']:.2f} % ({seeds})"
