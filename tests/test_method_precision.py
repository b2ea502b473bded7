"""Losses never down-cast: float64 inputs are computed in float64, bf16 inputs are lifted to float32."""

from __future__ import annotations

import pytest
import torch

from kdarena.methods import METHODS
from helpers import digits_distiller, digits_model


def _maps(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64).to(dtype)]


def _losses(name: str):
    """The method's distillation-term function over two lists of stage maps."""
    student, teacher = digits_model("cnn", 0, channels=4), digits_model("cnn", 1, channels=4)
    distiller = digits_distiller(METHODS[name], student, teacher)
    if name == "at":
        from kdarena.methods.at import at_loss
        return lambda s, t: at_loss(s, t, 2)
    if name == "fitnets":
        return distiller
    if name == "fsp":
        distiller.pairs = [(0, 0), (1, 1)]
        distiller.adapters = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
        return distiller.fsp_loss
    from kdarena.methods.svd import svd_loss
    return lambda s, t: svd_loss(s, t, 2, 8.0)


@pytest.mark.parametrize("name", ["at", "fitnets", "fsp", "svd"])
def test_float64_stays_float64_and_bfloat16_is_lifted(name):
    loss = _losses(name)
    if name == "fitnets":  # its regressor holds float32 weights: the student side is float32, the hint varies
        s = loss.pair.student_stages[loss.student_stage]
        t = loss.pair.teacher_stages[loss.teacher_stage]
        guided = torch.randn(3, s.channels, s.height, s.width)
        hint = torch.randn(3, t.channels, t.height, t.width, dtype=torch.float64)
        assert loss.hint_loss(guided, hint).dtype == torch.float64
        assert loss.hint_loss(guided, hint.bfloat16()).dtype == torch.float32
        return
    assert loss(_maps(torch.float64, 0), _maps(torch.float64, 1)).dtype == torch.float64
    assert loss(_maps(torch.bfloat16, 0), _maps(torch.bfloat16, 1)).dtype == torch.float32
    # the same value whatever the precision: only the arithmetic's precision changed
    hi = loss(_maps(torch.float64, 0), _maps(torch.float64, 1))
    lo = loss(_maps(torch.float32, 0), _maps(torch.float32, 1))
    assert float(hi) == pytest.approx(float(lo), rel=1e-4)
