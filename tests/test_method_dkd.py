"""Decoupled KD: TCKD and NCKD from their definitions, mdistiller's masks, the warm-up, gradients, and a resumed fit."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.nn import functional as F

from kdarena.methods import METHODS, StepInfo
from kdarena.methods.dkd import DKD, dkd_terms, warmup_factor
from helpers import (Y, ZS, ZT, assert_resumed_exactly, assert_serves_any_pair_with_logits, digits_batch,
                     digits_distiller, digits_teacher_student, f64 as _t, on_logit_halves, two_epochs_and_resumed)

# mdistiller's dkd_loss (mdistiller/distillers/DKD.py @ a08d46f) on ZS, ZT, Y in float64, T = 4:
# with (alpha, beta) = (1, 0) and (0, 1), i.e. T²·TCKD and T²·NCKD
REF_TCKD, REF_NCKD = 0.13163746986062685, 0.7308678695177661
# sunshangquan/logit-standardization-KD's dkd_loss (DKD.py @ f6e5aa5), logit_stand=True, alpha 9, beta 72, T 2
REF_STD_A9_B72_T2 = 20.614107149613226

_dkd = functools.partial(digits_distiller, DKD)


def _by_hand(zs, zt, y, T) -> tuple[float, float]:
    """(T²·TCKD, T²·NCKD) from the paper's definitions, with loops over samples and classes."""
    tckd = nckd = 0.0
    for s_row, t_row, label in zip(zs, zt, y):
        def probs(row):
            e = [math.exp(v / T) for v in row]
            return [v / sum(e) for v in e]

        ps, pt = probs(s_row), probs(t_row)
        bs = [ps[label], sum(p for j, p in enumerate(ps) if j != label)]
        bt = [pt[label], sum(p for j, p in enumerate(pt) if j != label)]
        tckd += sum(b * math.log(b / a) for a, b in zip(bs, bt))
        others = [j for j in range(len(s_row)) if j != label]
        es = {j: math.exp(s_row[j] / T) for j in others}
        et = {j: math.exp(t_row[j] / T) for j in others}
        qs = {j: es[j] / sum(es.values()) for j in others}
        qt = {j: et[j] / sum(et.values()) for j in others}
        nckd += sum(qt[j] * math.log(qt[j] / qs[j]) for j in others)
    n = len(y)
    return T * T * tckd / n, T * T * nckd / n


def test_registered_with_mdistillers_cifar_defaults_and_space():
    assert METHODS["dkd"] is DKD
    assert DKD.Params().model_dump() == {"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                                         "warmup": 20 / 240, "logit_std": False}
    assert set(DKD.space) == {"alpha", "beta", "temperature", "logit_std"}
    assert DKD.space["beta"].log and DKD.space["logit_std"].choices == (False, True)
    assert "mdistiller" in DKD.reference and "DKD.py" in DKD.reference
    with pytest.raises(ValueError):
        DKD.Params(warmup=1.5)


@pytest.mark.parametrize("T", [4.0, 1.0, 2.5])
def test_terms_equal_the_papers_definitions(T):
    tckd, nckd = dkd_terms(_t(ZS), _t(ZT), torch.tensor(Y), T)
    hand_t, hand_n = _by_hand(ZS, ZT, Y, T)
    assert float(tckd) == pytest.approx(hand_t, rel=1e-12)
    assert float(nckd) == pytest.approx(hand_n, rel=1e-12)


def test_terms_equal_mdistillers_values():
    tckd, nckd = dkd_terms(_t(ZS), _t(ZT), torch.tensor(Y), 4.0)
    assert float(tckd) == pytest.approx(REF_TCKD, rel=1e-12)
    assert float(nckd) == pytest.approx(REF_NCKD, rel=1e-12)


def test_nckd_ignores_the_target_logit_and_tckd_only_the_split_of_mass():
    """mdistiller's gt mask: NCKD sees the non-target classes alone (target logit −1000 after /T)."""
    zs, zt, y = _t(ZS), _t(ZT), torch.tensor(Y)
    _, nckd = dkd_terms(zs, zt, y, 4.0)
    moved_s, moved_t = zs.clone(), zt.clone()
    moved_s[torch.arange(3), y] += torch.tensor([5.0, -7.0, 30.0], dtype=torch.float64)
    moved_t[torch.arange(3), y] -= torch.tensor([2.0, 9.0, 40.0], dtype=torch.float64)
    tckd_moved, nckd_moved = dkd_terms(moved_s, moved_t, y, 4.0)
    assert float(nckd_moved) == pytest.approx(float(nckd), rel=1e-12)
    assert float(tckd_moved) != pytest.approx(float(dkd_terms(zs, zt, y, 4.0)[0]), rel=1e-3)
    # permuting the non-target classes of student and teacher alike changes neither term
    perm_s, perm_t = zs.clone(), zt.clone()
    perm_s[0, [0, 2, 3]], perm_t[0, [0, 2, 3]] = zs[0, [3, 0, 2]], zt[0, [3, 0, 2]]
    for a, b in zip(dkd_terms(perm_s, perm_t, y, 4.0), dkd_terms(zs, zt, y, 4.0)):
        assert float(a) == pytest.approx(float(b), rel=1e-12)
    # the student equal to the teacher: both terms vanish
    assert all(float(v) == pytest.approx(0.0, abs=1e-12) for v in dkd_terms(zt, zt, y, 4.0))


def test_terms_have_correct_float64_gradients():
    torch.manual_seed(0)
    zs = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 5, dtype=torch.float64)  # the frozen teacher's logits carry no gradient
    y = torch.tensor([0, 4, 2])
    assert torch.autograd.gradcheck(lambda a: torch.stack(dkd_terms(a, zt, y, 2.0)), (zs,))
    assert dkd_terms(zs, zt, y, 2.0)[0].dtype == torch.float64


