"""Neuron selectivity transfer: the polynomial-kernel MMD², pooling, gradients, spatial-only pairs, a resumed fit."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.nn import functional as F

from kdarena.methods import METHODS
from kdarena.methods.nst import NST, nst_loss
from helpers import (assert_backward_reaches_the_student_alone, assert_gradcheck_and_precision,
                     assert_refuses_mlps_for_want_of_spatial_maps, assert_two_epochs_resume_exactly,
                     digits_batch as _batch, digits_distiller, digits_teacher_student, sin_pattern as _fixed)

_nst = functools.partial(digits_distiller, NST)


def _by_hand(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """MMD² with k(x, y) = (xᵀy)² between unit-normalised channel rows, with loops, maps of equal H×W.

    A channel of zeros (a dead ReLU) stays zeros, as F.normalize's ε=1e-12 leaves it.
    """
    b = fs.shape[0]

    def rows(f):
        return [[f[n, c].flatten() / max(float(f[n, c].norm()), 1e-12) for c in range(f.shape[1])] for n in range(b)]

    def mean_k(x, y):
        return sum(float(x[n][i] @ y[n][j]) ** 2 for n in range(b) for i in range(len(x[n])) for j in range(len(y[n]))
                   ) / (b * len(x[0]) * len(y[0]))

    s, t = rows(fs), rows(ft)
    return mean_k(t, t) + mean_k(s, s) - 2 * mean_k(s, t)


def test_registered_with_the_reference_defaults_and_space():
    assert METHODS["nst"] is NST
    assert NST.Params().model_dump() == {"nst_weight": 50.0}
    assert set(NST.space) == {"nst_weight"} and NST.space["nst_weight"].log
    assert NST.space["nst_weight"].low < 50.0 < NST.space["nst_weight"].high
    assert "NST.py" in NST.reference


def test_loss_equals_the_mmd_formula_and_the_reference_code():
    # student 4×4, teacher 2×2: the student's map is average-pooled to 2×2 first; channel counts differ
    s, t = _fixed((3, 4, 4, 4), 0.0), _fixed((3, 6, 2, 2), 1.0, 0.31)
    assert float(nst_loss([s], [t])) == pytest.approx(_by_hand(F.avg_pool2d(s, 2), t), rel=1e-10)
    # RepDistiller distiller_zoo/NST.py @ b84f547, NSTLoss()([s], [t])[0] on these float64 tensors, run in a scratch folder
    assert float(nst_loss([s], [t])) == pytest.approx(0.4357012863207983, rel=1e-12)
    s2, t2 = _fixed((2, 3, 2, 2), 0.2), _fixed((2, 5, 4, 4), 2.0, 0.45)  # now the teacher's map is pooled
    assert float(nst_loss([s2], [t2])) == pytest.approx(0.8018060606077478, rel=1e-12)
    assert float(nst_loss([s2], [t2])) == pytest.approx(_by_hand(s2, F.avg_pool2d(t2, 2)), rel=1e-10)
    # pairs add up
    assert float(nst_loss([s, s2], [t, t2])) == pytest.approx(0.4357012863207983 + 0.8018060606077478, rel=1e-12)


def test_mmd_is_zero_for_the_same_selectivities_whatever_their_scale_or_channel_order():
    t = _fixed((2, 5, 3, 3), 0.4)
    s = 3.0 * t[:, torch.tensor([4, 2, 0, 1, 3])]
    assert float(nst_loss([s], [t])) == pytest.approx(0.0, abs=1e-12)
    assert float(nst_loss([_fixed((2, 5, 3, 3), 1.9)], [t])) > 1e-4


def test_gradcheck_in_float64():
    s = _fixed((2, 3, 4, 4), 0.1).requires_grad_()
    t = _fixed((2, 2, 2, 2), 1.3)
    assert_gradcheck_and_precision(lambda a, b: nst_loss([a], [b]), s, t)


def test_every_spatial_stage_pair_is_distilled_with_the_weight():
    teacher, student = digits_teacher_student(channels=16, num_stages=4)  # 4 stages against the student's 3
    d = _nst(student, teacher, nst_weight=7.0)
    assert len(d.pairs) == 3 and d.pairs[0] == (0, 0) and d.pairs[-1] == (2, 3)
    x, y = _batch()
    _, losses = d.forward_train(x, y, None)
    assert set(losses) == {"loss_ce", "loss_nst"}
    with torch.no_grad():
        fs, ft = student.forward_stages(x).stages, teacher.forward_stages(x).stages
    hand = 0.0
    for i, j in d.pairs:
        a, b = fs[i].double(), ft[j].double()
        if a.shape[-1] > b.shape[-1]:
            a = F.adaptive_avg_pool2d(a, b.shape[-2:])
        elif b.shape[-1] > a.shape[-1]:
            b = F.adaptive_avg_pool2d(b, a.shape[-2:])
        hand += _by_hand(a, b)
    assert float(losses["loss_nst"].detach()) == pytest.approx(7.0 * hand, rel=1e-4)
    assert d.pop_diagnostics()["nst_loss"] == pytest.approx(hand, rel=1e-4)
    assert_backward_reaches_the_student_alone(d, losses)


def test_check_pair_refuses_pairs_without_spatial_maps():
    assert_refuses_mlps_for_want_of_spatial_maps(NST, "MLP")


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    assert_two_epochs_resume_exactly(_nst, digits, tmp_path, "loss_nst")
