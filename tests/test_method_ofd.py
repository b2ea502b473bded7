"""Overhaul of feature distillation: the Gaussian margin, the partial L2, margins estimated from the teacher, resume."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from kdarena.methods import METHODS, StepInfo
from kdarena.methods.ofd import OFD, gaussian_margin, ofd_loss, partial_l2
from helpers import (assert_refuses_mlps_for_want_of_spatial_maps, assert_resumed_exactly, assert_same_state,
                     digits_batch as _batch, digits_distiller, digits_model as _model, digits_teacher_student,
                     sin_pattern, two_epochs_and_resumed)

_ofd = functools.partial(digits_distiller, OFD)
_fixed = functools.partial(sin_pattern, scale=2.0)


# a teacher BN's |γ| (the std) and β (the mean) per channel, and the margins mdistiller computes from them:
# mdistiller/distillers/OFD.py @ a08d46f, OFD.init_ofd_modules on a BN with weight [1, .5, 2, -.8, .3] and
# bias [0, -.4, 1.5, .2, 1.2] (its margins are float32)
STD = torch.tensor([1.0, 0.5, 2.0, -0.8, 0.3], dtype=torch.float64)
MEAN = torch.tensor([0.0, -0.4, 1.5, 0.2, 1.2], dtype=torch.float64)
MDISTILLER_MARGINS = torch.tensor([-0.7978845834732056, -0.5837807059288025, -1.1575559377670288,
                                   -0.5708431601524353, -0.8999999761581421], dtype=torch.float64)


def _negative_mean_by_quadrature(mean: float, std: float) -> float:
    """E[x | x < 0] for N(mean, std²), by the trapezoid rule over [mean − 12·std, 0]."""
    n = 200_000
    lo = mean - 12 * std
    xs = [lo + (0 - lo) * i / n for i in range(n + 1)]
    pdf = [math.exp(-0.5 * ((x - mean) / std) ** 2) for x in xs]
    h = (0 - lo) / n
    mass = h * (sum(pdf) - 0.5 * (pdf[0] + pdf[-1]))
    first = h * (sum(x * p for x, p in zip(xs, pdf)) - 0.5 * (xs[0] * pdf[0] + xs[-1] * pdf[-1]))
    return first / mass


def _partial_l2_by_hand(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> float:
    """The paper: T̃ = max(T, m_c); d = 0 if S ≤ T̃ ≤ 0 else (T̃ − S)²; summed per sample, averaged over the batch."""
    total = 0.0
    b, c, h, w = s.shape
    for i in range(b):
        for k in range(c):
            for y in range(h):
                for x in range(w):
                    target = max(float(t[i, k, y, x]), float(m[k]))
                    source = float(s[i, k, y, x])
                    if not (source <= target <= 0):
                        total += (target - source) ** 2
    return total / b


def test_registered_with_mdistillers_defaults_and_space():
    assert METHODS["ofd"] is OFD
    assert OFD.Params().model_dump() == {"feat_weight": 1e-3, "connector_kernel": 1}
    assert set(OFD.space) == {"feat_weight", "connector_kernel"}
    assert "OFD.py" in OFD.reference


def test_margin_is_the_expected_negative_response_of_a_gaussian():
    m = gaussian_margin(MEAN, STD)
    assert torch.allclose(m, MDISTILLER_MARGINS, rtol=1e-6, atol=0)
    for k in range(4):  # the fifth has P(x < 0) = Φ(−4) ≤ 0.001: −3σ
        assert float(m[k]) == pytest.approx(_negative_mean_by_quadrature(float(MEAN[k]), abs(float(STD[k]))), rel=1e-6)
    assert float(m[4]) == pytest.approx(-0.9, rel=1e-12)


def test_partial_l2_follows_the_paper_and_mdistiller():
    s, t = _fixed((2, 5, 3, 3), 0.3), _fixed((2, 5, 3, 3), 2.0)
    loss = partial_l2(s, t, MDISTILLER_MARGINS)
    assert float(loss) == pytest.approx(_partial_l2_by_hand(s, t, MDISTILLER_MARGINS), rel=1e-12)
    # mdistiller OFD.py @ a08d46f: feat_loss(s, t, margins) in float64 with the margins above
    assert float(loss) == pytest.approx(155.55244807905905, rel=1e-12)
    # a student below a non-positive target costs nothing; above it, the squared gap
    t0 = torch.full((1, 5, 1, 1), -0.1, dtype=torch.float64)
    assert float(partial_l2(t0 - 1.0, t0, MDISTILLER_MARGINS)) == 0.0
    assert float(partial_l2(t0 + 1.0, t0, MDISTILLER_MARGINS)) == pytest.approx(5.0, rel=1e-12)


def test_layers_halve_towards_the_input_and_the_teacher_is_pooled_to_the_student():
    s = [_fixed((2, 5, 2, 2), 0.1), _fixed((2, 5, 2, 2), 0.9)]
    t = [_fixed((2, 5, 4, 4), 1.3), _fixed((2, 5, 2, 2), -0.6)]
    pooled = t[0].reshape(2, 5, 2, 2, 2, 2).mean(dim=(3, 5))  # 2×2 blocks of the 4×4 map
    want = 0.5 * _partial_l2_by_hand(s[0], pooled, MDISTILLER_MARGINS) + _partial_l2_by_hand(s[1], t[1], MDISTILLER_MARGINS)
    assert float(ofd_loss(s, t, [MDISTILLER_MARGINS] * 2)) == pytest.approx(want, rel=1e-12)


def test_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64)
    m = torch.tensor([-0.8, -0.3, -1.2], dtype=torch.float64)
    assert ofd_loss([s], [t], [m]).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a: ofd_loss([a], [t], [m]), (s,))
    assert partial_l2(s.detach().bfloat16(), t.bfloat16(), m.float()).dtype == torch.float32


def test_estimated_margins_equal_the_bn_formula_on_a_bn_output():
    """A batch-normalised map has per-channel mean β and std |γ| exactly: the estimate gives mdistiller's margin."""
    teacher, student = digits_teacher_student(channels=5)
    d = _ofd(student, teacher)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, 8, 8, generator=gen, dtype=torch.float64) * 3 + 1
    x_hat = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.var(dim=(0, 2, 3), unbiased=False, keepdim=True).sqrt()
    bn_output = STD.view(1, 5, 1, 1) * x_hat + MEAN.view(1, 5, 1, 1)
    preact = [bn_output, torch.zeros(16, 10, 4, 4), torch.zeros(16, 20, 2, 2)]
    d.observe(preact)
    assert torch.allclose(d.margins()[0], gaussian_margin(MEAN, STD), rtol=1e-9, atol=1e-12)
    d.observe(preact)  # the same data again: the same statistics
    assert torch.allclose(d.margins()[0], gaussian_margin(MEAN, STD), rtol=1e-9, atol=1e-12)


