"""Variational information distillation: the Gaussian NLL, the regressors and variances, spatial-only pairs, and a
resumed fit that carries the learnt variances."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.nn import functional as F

from kdarena.methods import METHODS, PairInfo
from kdarena.methods.vid import VID, gaussian_nll, variance
from kdarena.zoo.models import StageShape
from helpers import (as_float as _f, assert_refuses_mlps_for_want_of_spatial_maps, assert_resumed_exactly,
                     digits_batch as _batch, digits_distiller, digits_model as _model, digits_teacher_student,
                     sin_pattern as _fixed, two_epochs_and_resumed)

_vid = functools.partial(digits_distiller, VID)


def _on_shapes(s: tuple[int, int], t: tuple[int, int], shift: float, **params) -> VID:
    """A float64 VID on one stage pair of the given (channels, size), its weights set to a fixed pattern."""
    pair = PairInfo([StageShape(s[0], s[1], s[1], True)], [StageShape(t[0], t[1], t[1], True)], 10, 1, 8)
    d = VID(_model("cnn", 0, channels=4), _model("cnn", 1, channels=4), VID.Params(**params), pair).double()
    with torch.no_grad():
        for k, conv in enumerate(m for m in d.regressors[0] if isinstance(m, torch.nn.Conv2d)):
            conv.weight.copy_(0.5 * _fixed(tuple(conv.weight.shape), float(k), 0.37))
        d.alphas[0].add_(shift * torch.linspace(-0.5, 0.5, t[0], dtype=torch.float64))
    return d


def _by_hand(d: VID, fs: torch.Tensor, ft: torch.Tensor) -> float:
    """μ from the three 1×1 convs as channel matrix products, then ½((t−μ)²/σ² + log σ²) averaged over elements."""
    w = [m.weight[:, :, 0, 0] for m in d.regressors[0] if isinstance(m, torch.nn.Conv2d)]
    h = torch.einsum("oi,bihw->bohw", w[0], fs).clamp(min=0)
    h = torch.einsum("oi,bihw->bohw", w[1], h).clamp(min=0)
    mu = torch.einsum("oi,bihw->bohw", w[2], h).detach()
    var = [math.log1p(math.exp(float(a))) + 1e-5 for a in d.alphas[0].detach()]
    terms = [0.5 * ((float(ft[b, c, i, j]) - float(mu[b, c, i, j])) ** 2 / var[c] + math.log(var[c]))
             for b in range(ft.shape[0]) for c in range(ft.shape[1]) for i in range(ft.shape[2]) for j in range(ft.shape[3])]
    return sum(terms) / len(terms)


def test_registered_with_the_reference_defaults_and_space():
    assert METHODS["vid"] is VID
    assert VID.Params().model_dump() == {"vid_weight": 1.0, "init_pred_var": 5.0}
    assert set(VID.space) == {"vid_weight", "init_pred_var"}
    assert VID.space["vid_weight"].log and VID.space["init_pred_var"].log
    assert VID.space["vid_weight"].low < 1.0 < VID.space["vid_weight"].high
    assert VID.space["init_pred_var"].low < 5.0 < VID.space["init_pred_var"].high
    assert "VID.py" in VID.reference


def test_variances_start_at_init_pred_var():
    d = _vid(_model("cnn", 1, channels=4), _model("cnn", 0, channels=8), init_pred_var=2.5)
    assert [a.numel() for a in d.alphas] == [8, 16, 32]  # one per teacher channel
    for a in d.alphas:
        assert torch.allclose(variance(a), torch.full_like(a, 2.5), rtol=1e-6)


def test_loss_equals_the_gaussian_nll_and_the_reference_code():
    # the student's 4×4 map is average-pooled to the teacher's 2×2 before the regressor
    d = _on_shapes((3, 4), (5, 2), shift=1.0)
    s, t = _fixed((2, 3, 4, 4), 0.0), _fixed((2, 5, 2, 2), 1.0, 0.31)
    assert _f(d.vid_loss([s], [t])) == pytest.approx(_by_hand(d, F.avg_pool2d(s, 2), t), rel=1e-10)
    # RepDistiller distiller_zoo/VID.py @ b84f547: VIDLoss(3, 5, 5).double(), its three conv weights set to the same
    # pattern and log_scale shifted by the same linspace, called on these float64 tensors in a scratch folder
    assert _f(d.vid_loss([s], [t])) == pytest.approx(0.8570121442633674, rel=1e-12)
    # now the teacher's map is pooled; σ²₀ = 0.8 (VIDLoss(3, 5, 5, init_pred_var=0.8))
    d2 = _on_shapes((3, 2), (5, 4), shift=0.0, init_pred_var=0.8)
    s2, t2 = _fixed((2, 3, 2, 2), 0.2), _fixed((2, 5, 4, 4), 2.0, 0.45)
    assert _f(d2.vid_loss([s2], [t2])) == pytest.approx(0.022393210467336205, rel=1e-12)
    assert _f(d2.vid_loss([s2], [t2])) == pytest.approx(_by_hand(d2, s2, F.avg_pool2d(t2, 2)), rel=1e-10)


def test_gradcheck_in_float64():
    mean = _fixed((2, 3, 2, 2), 0.1).requires_grad_()
    alpha = torch.tensor([0.3, -0.2, 1.1], dtype=torch.float64, requires_grad=True)
    target = _fixed((2, 3, 2, 2), 1.3)
    assert torch.autograd.gradcheck(lambda m, a: gaussian_nll(m, target, a), (mean, alpha))
    d = _on_shapes((3, 4), (5, 2), shift=1.0)  # through the regressor and the pooling
    s = _fixed((2, 3, 4, 4), 0.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: d.vid_loss([x], [_fixed((2, 5, 2, 2), 1.0)]), (s,))
    assert gaussian_nll(mean, target, alpha).dtype == torch.float64
    assert gaussian_nll(mean.detach().bfloat16(), target.bfloat16(), alpha.detach().float()).dtype == torch.float32


def test_regressors_and_variances_are_training_only_and_learn():
    teacher, student = digits_teacher_student(channels=16, num_stages=4)  # 4 stages against the student's 3
    d = _vid(student, teacher, vid_weight=3.0)
    assert len(d.pairs) == 3 and d.pairs[-1] == (2, 3)
    x, y = _batch()
    _, losses = d.forward_train(x, y, None)
    assert set(losses) == {"loss_ce", "loss_vid"}
    diag = d.pop_diagnostics()
    assert float(losses["loss_vid"].detach()) == pytest.approx(3.0 * diag["vid_nll"], rel=1e-5)
    assert diag["vid_variance"] == pytest.approx(5.0, rel=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    extra = [*d.regressors.parameters(), *d.alphas.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra)
    assert d.extra_params() == sum(p.numel() for p in extra)
    assert {id(p) for p in extra} <= {id(p) for p in d.student_optimizer_parameters()}
    assert {f"alphas.{i}" for i in range(3)} <= set(d.state_dict())  # checkpointed, unlike mdistiller's list


def test_check_pair_refuses_pairs_without_spatial_maps():
    assert_refuses_mlps_for_want_of_spatial_maps(VID, "MLP")


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    full, resumed, _ = two_epochs_and_resumed(_vid, digits, tmp_path)
    assert full.status == "completed" and len(full.history) == 2
    assert all({"loss_ce", "loss_vid"} == set(e.losses) for e in full.history)
    assert all(math.isfinite(e.losses["loss_vid"]) for e in full.history)
    # the variances move, and the resumed run restored them: its second epoch repeats the uninterrupted one
    assert full.history[1].diagnostics["vid_variance"] != pytest.approx(5.0, rel=1e-4)
    assert_resumed_exactly(full, resumed)
