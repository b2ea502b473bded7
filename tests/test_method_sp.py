"""Similarity-preserving KD: the row-normalised Gram matrices, the 1/B² factor, stage choice, pairs, a resumed fit."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.nn import functional as F

from kdarena.methods import METHODS
from kdarena.methods.sp import SP, sp_loss
from helpers import (MLP_PAIRS, assert_backward_reaches_the_student_alone, assert_gradcheck_and_precision,
                     assert_one_step_trains_the_student, assert_two_epochs_resume_exactly, digits_batch as _batch,
                     digits_distiller, digits_mlp_or_cnn, digits_pair as _pair, digits_teacher_student,
                     sin_pattern as _fixed)

_sp = functools.partial(digits_distiller, SP)


def _by_hand(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """The paper's L_SP with loops: G_ij = ⟨q_i, q_j⟩, rows scaled to unit L2 norm, Σ (G̃_t − G̃_s)² / B²."""
    b = fs.shape[0]

    def gram(f):
        q = [f[i].flatten() for i in range(b)]
        g = [[float(q[i] @ q[j]) for j in range(b)] for i in range(b)]
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in g]

    gs, gt = gram(fs), gram(ft)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_registered_with_the_reference_defaults_and_space():
    assert METHODS["sp"] is SP
    assert SP.Params().model_dump() == {"sp_weight": 3000.0, "stages": "last"}
    assert set(SP.space) == {"sp_weight", "stages"} and SP.space["sp_weight"].log
    assert SP.space["sp_weight"].low < 3000.0 < SP.space["sp_weight"].high
    assert SP.space["stages"].choices == ("last", "all")
    assert "SP.py" in SP.reference and "B²" in SP.reference
    with pytest.raises(ValueError):
        SP.Params(stages="first")


def test_loss_equals_the_papers_formula_and_the_reference_code():
    # different channels and H×W: each map is flattened as it is, no pooling
    s, t = _fixed((5, 3, 2, 2), 0.0), _fixed((5, 4, 4, 4), 1.0, 0.31)
    assert float(sp_loss([s], [t])) == pytest.approx(_by_hand(s, t), rel=1e-10)
    # RepDistiller distiller_zoo/SP.py @ b84f547, Similarity()([s], [t])[0] on these float64 tensors, run in a scratch folder
    assert float(sp_loss([s], [t])) == pytest.approx(0.37189536107600063, rel=1e-12)
    s2, t2 = _fixed((6, 7), 0.2), _fixed((6, 2, 3, 3), 2.0, 0.45)  # a B×D stage against a map
    assert float(sp_loss([s2], [t2])) == pytest.approx(0.14509318119019415, rel=1e-12)
    # several pairs: the sum (batches of one size)
    s3, t3 = _fixed((5, 6), 0.5), _fixed((5, 2, 2, 2), 0.9)
    assert float(sp_loss([s, s3], [t, t3])) == pytest.approx(_by_hand(s, t) + _by_hand(s3, t3), rel=1e-10)


def test_the_sum_of_squares_is_divided_by_b_squared():
    s, t = _fixed((8, 5), 0.3), _fixed((8, 3), 1.1)
    b = s.shape[0]
    gs, gt = F.normalize(s @ s.t(), dim=1), F.normalize(t @ t.t(), dim=1)
    assert float(sp_loss([s], [t])) == pytest.approx(float(torch.linalg.matrix_norm(gt - gs) ** 2) / b**2, rel=1e-12)
    # the Gram matrices are invariant to a rotation or a positive scale of the features
    q, _ = torch.linalg.qr(_fixed((5, 5), 2.0))
    assert float(sp_loss([2.5 * s @ q], [s])) == pytest.approx(0.0, abs=1e-12)


def test_gradcheck_in_float64():
    s = _fixed((4, 2, 2, 2), 0.1).requires_grad_()
    t = _fixed((4, 3), 1.3)
    assert_gradcheck_and_precision(lambda a, b: sp_loss([a], [b]), s, t)


def test_last_stage_by_default_all_stages_on_request():
    teacher, student = digits_teacher_student(channels=16, num_stages=4)
    last, every = _sp(student, teacher, sp_weight=10.0), _sp(student, teacher, stages="all", sp_weight=10.0)
    assert last.pairs == [(2, 3)]
    assert every.pairs[0] == (0, 0) and every.pairs[-1] == (2, 3) and len(every.pairs) == 3
    x, y = _batch()
    logits, losses = last.forward_train(x, y, None)
    assert set(losses) == {"loss_ce", "loss_sp"}
    with torch.no_grad():
        fs, ft = student.forward_stages(x).stages, teacher.forward_stages(x).stages
    assert float(losses["loss_sp"].detach()) == pytest.approx(10.0 * _by_hand(fs[2].double(), ft[3].double()), rel=1e-4)
    assert last.pop_diagnostics()["sp_loss"] == pytest.approx(_by_hand(fs[2].double(), ft[3].double()), rel=1e-4)
    _, all_losses = every.forward_train(x, y, None)
    hand = sum(_by_hand(fs[i].double(), ft[j].double()) for i, j in every.pairs)
    assert float(all_losses["loss_sp"].detach()) == pytest.approx(10.0 * hand, rel=1e-4)
    assert_backward_reaches_the_student_alone(last, losses)


@pytest.mark.parametrize("student_arch, teacher_arch", MLP_PAIRS)
@pytest.mark.parametrize("stages", ["last", "all"])
def test_check_pair_serves_mlps_on_their_flattened_stages(student_arch, teacher_arch, stages):
    student, teacher = digits_mlp_or_cnn(student_arch, teacher_arch)
    assert SP.check_pair(SP.Params(stages=stages), _pair(student, teacher)) is None
    assert_one_step_trains_the_student(_sp(student, teacher, stages=stages), "loss_sp")


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    assert_two_epochs_resume_exactly(_sp, digits, tmp_path, "loss_sp")
