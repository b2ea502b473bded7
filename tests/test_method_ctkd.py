"""CTKD: the learnable global temperature, its reversed gradient, the cosine λ curriculum, and a resumed fit."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from kdarena.methods import METHODS, StepInfo
from kdarena.methods.ctkd import CTKD, curriculum_lambda
from kdarena.methods.kd import kd_loss
from helpers import (Y, ZS, ZT, as_float as _f, assert_resumed_exactly, assert_serves_any_pair_with_logits,
                     digits_distiller, digits_model as _model, f64 as _t, kd_by_hand as _kd_by_hand, on_logit_halves,
                     two_epochs_and_resumed)

# zhengli97/CTKD @ 7d52522 on ZS, ZT in float64: Global_T (models/temp_global.py) with the loop's
# temp = 1 + 20·sigmoid(global_T), the curriculum value of epoch 5 (train_student.py CosineDecay(0, -1, 10): -0.5),
# DistillKL (distiller_zoo/KD.py) weighted 0.9 (-a); then backward: global_T's gradient
REF_T0 = 15.621171572600097
REF_KD_09 = 0.5830202825334361
REF_THETA_GRAD_EPOCH5 = -0.0031618553589107526
# CosineDecay(max_value=0, min_value=-1, num_loops=10).get_value(e) for e = 1..12 (the authors pass these as λ)
REF_DECAY = [-0.02447174185242318, -0.09549150281252627, -0.20610737385376343, -0.3454915028125263, -0.5,
             -0.6545084971874737, -0.7938926261462365, -0.9045084971874737, -0.9755282581475768, -1.0, -1.0, -1.0]


def _at(epoch: int, total: int = 240) -> StepInfo:
    return StepInfo(epoch=epoch, total_epochs=total, step=0, steps_per_epoch=1)


def _fixed(**params) -> CTKD:
    return on_logit_halves(CTKD, **params).double()


def test_registered_with_the_authors_cifar_defaults_and_space():
    assert METHODS["ctkd"] is CTKD
    assert CTKD.Params().model_dump() == {"ce_weight": 0.1, "kd_weight": 0.9, "lambda_max": 1.0, "curriculum": 10 / 240,
                                          "t_min": 1.0, "t_span": 20.0}
    assert {"lambda_max", "kd_weight"} <= set(CTKD.space)
    assert "CTKD" in CTKD.reference and "temp_global.py" in CTKD.reference


def test_loss_is_weighted_ce_plus_tau_squared_kl_at_the_learned_temperature():
    d = _fixed()
    x, y = torch.cat([_t(ZS), _t(ZT)], 1), torch.tensor(Y)
    _, losses = d.forward_train(x, y, _at(4))
    T = 1.0 + 20.0 / (1.0 + math.exp(-1.0))
    assert T == pytest.approx(REF_T0, rel=1e-12)
    assert d.pop_diagnostics()["temperature"] == pytest.approx(T, rel=1e-12)
    assert _f(losses["loss_kd"]) == pytest.approx(0.9 * _kd_by_hand(ZS, ZT, T), rel=1e-12)
    assert _f(losses["loss_kd"]) == pytest.approx(REF_KD_09, rel=1e-12)
    assert _f(losses["loss_ce"]) == pytest.approx(0.1 * float(F.cross_entropy(_t(ZS), y)), rel=1e-12)


def test_temperature_gets_the_reversed_gradient_and_the_student_the_plain_one():
    d = _fixed()
    zs = _t(ZS).requires_grad_(True)
    x = torch.cat([zs, _t(ZT)], 1)
    _, losses = d.forward_train(x, torch.tensor(Y), _at(4))  # epoch 5 of 240: λ = ½
    assert d.pop_diagnostics()["lambda"] == pytest.approx(0.5)
    losses["loss_kd"].backward()
    assert float(d.temperature.theta.grad) == pytest.approx(REF_THETA_GRAD_EPOCH5, rel=1e-10)

    # the same loss through a plain (unreversed) temperature: θ's gradient is −λ times it
    theta = torch.full((), 1.0, dtype=torch.float64, requires_grad=True)
    zs2 = _t(ZS).requires_grad_(True)
    plain = 0.9 * kd_loss(zs2, _t(ZT), 1.0 + 20.0 * torch.sigmoid(theta))
    plain.backward()
    assert float(d.temperature.theta.grad) == pytest.approx(-0.5 * float(theta.grad), rel=1e-12)
    assert float(theta.grad) > 0  # L rises with T here, so the reversed step raises T: the task gets harder
    assert torch.allclose(zs.grad, zs2.grad, rtol=1e-12)


def test_lambda_rises_on_a_cosine_to_its_maximum_over_the_curriculum():
    # the authors' λ is minus their CosineDecay value, epoch by epoch (1-based), over 10 of 240 epochs
    ours = [curriculum_lambda(1.0, 10 / 240, _at(e)) for e in range(12)]
    assert ours == pytest.approx([-v for v in REF_DECAY], rel=1e-9)
    assert ours == pytest.approx([(1 - math.cos(math.pi * min((e + 1) / 10, 1))) / 2 for e in range(12)], rel=1e-9)
    # a 24-epoch recipe: the same fraction is one epoch; λ_max scales it
    assert [curriculum_lambda(3.0, 10 / 240, _at(e, 24)) for e in range(3)] == pytest.approx([3.0, 3.0, 3.0])
    assert [curriculum_lambda(2.0, 0.5, _at(e, 4)) for e in range(4)] == pytest.approx([1.0, 2.0, 2.0, 2.0])
    assert curriculum_lambda(2.0, 0.0, _at(0)) == 2.0
    assert curriculum_lambda(2.0, 0.5, None) == 2.0


def test_loss_has_correct_float64_gradients_in_logits_and_temperature():
    torch.manual_seed(0)
    zs = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 5, dtype=torch.float64)
    T = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: kd_loss(a, zt, t), (zs, T))


def test_temperature_is_a_training_only_parameter_trained_with_the_student():
    student, teacher = _model("cnn", 1, channels=4), _model("cnn", 0, channels=8)
    d = digits_distiller(CTKD, student, teacher)
    assert d.extra_params() == 1
    assert any(p is d.temperature.theta for p in d.student_optimizer_parameters())
    assert "temperature.theta" in d.state_dict()


def test_check_pair_serves_any_pair_with_logits():
    assert_serves_any_pair_with_logits(CTKD)


def test_two_epochs_on_digits_learn_the_temperature_and_resume_exactly(digits, tmp_path):
    full, resumed, _ = two_epochs_and_resumed(lambda s, t: digits_distiller(CTKD, s, t, curriculum=1.0), digits,
                                              tmp_path)
    assert full.status == "completed" and len(full.history) == 2
    assert all(set(e.losses) == {"loss_ce", "loss_kd"} for e in full.history)
    assert [e.diagnostics["lambda"] for e in full.history] == pytest.approx([0.5, 1.0])
    temps = [e.diagnostics["temperature"] for e in full.history]
    assert all(1.0 < t < 21.0 for t in temps) and temps[0] != pytest.approx(REF_T0, rel=1e-6)  # it moved
    assert_resumed_exactly(full, resumed)
    assert resumed.test_acc == full.test_acc