def test_check_pair_refuses_mlps_and_stages_align_from_the_deepest():
    assert_refuses_mlps_for_want_of_spatial_maps(OFD)
    d = _ofd(_model("cnn", 0, channels=4), _model("cnn", 1, channels=8, num_stages=4))
    assert d.pairs == [(0, 1), (1, 2), (2, 3)]


def test_statistics_gather_in_the_first_epoch_only_and_gradients_reach_student_and_connectors():
    teacher, student = digits_teacher_student()
    d = _ofd(student, teacher, connector_kernel=3, feat_weight=0.01)
    conv, bn = d.connectors[0]
    assert conv.kernel_size == (3, 3) and conv.bias is None
    assert torch.equal(bn.weight, torch.ones(8)) and torch.equal(bn.bias, torch.zeros(8))
    x, y = _batch()
    _, losses = d.forward_train(x, y, StepInfo(epoch=0, total_epochs=2, step=0, steps_per_epoch=3))
    assert set(losses) == {"loss_ce", "loss_ofd"}
    assert float(d.count_2) == 6 * 2 * 2 and float(d.count_0) == 6 * 8 * 8
    margins = d.margins()
    assert all(bool((m < 0).all()) for m in margins)
    diag = d.pop_diagnostics()
    assert float(losses["loss_ofd"].detach()) == pytest.approx(0.01 * diag["ofd_loss"], rel=1e-6)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in d.connectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert d.extra_params() == sum(p.numel() for p in d.connectors.parameters())
    d.forward_train(x, y, StepInfo(epoch=1, total_epochs=2, step=3, steps_per_epoch=3))
    assert float(d.count_2) == 6 * 2 * 2  # fixed after the first epoch
    assert all(torch.equal(a, b) for a, b in zip(margins, d.margins()))


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    full, resumed, made = two_epochs_and_resumed(_ofd, digits, tmp_path)
    assert full.status == "completed"
    assert all(set(e.losses) == {"loss_ce", "loss_ofd"} for e in full.history)
    assert all(math.isfinite(e.losses["loss_ofd"]) and e.losses["loss_ofd"] > 0 for e in full.history)
    assert full.history[1].diagnostics["margin"] < 0
    assert float(made[0].count_0) == len(digits.train) * 8 * 8  # every image of the first epoch, once
    assert_resumed_exactly(full, resumed)
    assert_same_state(made[0], made[-1])
