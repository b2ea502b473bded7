"""Factor transfer: the factor loss (RepDistiller's and the paper's), paraphraser pre-training, translator, resume."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from kdarena.methods import METHODS, StepInfo
from kdarena.methods.ft import FT, ft_loss
from helpers import (assert_refuses_mlps_for_want_of_spatial_maps, assert_resumed_exactly, assert_same_state,
                     digits_batch as _batch, digits_distiller, digits_model as _model, digits_teacher_student,
                     sin_pattern, two_epochs_and_resumed)

_ft = functools.partial(digits_distiller, FT)
_fixed = functools.partial(sin_pattern, scale=2.0)


def _step(epoch: int, total: int = 8) -> StepInfo:
    return StepInfo(epoch=epoch, total_epochs=total, step=epoch * 5, steps_per_epoch=5)


def _avg_pool(x: torch.Tensor, h: int) -> torch.Tensor:
    """Mean over each (H/h)×(W/h) block, looped (the sizes here divide)."""
    k = x.shape[-1] // h
    out = torch.zeros(*x.shape[:2], h, h, dtype=x.dtype)
    for i in range(h):
        for j in range(h):
            out[:, :, i, j] = x[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(dim=(-2, -1))
    return out


def _by_hand(s: torch.Tensor, t: torch.Tensor, full: bool) -> float:
    """mean |φ(s) − φ(t)|, φ = unit-L2 per sample of mean_c X² (RepDistiller) or of X (the paper)."""
    h = min(s.shape[-1], t.shape[-1])
    s, t = _avg_pool(s, h), _avg_pool(t, h)
    diffs = []
    for b in range(s.shape[0]):
        if full:
            vs, vt = s[b].flatten(), t[b].flatten()
        else:
            vs = sum(s[b, c] ** 2 for c in range(s.shape[1])).flatten() / s.shape[1]
            vt = sum(t[b, c] ** 2 for c in range(t.shape[1])).flatten() / t.shape[1]
        diffs += (vs / vs.norm() - vt / vt.norm()).abs().tolist()
    return sum(diffs) / len(diffs)


def test_registered_with_repdistillers_defaults_and_space():
    assert METHODS["ft"] is FT
    assert FT.Params().model_dump() == {"ft_weight": 200.0, "alpha": 0.0, "temperature": 4.0, "rate": 0.5,
                                        "init_epochs": 0.125, "para_lr": 0.01, "factor": "attention"}
    assert set(FT.space) == {"ft_weight", "alpha", "rate", "init_epochs", "para_lr"}
    assert "FT.py" in FT.reference


@pytest.mark.parametrize("t_hw, reference", [(4, 0.05334566162999621), (2, 0.2334131524966008)])
def test_factor_loss_is_l1_between_normalised_factors(t_hw, reference):
    s, t = _fixed((2, 3, 4, 4), 0.3), _fixed((2, 5, t_hw, t_hw), 2.0 if t_hw == 4 else -0.4)
    loss = ft_loss(s, t)
    assert float(loss) == pytest.approx(_by_hand(s, t, full=False), rel=1e-12)
    # RepDistiller distiller_zoo/FT.py @ b84f547: FactorTransfer()(s, t) in float64 (p1=2, p2=1)
    assert float(loss) == pytest.approx(reference, rel=1e-12)


def test_full_factor_is_the_papers_whole_normalised_tensor():
    s, t = _fixed((2, 4, 4, 4), 0.3), _fixed((2, 4, 2, 2), 1.7)
    assert float(ft_loss(s, t, "full")) == pytest.approx(_by_hand(s, t, full=True), rel=1e-12)
    assert float(ft_loss(s, 3.0 * s, "full")) == pytest.approx(0.0, abs=1e-15)  # scale-free


def test_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    for factor in ("attention", "full"):
        assert ft_loss(s, t, factor).dtype == torch.float64
        assert torch.autograd.gradcheck(lambda a: ft_loss(a, t, factor), (s,))
    assert ft_loss(s.detach().bfloat16(), t.bfloat16()).dtype == torch.float32


def test_check_pair_refuses_mlps():
    assert_refuses_mlps_for_want_of_spatial_maps(FT)


def test_modules_follow_repdistillers_shapes():
    d = _ft(_model("cnn", 1, channels=4), _model("cnn", 0, channels=8))  # last stages: 16 and 32 channels, 2×2
    f_t = torch.randn(3, 32, 2, 2)
    factor, rec = d.paraphraser(f_t)
    assert factor.shape == (3, 16, 2, 2) and rec.shape == f_t.shape
    assert d.translator(torch.randn(3, 16, 2, 2)).shape == factor.shape
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.paraphraser.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.translator.modules()) == 3
    extra = sum(p.numel() for p in d.paraphraser.parameters()) + sum(p.numel() for p in d.translator.parameters())
    assert d.extra_params() == extra
    student_params = {id(p) for p in d.student_optimizer_parameters()}
    assert not student_params & {id(p) for p in d.paraphraser.parameters()}  # its own optimizer only
    assert {id(p) for p in d.translator.parameters()} <= student_params


def test_pretraining_steps_the_paraphraser_and_leaves_the_student_untouched():
    teacher, student = digits_teacher_student()
    d = _ft(student, teacher)
    assert d.classifier_free_epochs(8) == 1 and d.classifier_free_epochs(240) == 30
    x, y = _batch()
    before = copy.deepcopy(student.state_dict())
    para_before = copy.deepcopy(d.paraphraser.state_dict())
    d.aux_step(x, y, _step(0))
    assert any(not torch.equal(a, b) for a, b in zip(para_before.values(), d.paraphraser.state_dict().values()))
    logits, losses = d.forward_train(x, y, _step(0))
    assert set(losses) == {"loss_para"} and not losses["loss_para"].requires_grad
    assert logits.shape == (6, 10)
    d.backward(losses, _step(0))  # nothing to backpropagate
    assert all(p.grad is None for p in d.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before.values(), student.state_dict().values()))  # BN stats too
    diag = d.pop_diagnostics()
    assert diag["stage"] == 1 and diag["para_loss"] > 0


def test_transfer_stage_trains_student_and_translator_not_the_paraphraser():
    teacher, student = digits_teacher_student()
    d = _ft(student, teacher, ft_weight=50.0, alpha=0.5)
    x, y = _batch()
    para = copy.deepcopy(d.paraphraser.state_dict())
    d.aux_step(x, y, _step(1))
    logits, losses = d.forward_train(x, y, _step(1))
    assert set(losses) == {"loss_ce", "loss_ft", "loss_kd"}
    diag = d.pop_diagnostics()
    assert diag["stage"] == 2
    assert float(losses["loss_ft"].detach()) == pytest.approx(50.0 * diag["ft_loss"], rel=1e-6)
    d.backward(losses, _step(1))
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in d.translator.parameters())
    assert all(p.grad is None for p in d.paraphraser.parameters())
    assert all(torch.equal(a, b) for a, b in zip(para.values(), d.paraphraser.state_dict().values()))


def test_two_epochs_on_digits_pretrain_then_transfer_and_resume_exactly(digits, tmp_path):
    full, resumed, made = two_epochs_and_resumed(_ft, digits, tmp_path)
    assert full.status == "completed"
    assert [set(e.losses) for e in full.history] == [{"loss_para"}, {"loss_ce", "loss_ft"}]
    assert [e.diagnostics["stage"] for e in full.history] == [1, 2]
    assert math.isfinite(full.history[1].losses["loss_ft"]) and full.history[1].losses["loss_ft"] > 0
    assert_resumed_exactly(full, resumed)
    assert_same_state(made[0], made[-1])
    # the paraphraser's momentum came back with the checkpoint
    sa, sb = made[0].para_optimizer.state_dict()["state"], made[-1].para_optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
