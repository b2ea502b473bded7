"""Activation boundaries: the margin loss and RepDistiller's convention, connectors, the init stage, and a resumed fit."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from kdarena.methods import METHODS, PairInfo, StepInfo
from kdarena.methods.ab import AB, ab_loss
from kdarena.zoo.models import StageShape
from helpers import (assert_resumed_exactly, assert_same_state, digits_batch as _batch, digits_distiller,
                     digits_model as _model, digits_pair as _pair, digits_teacher_student, sin_pattern,
                     two_epochs_and_resumed)

_ab = functools.partial(digits_distiller, AB)
_fixed = functools.partial(sin_pattern, scale=2.0)


def _by_hand(sources, targets, margin: float) -> float:
    """The paper's squared hinge per neuron, looped; RepDistiller's ÷B·3/1000 and weights 2^(l−n+1)."""
    n, batch = len(sources), sources[0].shape[0]
    total = 0.0
    for l, (s, t) in enumerate(zip(sources, targets)):
        layer = 0.0
        for sv, tv in zip(s.flatten().tolist(), t.flatten().tolist()):
            if tv > 0 and sv <= margin:
                layer += (sv - margin) ** 2
            elif tv <= 0 and sv > -margin:
                layer += (sv + margin) ** 2
        total += 2.0 ** (l - n + 1) * layer
    return total / batch * 3 / 1000


SOURCES = [_fixed((2, 3, 4, 4), 0.3), _fixed((2, 5, 2, 2), 1.1)]
TARGETS = [_fixed((2, 3, 4, 4), 2.0), _fixed((2, 5, 2, 2), -0.4)]


def test_registered_with_repdistillers_defaults_and_space():
    assert METHODS["ab"] is AB
    assert AB.Params().model_dump() == {"ab_weight": 1.0, "margin": 1.0, "stages": 2, "init_epochs": 0.125,
                                        "temperature": 4.0, "alpha": 0.0}
    assert set(AB.space) == {"ab_weight", "margin", "stages", "init_epochs", "alpha"}
    assert "AB.py" in AB.reference and "3/1000" in AB.reference


@pytest.mark.parametrize("margin, reference", [(1.0, 0.39446568505475477), (0.5, 0.24850394325143405)])
def test_loss_is_the_papers_squared_hinge_with_repdistillers_factors(margin, reference):
    loss = ab_loss(SOURCES, TARGETS, margin)
    assert float(loss) == pytest.approx(_by_hand(SOURCES, TARGETS, margin), rel=1e-12)
    # RepDistiller distiller_zoo/AB.py @ b84f547: sum(ABLoss(2, margin)(SOURCES, TARGETS)) in float64
    assert float(loss) == pytest.approx(reference, rel=1e-12)


def test_convention_per_layer_weights_batch_mean_and_three_thousandths():
    one = [ab_loss([s], [t], 1.0) for s, t in zip(SOURCES, TARGETS)]
    both = ab_loss(SOURCES, TARGETS, 1.0)
    assert float(both) == pytest.approx(0.5 * float(one[0]) + float(one[1]), rel=1e-12)  # deepest weighs 1
    doubled = [torch.cat([x, x]) for x in SOURCES], [torch.cat([x, x]) for x in TARGETS]
    assert float(ab_loss(*doubled, 1.0)) == pytest.approx(float(both), rel=1e-12)  # ÷B: a batch mean
    # a student past the margin on the teacher's side of every boundary costs nothing
    agreed = [torch.where(t > 0, 1.5, -1.5).to(torch.float64) for t in TARGETS]
    assert float(ab_loss(agreed, TARGETS, 1.0)) == 0.0
    # one neuron on the wrong side by 1 with μ=1 costs (1+1)²·3/1000/B on the deepest layer
    wrong = [a.clone() for a in agreed]
    b, c, h, w = (TARGETS[1] <= 0).nonzero()[0].tolist()
    wrong[1][b, c, h, w] = 1.0
    assert float(ab_loss(wrong, TARGETS, 1.0)) == pytest.approx(4 * 3 / 1000 / 2, rel=1e-12)


def test_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(3)
    s = [torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True),
         torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)]
    t = [torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64),
         torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)]
    assert ab_loss(s, t, 0.7).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: ab_loss([a, b], t, 0.7), tuple(s))
    assert ab_loss([x.detach().bfloat16() for x in s], [x.bfloat16() for x in t], 0.7).dtype == torch.float32


def test_check_pair_refuses_mlps_and_maps_it_cannot_connect():
    cnn, mlp = _model("cnn", 0, channels=4), _model("mlp", 0, hidden=[16])
    assert AB.check_pair(AB.Params(), _pair(cnn, _model("cnn", 1, channels=8))) is None
    why = AB.check_pair(AB.Params(), _pair(mlp, cnn))
    assert "student has none" in why and "spatial" in why
    assert "teacher has none" in AB.check_pair(AB.Params(), _pair(cnn, mlp))
    small = PairInfo([StageShape(4, 2, 2, True)], [StageShape(8, 8, 8, True)], 10, 1, 8)
    assert "half" in AB.check_pair(AB.Params(), small)


@pytest.mark.parametrize("s_hw, t_hw, kind", [(8, 4, nn.Conv2d), (4, 8, nn.ConvTranspose2d), (5, 3, nn.Conv2d),
                                              (4, 4, nn.Conv2d)])
def test_connectors_bring_the_student_map_to_the_teachers_shape(s_hw, t_hw, kind):
    pair = PairInfo([StageShape(3, s_hw, s_hw, True)], [StageShape(6, t_hw, t_hw, True)], 10, 1, 8)
    d = AB(_model("cnn", 0, channels=4), _model("cnn", 0, channels=4), AB.Params(), pair)
    conv, bn = d.connectors[0]
    assert isinstance(conv, kind) and isinstance(bn, nn.BatchNorm2d)
    assert d.connectors[0](torch.randn(2, 3, s_hw, s_hw)).shape == (2, 6, t_hw, t_hw)
    same = PairInfo([StageShape(3, 4, 4, True)], [StageShape(3, 4, 4, True)], 10, 1, 8)
    assert isinstance(AB(d.student, d.student, AB.Params(), same).connectors[0], nn.Identity)


def test_init_stage_trains_features_and_connectors_not_the_classifier():
    teacher, student = digits_teacher_student()
    d = _ab(student, teacher, ab_weight=2.0)
    x, y = _batch()
    _, losses = d.forward_train(x, y, StepInfo(epoch=0, total_epochs=8, step=0, steps_per_epoch=5))
    assert set(losses) == {"loss_ab"}
    diag = d.pop_diagnostics()
    assert diag["stage"] == 1 and 0 < diag["boundary_agreement"] < 1
    assert float(losses["loss_ab"].detach()) == pytest.approx(2.0 * diag["ab_loss"], rel=1e-6)
    losses["loss_ab"].backward()
    assert student.classifier.weight.grad is None
    assert all(p.grad is not None for n, p in student.named_parameters() if not n.startswith("classifier"))
    assert all(p.grad is not None for p in d.connectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert d.extra_params() == sum(p.numel() for p in d.connectors.parameters()) > 0

    # then CE alone (α=0): the connectors are unused, and held in eval so their BN statistics stay
    student.zero_grad(set_to_none=True)
    d.connectors.zero_grad(set_to_none=True)
    buffers = copy.deepcopy(list(d.connectors.buffers()))
    logits, losses = d.forward_train(x, y, StepInfo(epoch=1, total_epochs=8, step=5, steps_per_epoch=5))
    assert set(losses) == {"loss_ce"} and d.connectors.training
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.connectors.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, d.connectors.buffers()))
    assert d.pop_diagnostics()["stage"] == 2


def test_one_stage_variant_adds_the_weighted_loss_and_kd_to_ce():
    d = _ab(_model("cnn", 1, channels=4), _model("cnn", 0, channels=8), stages=1, ab_weight=3.0, alpha=0.5)
    x, y = _batch()
    _, losses = d.forward_train(x, y, StepInfo(epoch=0, total_epochs=8, step=0, steps_per_epoch=5))
    assert set(losses) == {"loss_ce", "loss_kd", "loss_ab"}
    assert float(losses["loss_ab"].detach()) == pytest.approx(3.0 * d.pop_diagnostics()["ab_loss"], rel=1e-6)
    assert d.classifier_free_epochs(8) == 0


def test_two_epochs_on_digits_run_both_stages_and_resume_exactly(digits, tmp_path):
    full, resumed, made = two_epochs_and_resumed(lambda s, t: _ab(s, t, init_epochs=0.5), digits, tmp_path)
    assert full.status == "completed"
    assert [set(e.losses) for e in full.history] == [{"loss_ab"}, {"loss_ce"}]
    assert [e.diagnostics["stage"] for e in full.history] == [1, 2]
    assert all(math.isfinite(e.diagnostics["ab_loss"]) for e in full.history)
    assert made[0].classifier_free_epochs(2) == 1
    assert_resumed_exactly(full, resumed)
    assert_same_state(made[0], made[-1])
