"""Relational KD: the distance and angle potentials, RKD's B²/B³ convention, gradients, pairs, and a resumed fit."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from kdarena.methods import METHODS
from kdarena.methods.rkd import RKD, rkd_losses
from helpers import (MLP_PAIRS, assert_backward_reaches_the_student_alone, assert_gradcheck_and_precision,
                     assert_one_step_trains_the_student, assert_two_epochs_resume_exactly, digits_batch as _batch,
                     digits_distiller, digits_mlp_or_cnn, digits_pair as _pair, digits_teacher_student,
                     sin_pattern as _fixed)

_rkd = functools.partial(digits_distiller, RKD)


def _smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _by_hand(s: torch.Tensor, t: torch.Tensor, distinct: bool = False) -> tuple[float, float]:
    """L_D and L_A from the paper's definitions, with plain loops.

    Means over all B² pairs and B³ triplets (RKD's convention), or with `distinct` over the pairs i ≠ j and
    the triplets of three different samples only.
    """
    b = len(s)

    def dist(e):
        d = [[0.0 if i == j else max(float((e[i] - e[j]).pow(2).sum()), 1e-12) ** 0.5 for j in range(b)] for i in range(b)]
        positive = [x for row in d for x in row if x > 0]
        mu = sum(positive) / len(positive)
        return [[x / mu for x in row] for row in d]

    def angle(e, i, j, k):
        u, v = e[j] - e[i], e[k] - e[i]
        if float(u.norm()) == 0 or float(v.norm()) == 0:
            return 0.0
        return float(u @ v) / (float(u.norm()) * float(v.norm()))

    ds, dt = dist(s), dist(t)
    pairs = [(i, j) for i in range(b) for j in range(b) if not distinct or i != j]
    triplets = [(i, j, k) for i, j, k in itertools.product(range(b), repeat=3) if not distinct or len({i, j, k}) == 3]
    loss_d = sum(_smooth_l1(ds[i][j] - dt[i][j]) for i, j in pairs) / len(pairs)
    loss_a = sum(_smooth_l1(angle(s, i, j, k) - angle(t, i, j, k)) for i, j, k in triplets) / len(triplets)
    return loss_d, loss_a


def test_registered_with_the_reference_defaults_and_space():
    assert METHODS["rkd"] is RKD
    assert RKD.Params().model_dump() == {"rkd_weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0}
    assert set(RKD.space) == {"distance_weight", "angle_weight"}
    assert RKD.space["distance_weight"].log and RKD.space["angle_weight"].log
    assert RKD.space["distance_weight"].low < 25.0 < RKD.space["distance_weight"].high
    assert RKD.space["angle_weight"].low < 50.0 < RKD.space["angle_weight"].high
    assert "RKD.py" in RKD.reference and "B³" in RKD.reference


def test_losses_equal_the_papers_potentials_and_the_reference_code():
    s, t = _fixed((5, 3), 0.0), _fixed((5, 4), 1.0)  # different widths: only relations are compared
    loss_d, loss_a = rkd_losses(s, t)
    hand_d, hand_a = _by_hand(s, t)
    assert float(loss_d) == pytest.approx(hand_d, rel=1e-10)
    assert float(loss_a) == pytest.approx(hand_a, rel=1e-10)
    # RepDistiller distiller_zoo/RKD.py @ b84f547, RKDLoss(w_d, w_a)(s, t) on these float64 tensors,
    # run in a scratch folder: RKDLoss(1, 0) → L_D, RKDLoss(0, 1) → L_A, RKDLoss() → 25·L_D + 50·L_A
    assert float(loss_d) == pytest.approx(0.22677621966510153, rel=1e-12)
    assert float(loss_a) == pytest.approx(0.08310714396748982, rel=1e-12)
    assert float(25 * loss_d + 50 * loss_a) == pytest.approx(9.824762690002029, rel=1e-12)


def test_means_include_the_degenerate_pairs_and_triplets():
    s, t = _fixed((6, 3), 0.3), _fixed((6, 5), 2.0)
    b = len(s)
    loss_d, loss_a = rkd_losses(s, t)
    distinct_d, distinct_a = _by_hand(s, t, distinct=True)
    # i = j, and triplets with a repeated index, add 0 to the sums but count in RKD's denominators B², B³
    assert float(loss_d) == pytest.approx(distinct_d * (b - 1) / b, rel=1e-10)
    assert float(loss_a) == pytest.approx(distinct_a * (b - 1) * (b - 2) / b**2, rel=1e-10)


def test_gradcheck_in_float64():
    s = _fixed((4, 3), 0.1).requires_grad_()
    t = _fixed((4, 2), 1.3)
    assert_gradcheck_and_precision(lambda a, b: rkd_losses(a, b)[0], s, t)
    assert torch.autograd.gradcheck(lambda x: rkd_losses(x, t)[1], (s,))


def test_a_batch_of_one_or_of_equal_embeddings_gives_zero_not_nan():
    one = rkd_losses(_fixed((1, 3), 0.0), _fixed((1, 4), 1.0))
    same = rkd_losses(torch.ones(4, 3), _fixed((4, 4), 1.0))
    assert [float(v) for v in one] == [0.0, 0.0]
    assert all(math.isfinite(float(v)) for v in same)


def test_forward_uses_the_pooled_last_stage_and_weights_both_terms():
    teacher, student = digits_teacher_student()
    d = _rkd(student, teacher, rkd_weight=2.0, distance_weight=3.0, angle_weight=5.0)
    x, y = _batch()
    logits, losses = d.forward_train(x, y, None)
    assert set(losses) == {"loss_ce", "loss_rkd"}
    with torch.no_grad():
        s_emb = student.forward_stages(x).stages[-1].mean(dim=(2, 3))
        t_emb = teacher.forward_stages(x).stages[-1].mean(dim=(2, 3))
    hand_d, hand_a = _by_hand(s_emb.double(), t_emb.double())
    assert float(losses["loss_rkd"].detach()) == pytest.approx(2.0 * (3.0 * hand_d + 5.0 * hand_a), rel=1e-4)
    diag = d.pop_diagnostics()
    assert diag["rkd_distance"] == pytest.approx(hand_d, rel=1e-4)
    assert float(losses["loss_ce"].detach()) == pytest.approx(float(F.cross_entropy(logits.detach(), y)), rel=1e-6)
    assert_backward_reaches_the_student_alone(d, losses)


@pytest.mark.parametrize("student_arch, teacher_arch", MLP_PAIRS)
def test_check_pair_serves_mlps_on_their_last_hidden_layer(student_arch, teacher_arch):
    student, teacher = digits_mlp_or_cnn(student_arch, teacher_arch)
    assert RKD.check_pair(RKD.Params(), _pair(student, teacher)) is None
    assert_one_step_trains_the_student(_rkd(student, teacher), "loss_rkd")


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    assert_two_epochs_resume_exactly(_rkd, digits, tmp_path, "loss_rkd")
