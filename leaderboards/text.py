"""How the leaderboard's values read as text: hyper-parameters, large numbers, accuracies with their spread."""

from __future__ import annotations

import math
from collections import Counter
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
    """`95.12 ± 1.02 % (3 seeds)` (± the 95 % CI's half-width), `95.10 % (1 seed)`, `94.40 % (best trial)`, `64.54 % reported`."""
    mean = row["test_acc_mean"]
    if not _num(mean):
        return "—"
    if row.get("reported"):
        return f"{100 * mean:.2f} % reported"
    n = int(row["n_seeds"])
    if row["source"] == "trial":
        return f"{100 * mean:.2f} % (best trial)"
    if n < 2 or not _num(row.get("test_acc_ci_high")):
        return f"{100 * mean:.2f} % ({n} seed)"
    return f"{100 * mean:.2f} ± {100 * (row['test_acc_ci_high'] - mean):.2f} % ({n} seeds)"


#: the mark of a row that is not shown to differ from the student trained alone
SAME_AS_ALONE = "≈"


def versus_alone_text(row: dict[str, Any]) -> str:
    """`+0.46 (p=0.012)`; `≈ +0.10 (p=0.41)` not distinguishable; `≈ +0.10 (1 shared seed: no test)`; `—`: no comparison."""
    if row.get("reported") or not _num(row.get("vs_student_diff")):
        return "—"
    diff = f"{100 * row['vs_student_diff']:+.2f}"
    p = row.get("vs_student_p")
    if not _num(p):
        n = int(row["vs_student_n"])
        return f"{SAME_AS_ALONE} {diff} ({n} shared seed{'s' if n != 1 else ''}: no test)"
    shown = f"{diff} (p={p:.2g})"
    return shown if row.get("distinguishable") else f"{SAME_AS_ALONE} {shown}"


def rank_labels(ranks: list[int], groups: list[str]) -> list[str]:
    """`1`, or `=1` for a rank two rows of one group (a dataset) share: a tie in the ranking key."""
    pairs = list(zip(groups, ranks))
    counts = Counter(pairs)
    return [f"={r}" if counts[(g, r)] > 1 else str(r) for g, r in pairs]


LEGEND = ("Ranked by mean val_acc, then fewer MACs, then more seeds (never by test accuracy); =N: rows tied on all "
          "three. test_acc: mean ± the 95 % confidence interval's half-width (Student t) over final seeds, else one "
          "seed or the best full-budget trial. vs alone: the paired difference in test accuracy (percentage points) "
          f"from the student trained alone on the seeds both ran; {SAME_AS_ALONE} = not distinguishable from it "
          "(paired t-test p ≥ 0.05, or fewer than two shared seeds).")
