"""Probabilistic knowledge transfer: the conditional probabilities, the 1/B² mean, gradients, pairs, a resumed fit."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.nn import functional as F

from kdarena.methods import METHODS
from kdarena.methods.pkt import PKT, pkt_loss
from helpers import (MLP_PAIRS, assert_backward_reaches_the_student_alone, assert_gradcheck_and_precision,
                     assert_one_step_trains_the_student, assert_two_epochs_resume_exactly, digits_batch as _batch,
                     digits_distiller, digits_mlp_or_cnn, digits_pair as _pair, digits_teacher_student,
                     sin_pattern as _fixed)

_pkt = functools.partial(digits_distiller, PKT)


def _probabilities(e: torch.Tensor, eps: float = 1e-7) -> list[list[float]]:
    """The paper's conditional probabilities from the cosine kernel scaled to [0, 1], with loops."""
    b = len(e)
    unit = [e[i] / (math.sqrt(float(e[i] @ e[i])) + eps) for i in range(b)]
    k = [[(float(unit[i] @ unit[j]) + 1) / 2 for j in range(b)] for i in range(b)]
    return [[k[i][j] / sum(k[i]) for j in range(b)] for i in range(b)]


def _by_hand(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> float:
    ps, pt = _probabilities(s, eps), _probabilities(t, eps)
    b = len(s)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / b**2


def test_registered_with_the_reference_defaults_and_space():
    assert METHODS["pkt"] is PKT
    assert PKT.Params().model_dump() == {"pkt_weight": 30000.0}
    assert set(PKT.space) == {"pkt_weight"} and PKT.space["pkt_weight"].log
    assert PKT.space["pkt_weight"].low < 30000.0 < PKT.space["pkt_weight"].high
    assert "PKT.py" in PKT.reference and "B²" in PKT.reference


def test_loss_equals_the_papers_kl_and_the_reference_code():
    s, t = _fixed((5, 3), 0.0), _fixed((5, 4), 1.0)
    assert float(pkt_loss(s, t)) == pytest.approx(_by_hand(s, t), rel=1e-10)
    # RepDistiller distiller_zoo/PKT.py @ b84f547, PKT()(s, t) on these float64 tensors, run in a scratch folder
    assert float(pkt_loss(s, t)) == pytest.approx(0.10257682300089398, rel=1e-12)
    s, t = _fixed((7, 6), 0.2), _fixed((7, 9), 2.0)
    assert float(pkt_loss(s, t)) == pytest.approx(0.0330960751171689, rel=1e-12)


def test_the_kl_is_a_mean_over_b_squared_entries_batchmean_divided_by_b():
    s, t = _fixed((8, 5), 0.4), _fixed((8, 3), 1.7)
    b = len(s)
    ps, pt = torch.tensor(_probabilities(s)), torch.tensor(_probabilities(t))
    batchmean = F.kl_div(ps.log(), pt, reduction="batchmean")  # Σ_ij / B: each row's KL, averaged over rows
    assert float(pkt_loss(s, t)) == pytest.approx(float(batchmean) / b, rel=1e-5)  # ε moves it by ~1e-7


def test_identical_geometry_gives_zero_and_a_rotation_or_scale_changes_nothing():
    t = _fixed((6, 4), 0.9)
    q, _ = torch.linalg.qr(_fixed((4, 4), 3.0))
    assert float(pkt_loss(3.0 * t @ q, t)) == pytest.approx(0.0, abs=1e-12)
    assert float(pkt_loss(_fixed((6, 4), 0.1), t)) > 1e-4


def test_gradcheck_in_float64():
    assert_gradcheck_and_precision(pkt_loss, _fixed((4, 3), 0.1).requires_grad_(), _fixed((4, 2), 1.3))


def test_a_zero_embedding_has_a_finite_loss_and_gradient():
    s = _fixed((4, 3), 0.1)
    s[2] = 0.0
    s.requires_grad_()
    loss = pkt_loss(s, _fixed((4, 5), 1.0))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(s.grad).all()


def test_forward_uses_the_pooled_last_stage_and_the_weight():
    teacher, student = digits_teacher_student()
    d = _pkt(student, teacher, pkt_weight=100.0)
    x, y = _batch()
    logits, losses = d.forward_train(x, y, None)
    assert set(losses) == {"loss_ce", "loss_pkt"}
    with torch.no_grad():
        s_emb = student.forward_stages(x).stages[-1].mean(dim=(2, 3))
        t_emb = teacher.forward_stages(x).stages[-1].mean(dim=(2, 3))
    hand = _by_hand(s_emb.double(), t_emb.double())
    assert float(losses["loss_pkt"].detach()) == pytest.approx(100.0 * hand, rel=1e-4)
    assert d.pop_diagnostics()["pkt_loss"] == pytest.approx(hand, rel=1e-4)
    assert_backward_reaches_the_student_alone(d, losses)


@pytest.mark.parametrize("student_arch, teacher_arch", MLP_PAIRS)
def test_check_pair_serves_mlps_on_their_last_hidden_layer(student_arch, teacher_arch):
    student, teacher = digits_mlp_or_cnn(student_arch, teacher_arch)
    assert PKT.check_pair(PKT.Params(), _pair(student, teacher)) is None
    assert_one_step_trains_the_student(_pkt(student, teacher), "loss_pkt")


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    assert_two_epochs_resume_exactly(_pkt, digits, tmp_path, "loss_pkt")
