"""Choosing and matching stages through the feature contract, for feature-based methods.

Methods name stages by index into the model's `stages` list (negative
indices count from the last), never by attribute; these helpers pair a
student stage with a teacher stage and bring two maps to one size. The
helpers several methods share live here too: `promote` and `full_precision`
(losses never computed below float32) and `pooled_embedding` (a stage as
one vector per sample).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.nn import functional as F

from kdarena.zoo.models import StageShape


def resolve_stage(index: int, shapes: list[StageShape], who: str) -> int:
    """A stage index made non-negative, or ValueError naming the valid range."""
    n = len(shapes)
    if not -n <= index < n:
        raise ValueError(f"{who} has {n} stages (0..{n - 1}, or -{n}..-1); stage {index} does not exist")
    return index % n


def paired_stages(student: list[StageShape], teacher: list[StageShape], spatial_only: bool = False) -> list[tuple[int, int]]:
    """Student↔teacher stage pairs by relative depth: last with last, first with first.

    With different stage counts, each student stage takes the teacher stage
    at the same fraction of the network's depth.
    """
    s_idx = [i for i, s in enumerate(student) if s.spatial or not spatial_only]
    t_idx = [i for i, s in enumerate(teacher) if s.spatial or not spatial_only]
    if not s_idx or not t_idx:
        return []
    if len(s_idx) == 1 or len(t_idx) == 1:
        return [(s_idx[-1], t_idx[-1])]
    return [(s, t_idx[round(k * (len(t_idx) - 1) / (len(s_idx) - 1))]) for k, s in enumerate(s_idx)]


def pool_to_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two B×C×H×W maps down to the other's H×W."""
    ha, hb = a.shape[-2:], b.shape[-2:]
    if ha == hb:
        return a, b
    if ha[0] * ha[1] > hb[0] * hb[1]:
        return F.adaptive_avg_pool2d(a, hb), b
    return a, F.adaptive_avg_pool2d(b, ha)


def needs_spatial(shapes: list[StageShape]) -> bool:
    return any(s.spatial for s in shapes)


def promote(t: torch.Tensor) -> torch.Tensor:
    """`t` in at least float32: half and bfloat16 are lifted, float32 and float64 stay as they are.

    Losses compute in this precision so that bf16 activations under autocast
    are not summed in bf16, and float64 inputs (gradcheck) are never demoted.
    """
    return t.float() if t.is_floating_point() and torch.finfo(t.dtype).bits < 32 else t


def full_precision(device: torch.device):
    """Autocast off: Gram-like products and SVDs are computed in full precision."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else nullcontext()


def pooled_embedding(f: torch.Tensor) -> torch.Tensor:
    """A stage as one B×D vector per sample: a B×C×H×W map average-pooled over H×W, a B×D stage as it is."""
    return F.adaptive_avg_pool2d(f, 1).flatten(1) if f.dim() == 4 else f.flatten(1)
