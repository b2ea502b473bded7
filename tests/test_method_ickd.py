"""Inter-channel correlation KD: the normalised channel-Gram loss, its embedding, gradients, spatial-only pairs, a resumed fit."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from kdarena.methods import METHODS
from kdarena.methods.ickd import ICKD, ickd_loss
from helpers import (assert_gradcheck_and_precision, assert_refuses_mlps_for_want_of_spatial_maps,
                     assert_two_epochs_resume_exactly, digits_batch as _batch, digits_distiller, digits_teacher_student,
                     sin_pattern as _fixed)

_ickd = functools.partial(digits_distiller, ICKD)


def _by_hand(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """Σ_b ‖G̃_s − G̃_t‖²_F / (C·B) with loops: G[i, j] = Σ_positions F_i·F_j, each row scaled to unit L2 norm."""
    b, c = fs.shape[:2]

    def gram(f, n):
        rows = []
        for i in range(c):
            row = [float((f[n, i] * f[n, j]).sum()) for j in range(c)]
            norm = max(math.sqrt(sum(v * v for v in row)), 1e-12)
            rows.append([v / norm for v in row])
        return rows

    total = 0.0
    for n in range(b):
        gs, gt = gram(fs, n), gram(ft, n)
        total += sum((gs[i][j] - gt[i][j]) ** 2 for i in range(c) for j in range(c))
    return total / (c * b)


def test_registered_with_the_reference_defaults_and_space():
    assert METHODS["ickd"] is ICKD
    assert ICKD.Params().model_dump() == {"ickd_weight": 2.5, "kd_weight": 0.0, "temperature": 4.0, "stages": "last"}
    assert set(ICKD.space) == {"ickd_weight"} and ICKD.space["ickd_weight"].log
    assert ICKD.space["ickd_weight"].low < 2.5 < ICKD.space["ickd_weight"].high
    assert "ICKD.py" in ICKD.reference and "C·B" in ICKD.reference


def test_loss_equals_the_formula_and_the_reference_code():
    # same channels (already embedded), different H×W: nothing is pooled, positions are summed out
    s, t = _fixed((3, 4, 4, 4), 0.0), _fixed((3, 4, 2, 2), 1.0, 0.31)
    assert float(ickd_loss([s], [t])) == pytest.approx(_by_hand(s, t), rel=1e-10)
    # ADLab-AutoDrive/ICKD Cifar100/distiller_zoo/ICKD.py @ 403b8d3, ICKDLoss(...)([s], [t])[0] with its embed_s
    # replaced by nn.Identity, on these float64 tensors, run in a scratch folder
    assert float(ickd_loss([s], [t])) == pytest.approx(0.3698292606651217, rel=1e-12)
    s2, t2 = _fixed((2, 6, 3, 3), 0.2), _fixed((2, 6, 3, 3), 2.0, 0.45)
    assert float(ickd_loss([s2], [t2])) == pytest.approx(1.9825517189941053, rel=1e-12)
    assert float(ickd_loss([s2], [t2])) == pytest.approx(_by_hand(s2, t2), rel=1e-10)
    # pairs add up
    assert float(ickd_loss([s, s2], [t, t2])) == pytest.approx(0.3698292606651217 + 1.9825517189941053, rel=1e-12)


def test_the_embedding_is_a_1x1_conv_and_batchnorm_as_the_reference():
    # ADLab-AutoDrive/ICKD @ 403b8d3: ICKDLoss(s_dim=3, feat_dim=5) in float64, training mode, its conv2d weight
    # set to _fixed((5, 3, 1, 1), 0.5, 1.3), applied to these maps, run in a scratch folder: 1.8435212963844338
    from kdarena.methods.ickd import _embedding

    embed = _embedding(3, 5).double().train()
    conv, bn = embed
    assert conv.kernel_size == (1, 1) and conv.bias is None and isinstance(bn, torch.nn.BatchNorm2d)
    with torch.no_grad():
        conv.weight.copy_(_fixed((5, 3, 1, 1), 0.5, 1.3))
    s, t = _fixed((4, 3, 4, 4), 0.3, 0.53), _fixed((4, 5, 2, 2), 1.1, 0.29)
    assert float(ickd_loss([embed(s)], [t]).detach()) == pytest.approx(1.8435212963844338, rel=1e-10)


def test_loss_is_zero_for_the_same_correlations_whatever_the_scale_or_resolution():
    t = _fixed((2, 5, 3, 3), 0.4)
    assert float(ickd_loss([3.0 * t], [t])) == pytest.approx(0.0, abs=1e-12)
    # the same map at twice the resolution (each position repeated 4×): the same normalised Gram
    up = t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert float(ickd_loss([up], [t])) == pytest.approx(0.0, abs=1e-12)
    assert float(ickd_loss([_fixed((2, 5, 3, 3), 1.9, 0.23)], [t])) > 1e-3


def test_gradcheck_in_float64():
    s = _fixed((2, 3, 4, 4), 0.1).requires_grad_()
    t = _fixed((2, 3, 2, 2), 1.3)
    assert_gradcheck_and_precision(lambda a, b: ickd_loss([a], [b]), s, t)


def test_the_last_spatial_stage_by_default_every_pair_with_all_and_the_weights():
    teacher, student = digits_teacher_student(channels=16, num_stages=4)  # 4 stages against the student's 3
    d = _ickd(student, teacher, ickd_weight=7.0)
    assert d.pairs == [(2, 3)] and len(d.embeds) == 1
    assert d.embeds[0][0].in_channels == d.pair.student_stages[2].channels
    assert d.embeds[0][0].out_channels == d.pair.teacher_stages[3].channels
    x, y = _batch()
    _, losses = d.forward_train(x, y, None)
    assert set(losses) == {"loss_ce", "loss_ickd"}
    with torch.no_grad():
        fs, ft = student.forward_stages(x).stages, teacher.forward_stages(x).stages
        hand = _by_hand(d.embeds[0](fs[2]).double(), ft[3].double())
    assert float(losses["loss_ickd"].detach()) == pytest.approx(7.0 * hand, rel=1e-4)
    assert d.pop_diagnostics()["ickd_loss"] == pytest.approx(hand, rel=1e-4)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.stages[0].convs[0].weight.grad.abs().sum() > 0
    assert d.embeds[0][0].weight.grad.abs().sum() > 0
    assert d.extra_params() == sum(p.numel() for p in d.embeds.parameters()) > 0

    every = _ickd(student, teacher, stages="all", kd_weight=1.0)
    assert len(every.pairs) == 3 and every.pairs[0] == (0, 0) and every.pairs[-1] == (2, 3)
    assert len(every.embeds) == 3
    _, losses = every.forward_train(x, y, None)
    assert set(losses) == {"loss_ce", "loss_kd", "loss_ickd"}
    assert float(losses["loss_kd"].detach()) > 0


def test_check_pair_refuses_pairs_without_spatial_maps():
    assert_refuses_mlps_for_want_of_spatial_maps(ICKD, "ickd", "MLP")


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    assert_two_epochs_resume_exactly(_ickd, digits, tmp_path, "loss_ickd")
