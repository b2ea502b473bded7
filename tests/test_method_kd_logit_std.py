"""Logit standardisation on KD (`kd.logit_std`): the z-score, τ² kept, gradients, the default unchanged, and a resumed fit."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from kdarena.methods import METHODS
from kdarena.methods.kd import KD, kd_loss, standardize
from kdarena.methods.space import Choice
from helpers import (Y, ZS, ZT, assert_resumed_exactly, digits_distiller, digits_model as _model, digits_pair as _pair,
                     f64 as _t, kd_by_hand as _kd_by_hand, on_logit_halves, two_epochs_and_resumed)

# the authors' kd_loss(..., logit_stand=True) (sunshangquan/logit-standardization-KD
# mdistiller/distillers/KD.py @ f6e5aa5) on ZS, ZT in float64, at T = 2 and T = 4
REF_AUTHORS_T2, REF_AUTHORS_T4 = 0.1783807762447446, 0.21149944424131709
# torchdistill's LogitStdKDLoss(temperature=2, alpha=0) (torchdistill/losses/mid_level.py @ 2bc1c18) on the same:
# α = 0 returns the bare KL, without T²
REF_TORCHDISTILL_ALPHA0_T2 = 0.04459519406118615


def _z_by_hand(row: list[float]) -> list[float]:
    m = sum(row) / len(row)
    sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))
    return [(v - m) / (1e-7 + sd) for v in row]


def _on_fixed(**params) -> dict[str, torch.Tensor]:
    d = on_logit_halves(KD, **params)
    return d.forward_train(torch.cat([_t(ZS), _t(ZT)], 1), torch.tensor(Y), None)[1]


def test_kd_gains_a_searchable_flag_that_defaults_off():
    assert METHODS["kd"] is KD
    assert KD.Params().model_dump() == {"temperature": 4.0, "alpha": 0.9, "logit_std": False}
    assert KD.space["logit_std"] == Choice((False, True))
    assert KD.Params(logit_std=True).logit_std is True


def test_standardize_is_the_per_sample_z_score_with_bessels_std():
    z = standardize(_t(ZS))
    for row, hand in zip(z.tolist(), [_z_by_hand(r) for r in ZS]):
        assert row == pytest.approx(hand, rel=1e-12)
    assert torch.allclose(z.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z.std(1), torch.ones(3, dtype=torch.float64), atol=1e-6)
    # only the shape of each row matters: any positive scale and shift of a sample gives the same z
    moved = _t(ZS) * torch.tensor([[3.0], [0.2], [11.0]], dtype=torch.float64) + torch.tensor([[5.0], [-2.0], [0.0]], dtype=torch.float64)
    assert torch.allclose(standardize(moved), z, atol=1e-6)
    assert standardize(_t(ZS).to(torch.bfloat16)).dtype == torch.float32  # lifted, never left in bf16
    assert standardize(_t(ZS)).dtype == torch.float64  # never demoted


@pytest.mark.parametrize("T", [2.0, 4.0])
def test_soft_term_is_tau_squared_kl_of_standardised_logits(T):
    hand = _kd_by_hand([_z_by_hand(r) for r in ZS], [_z_by_hand(r) for r in ZT], T)
    assert float(kd_loss(_t(ZS), _t(ZT), T, logit_std=True)) == pytest.approx(hand, rel=1e-10)
    ref = {2.0: REF_AUTHORS_T2, 4.0: REF_AUTHORS_T4}[T]
    assert float(kd_loss(_t(ZS), _t(ZT), T, logit_std=True)) == pytest.approx(ref, rel=1e-12)


def test_tau_squared_stays_without_ce_unlike_torchdistill():
    """torchdistill drops T² when its CE weight α is 0 or labels are absent; the authors and we keep it."""
    losses = _on_fixed(alpha=1.0, temperature=2.0, logit_std=True)  # our α = 1: no CE, soft term alone
    assert float(losses["loss_ce"]) == 0.0
    assert float(losses["loss_kd"]) == pytest.approx(REF_AUTHORS_T2, rel=1e-12)
    assert float(losses["loss_kd"]) == pytest.approx(4.0 * REF_TORCHDISTILL_ALPHA0_T2, rel=1e-12)


def test_off_is_kd_as_it_was():
    losses = _on_fixed(alpha=0.7, temperature=3.0)
    zs, zt, y = _t(ZS), _t(ZT), torch.tensor(Y)
    assert float(losses["loss_kd"]) == pytest.approx(0.7 * _kd_by_hand(ZS, ZT, 3.0), rel=1e-12)
    assert float(losses["loss_ce"]) == pytest.approx(0.3 * float(F.cross_entropy(zs, y)), rel=1e-12)
    assert float(losses["loss_kd"]) != pytest.approx(float(_on_fixed(alpha=0.7, temperature=3.0, logit_std=True)["loss_kd"]), rel=1e-3)
    assert float(kd_loss(zs, zt, 3.0)) == float(kd_loss(zs, zt, 3.0, logit_std=False))


def test_a_student_matching_the_teacher_up_to_scale_and_shift_has_no_soft_loss():
    zt = _t(ZT)
    zs = 0.25 * zt + 7.0
    assert float(kd_loss(zs, zt, 2.0, logit_std=True)) == pytest.approx(0.0, abs=1e-10)
    assert float(kd_loss(zs, zt, 2.0)) > 0.01


def test_standardised_soft_term_has_correct_float64_gradients():
    torch.manual_seed(0)
    zs = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: kd_loss(a, zt, 2.0, logit_std=True), (zs,))


def test_check_pair_still_serves_any_pair():
    cnn, mlp = _model("cnn", 0, channels=4), _model("mlp", 0, hidden=[16])
    assert KD.check_pair(KD.Params(logit_std=True), _pair(mlp, cnn)) is None


def test_two_epochs_with_logit_std_complete_and_resume_exactly(digits, tmp_path):
    full, resumed, _ = two_epochs_and_resumed(lambda s, t: digits_distiller(KD, s, t, logit_std=True, temperature=2.0),
                                              digits, tmp_path)
    assert full.status == "completed" and len(full.history) == 2
    assert all(set(e.losses) == {"loss_ce", "loss_kd"} and math.isfinite(e.losses["loss_kd"]) for e in full.history)
    assert_resumed_exactly(full, resumed, ("val_acc", "losses"))
    assert resumed.test_acc == full.test_acc