def test_warmup_factor_is_linear_over_the_fraction_of_epochs():
    def at(epoch, total):
        return StepInfo(epoch=epoch, total_epochs=total, step=0, steps_per_epoch=1)

    # mdistiller: min(epoch / 20, 1) with 1-based epochs of a 240-epoch recipe
    for e in (0, 9, 18, 19, 20, 100):
        assert warmup_factor(20 / 240, at(e, 240)) == pytest.approx(min((e + 1) / 20, 1.0), rel=1e-12)
    # 24 epochs: the same fraction is 2 epochs
    assert [warmup_factor(20 / 240, at(e, 24)) for e in range(3)] == pytest.approx([0.5, 1.0, 1.0])
    assert warmup_factor(0.0, at(0, 240)) == 1.0
    assert warmup_factor(20 / 240, None) == 1.0


def test_forward_train_weights_ce_and_the_warmed_up_terms_and_standardises_on_request():
    teacher, student = digits_teacher_student()
    x, y = digits_batch()
    d = _dkd(student, teacher, ce_weight=0.5, alpha=2.0, beta=3.0, temperature=2.0)
    d.eval()
    logits, losses = d.forward_train(x, y, StepInfo(epoch=0, total_epochs=240, step=0, steps_per_epoch=1))
    assert set(losses) == {"loss_ce", "loss_tckd", "loss_nckd"}
    tckd, nckd = dkd_terms(logits.detach(), teacher(x), y, 2.0)
    assert float(losses["loss_ce"].detach()) == pytest.approx(0.5 * float(F.cross_entropy(logits.detach(), y)), rel=1e-6)
    assert float(losses["loss_tckd"].detach()) == pytest.approx(2.0 * float(tckd) / 20, rel=1e-5)
    assert float(losses["loss_nckd"].detach()) == pytest.approx(3.0 * float(nckd) / 20, rel=1e-5)
    assert d.pop_diagnostics()["warmup_factor"] == pytest.approx(1 / 20)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert d.extra_params() == 0

    # logit_std: the same terms on z-scored logits (mean 0, unbiased std 1 per sample), T² kept
    s = _dkd(student, teacher, logit_std=True, temperature=2.0)
    s.eval()
    logits, losses = s.forward_train(x, y, None)

    def z(v):
        return (v - v.mean(1, keepdim=True)) / (1e-7 + v.std(1, keepdim=True))

    tckd, nckd = dkd_terms(z(logits.detach()), z(teacher(x)), y, 2.0)
    assert float(losses["loss_tckd"].detach()) == pytest.approx(float(tckd), rel=1e-5)
    assert float(losses["loss_nckd"].detach()) == pytest.approx(8.0 * float(nckd), rel=1e-5)


def test_logit_std_matches_the_authors_dkd():
    d = on_logit_halves(DKD, alpha=9.0, beta=72.0, temperature=2.0, logit_std=True, ce_weight=0.0)
    _, losses = d.forward_train(torch.cat([_t(ZS), _t(ZT)], 1), torch.tensor(Y), None)
    assert float((losses["loss_tckd"] + losses["loss_nckd"]).detach()) == pytest.approx(REF_STD_A9_B72_T2, rel=1e-12)


def test_check_pair_serves_any_pair_with_logits():
    assert_serves_any_pair_with_logits(DKD)


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    # W = 2 epochs: factors ½, 1
    full, resumed, _ = two_epochs_and_resumed(lambda s, t: _dkd(s, t, warmup=1.0), digits, tmp_path)
    assert full.status == "completed" and len(full.history) == 2
    assert all(set(e.losses) == {"loss_ce", "loss_tckd", "loss_nckd"} for e in full.history)
    assert all(math.isfinite(v) for e in full.history for v in e.losses.values())
    assert [e.diagnostics["warmup_factor"] for e in full.history] == [0.5, 1.0]
    assert_resumed_exactly(full, resumed)
    assert resumed.test_acc == full.test_acc
