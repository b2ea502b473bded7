"""Correlation congruence: RepDistiller's adjacent-residual loss (order-dependent), the paper's all-pairs kernels
(order-invariant), the embedding heads, pairs, and a resumed fit."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from kdarena.methods import METHODS
from kdarena.methods.cc import CC, cc_loss
from helpers import (MLP_PAIRS, assert_one_step_trains_the_student, assert_two_epochs_resume_exactly,
                     digits_batch as _batch, digits_distiller, digits_mlp_or_cnn, digits_pair as _pair,
                     digits_teacher_student, sin_pattern as _fixed)

_cc = functools.partial(digits_distiller, CC)


def _adjacent_by_hand(s: torch.Tensor, t: torch.Tensor) -> float:
    """Σ over neighbouring samples (i, i+1) of Σ_d |s−t|_{i,d}·|s−t|_{i+1,d}, over the B−1 neighbours."""
    b, d = s.shape
    return sum(abs(float(s[i, k] - t[i, k])) * abs(float(s[i + 1, k] - t[i + 1, k]))
               for i in range(b - 1) for k in range(d)) / (b - 1)


def _kernel_by_hand(s: torch.Tensor, t: torch.Tensor, kernel: str, gamma: float = 0.4, order: int = 2) -> float:
    """‖K_s − K_t‖_F / B² over all pairs, K the bilinear kernel or the Taylor-expanded Gaussian RBF."""
    b = s.shape[0]

    def k(z, i, j):
        x = float(z[i] @ z[j])
        if kernel == "bilinear":
            return x
        return math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * x**p for p in range(order + 1))

    return math.sqrt(sum((k(s, i, j) - k(t, i, j)) ** 2 for i in range(b) for j in range(b))) / b**2


def test_registered_with_the_reference_defaults_and_space():
    assert METHODS["cc"] is CC
    assert CC.Params().model_dump() == {"cc_weight": 0.02, "feat_dim": 128, "kernel": "adjacent", "gamma": 0.4,
                                        "order": 2}
    assert set(CC.space) == {"cc_weight"} and CC.space["cc_weight"].log
    assert CC.space["cc_weight"].low < 0.02 < CC.space["cc_weight"].high
    assert "CC.py" in CC.reference and "batch order" in CC.reference
    with pytest.raises(ValueError):
        CC.Params(kernel="rbf")


def test_adjacent_loss_equals_its_formula_and_repdistillers_value():
    s, t = _fixed((5, 4), 0.0), _fixed((5, 4), 1.0, 0.45)
    assert float(cc_loss(s, t)) == pytest.approx(_adjacent_by_hand(s, t), rel=1e-12)
    # RepDistiller distiller_zoo/CC.py @ b84f547, Correlation()(s, t) on these float64 tensors, run in a scratch folder
    assert float(cc_loss(s, t)) == pytest.approx(2.2842800789505864, rel=1e-12)


@pytest.mark.parametrize("kernel, reference", [("gaussian", 0.15483550235325394), ("bilinear", 0.4330999026087584)])
def test_all_pairs_kernels_equal_the_papers_formula_and_torchdistills_value(kernel, reference):
    s, t = _fixed((5, 4), 0.0), _fixed((5, 4), 1.0, 0.45)
    assert float(cc_loss(s, t, kernel)) == pytest.approx(_kernel_by_hand(s, t, kernel), rel=1e-12)
    # torchdistill losses/mid_level.py CCKDLoss @ 3e4373c, kernel {gamma: 0.4, max_p: 2}, reduction 'batchmean',
    # on these float64 tensors, run in a scratch folder
    assert float(cc_loss(s, t, kernel)) == pytest.approx(reference, rel=1e-12)
    assert float(cc_loss(s, t, "gaussian", gamma=0.7, order=4)) == pytest.approx(
        _kernel_by_hand(s, t, "gaussian", 0.7, 4), rel=1e-12)


def test_adjacent_depends_on_batch_order_the_all_pairs_kernels_do_not():
    s, t = _fixed((6, 4), 0.2), _fixed((6, 4), 1.4, 0.45)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    before, after = float(cc_loss(s, t)), float(cc_loss(s[perm], t[perm]))
    assert after == pytest.approx(_adjacent_by_hand(s[perm], t[perm]), rel=1e-12)
    assert abs(before - after) > 1e-3 * before  # the same samples, another order: another loss
    for kernel in ("gaussian", "bilinear"):
        assert float(cc_loss(s[perm], t[perm], kernel)) == pytest.approx(float(cc_loss(s, t, kernel)), rel=1e-12)


def test_a_batch_of_one_has_no_neighbours_and_gives_zero():
    assert float(cc_loss(_fixed((1, 4), 0.0), _fixed((1, 4), 1.0))) == 0.0


@pytest.mark.parametrize("kernel", ["adjacent", "gaussian", "bilinear"])
def test_gradcheck_in_float64(kernel):
    s = _fixed((4, 3), 0.1).requires_grad_()
    t = _fixed((4, 3), 1.3, 0.45).requires_grad_()  # the teacher's head is trained too
    assert torch.autograd.gradcheck(lambda a, b: cc_loss(a, b, kernel), (s, t))
    assert cc_loss(s, t, kernel).dtype == torch.float64
    assert cc_loss(s.detach().bfloat16(), t.detach().bfloat16(), kernel).dtype == torch.float32


def test_heads_embed_the_pooled_last_stages_and_are_training_only():
    teacher, student = digits_teacher_student()
    d = _cc(student, teacher, cc_weight=0.5, feat_dim=16)
    assert (d.embed_s.in_features, d.embed_t.in_features, d.embed_s.out_features) == (16, 32, 16)
    x, y = _batch()
    _, losses = d.forward_train(x, y, None)
    assert set(losses) == {"loss_ce", "loss_cc"}
    with torch.no_grad():
        z_s = d.embed_s(student.forward_stages(x).stages[-1].mean(dim=(2, 3)))
        z_t = d.embed_t(teacher.forward_stages(x).stages[-1].mean(dim=(2, 3)))
    hand = _adjacent_by_hand(z_s.double(), z_t.double())
    assert float(losses["loss_cc"].detach()) == pytest.approx(0.5 * hand, rel=1e-4)
    assert d.pop_diagnostics()["cc_loss"] == pytest.approx(hand, rel=1e-4)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    heads = [*d.embed_s.parameters(), *d.embed_t.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    assert d.extra_params() == sum(p.numel() for p in heads) == (16 + 1) * 16 + (32 + 1) * 16
    assert {id(p) for p in heads} <= {id(p) for p in d.student_optimizer_parameters()}
    assert not any(n.startswith("embed") for n, _ in student.named_parameters())


@pytest.mark.parametrize("student_arch, teacher_arch", MLP_PAIRS)
def test_check_pair_serves_mlps_on_their_last_hidden_layer(student_arch, teacher_arch):
    student, teacher = digits_mlp_or_cnn(student_arch, teacher_arch)
    assert CC.check_pair(CC.Params(), _pair(student, teacher)) is None
    assert_one_step_trains_the_student(_cc(student, teacher, kernel="gaussian"), "loss_cc")


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    assert_two_epochs_resume_exactly(_cc, digits, tmp_path, "loss_cc")
