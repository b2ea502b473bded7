"""MLKD: instance-, class- and batch-level terms over the temperature set, the authors' masks and views, and a resumed fit."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from kdarena.methods import METHODS, PairInfo, StepInfo
from kdarena.methods.mlkd import MLKD, kept_fractions, mlkd_losses
from kdarena.zoo.augment import Strong
from helpers import (as_float as _f, assert_resumed_exactly, digits_distiller, digits_model as _model,
                     digits_pair as _pair, on_logit_halves, sin_pattern as _fixed, two_epochs_and_resumed)

B, C = 5, 6
Y = [0, 3, 5, 1, 3]

# Jin-Ying/Multi-Level-Logit-Distillation mdistiller/distillers/KD_ours.py @ 5ee473f, forward_train on the
# _fixed views below (float64) with TEMPERATURE 4, CE_WEIGHT 0.1, KD_WEIGHT 0.9: its four losses
REF_JY = {"loss_ce": 0.4230058501857412, "loss_kd": 17.190188880224007, "loss_cc": 0.022758651311396372,
          "loss_bc": 0.017704757158855958}
# sunshangquan/logit-standardization-KD mdistiller/distillers/MLKD.py @ f6e5aa5 with LOGIT_STAND, T 2, KD weight 9
REF_LS = {"loss_ce": 0.4230058501857412, "loss_kd": 37.09281285676737, "loss_cc": 0.3519802074718449,
          "loss_bc": 0.25742621637983876}


def _views():
    """(student weak, teacher weak, student strong, teacher strong) logits."""
    return (_fixed((B, C), 0.0, scale=3.0), _fixed((B, C), 1.0, scale=4.0), _fixed((B, C), 2.0, scale=3.0),
            _fixed((B, C), 0.5, scale=2.5))


def _on_fixed(views=None, **params) -> dict[str, torch.Tensor]:
    s_w, t_w, s_s, t_s = views or _views()
    d = on_logit_halves(MLKD, C, **params)
    step = StepInfo(0, 1, 0, 1, strong_images=torch.cat([s_s, t_s], 1))
    return d.forward_train(torch.cat([s_w, t_w], 1), torch.tensor(Y), step)[1]


# -- the paper's quantities, written out with loops --------------------------------------------------------------
def _softmax(rows, tau):
    out = []
    for row in rows:
        e = [math.exp(v / tau) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def _kd(zs, zt, tau):
    ps, pt = _softmax(zs, tau), _softmax(zt, tau)
    return tau * tau * sum(sum(b * math.log(b / a) for a, b in zip(rs, rt)) for rs, rt in zip(ps, pt)) / len(zs)


def _cc(zs, zt, tau):
    ps, pt = _softmax(zs, tau), _softmax(zt, tau)
    n, c = len(ps), len(ps[0])
    total = 0.0
    for j in range(c):
        for k in range(c):
            gs = sum(ps[i][j] * ps[i][k] for i in range(n))
            gt = sum(pt[i][j] * pt[i][k] for i in range(n))
            total += (gt - gs) ** 2
    return total / c


def _bc(zs, zt, tau):
    ps, pt = _softmax(zs, tau), _softmax(zt, tau)
    n = len(ps)
    total = 0.0
    for i in range(n):
        for j in range(n):
            gs = sum(a * b for a, b in zip(ps[i], ps[j]))
            gt = sum(a * b for a, b in zip(pt[i], pt[j]))
            total += (gt - gs) ** 2
    return total / n


def _median(values):
    v = sorted(values)
    mid = (len(v) - 1) / 2
    lo, hi = math.floor(mid), math.ceil(mid)
    return v[lo] + (v[hi] - v[lo]) * (mid - lo)


def _kept(zt):
    p = _softmax(zt, 1.0)
    conf = [max(row) for row in p]
    cls = [sum(row[k] for row in p) for k in range(len(p[0]))]
    return (sum(v <= _median(conf) for v in conf) / len(conf), sum(v <= _median(cls) for v in cls) / len(cls))


def _by_hand(T=4.0, ce=0.1, kd=0.9):
    s_w, t_w, s_s, t_s = (v.tolist() for v in _views())
    temps = [T, 3.0, 5.0, 2.0, 6.0]
    m, c = _kept(t_w)
    ce_w = -sum(math.log(_softmax([row], 1.0)[0][y]) for row, y in zip(s_w, Y)) / B
    ce_s = -sum(math.log(_softmax([row], 1.0)[0][y]) for row, y in zip(s_s, Y)) / B
    loss_kd = (m * sum(_kd(s_w, t_w, t) for t in temps) + sum(_kd(s_s, t_s, t) for t in temps[:3])
               + sum(_kd(s_w, t_w, t) for t in temps[3:]))
    return {"loss_ce": ce * (ce_w + ce_s), "loss_kd": kd * loss_kd,
            "loss_cc": kd * c * sum(_cc(s_w, t_w, t) for t in temps),
            "loss_bc": kd * m * sum(_bc(s_w, t_w, t) for t in temps)}


def test_registered_with_the_authors_cifar_defaults_space_and_strong_view():
    assert METHODS["mlkd"] is MLKD
    assert MLKD.Params().model_dump() == {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0, "logit_std": False}
    assert set(MLKD.space) == {"temperature", "kd_weight", "logit_std"}
    assert MLKD.space["logit_std"].choices == (False, True)
    assert isinstance(MLKD.strong_view, Strong)
    assert "KD_ours.py" in MLKD.reference


def test_losses_equal_the_multi_level_formula_and_the_authors_code():
    losses = _on_fixed()
    hand = _by_hand()
    assert set(losses) == set(hand)
    for name, value in hand.items():
        assert _f(losses[name]) == pytest.approx(value, rel=1e-10), name
        assert _f(losses[name]) == pytest.approx(REF_JY[name], rel=1e-10), name


def test_masks_are_the_kept_fractions_of_a_median_split():
    _, t_w, _, _ = _views()
    m, c = kept_fractions(t_w)
    assert (float(m), float(c)) == pytest.approx(_kept(t_w.tolist()))
    assert (float(m), float(c)) == pytest.approx((0.6, 0.5))  # 3 of 5 samples (the median is one), 3 of 6 classes
    # a scalar factor, not a selection: moving the masked-out samples' logits still moves the masked terms
    s_w, t_w, s_s, t_s = _views()
    p = t_w.softmax(1).max(1).values
    dropped = p > torch.quantile(p, 0.5)
    moved = s_w.clone()
    moved[dropped] += 1.5 * torch.arange(C, dtype=torch.float64)
    base = mlkd_losses((s_w, t_w), (s_s, t_s), 4.0)
    other = mlkd_losses((moved, t_w), (s_s, t_s), 4.0)
    assert float(other["bc"]) != pytest.approx(float(base["bc"]), rel=1e-3)


def test_class_and_batch_terms_see_the_weak_view_only_and_two_strong_temperatures_are_weak():
    s_w, t_w, s_s, t_s = _views()
    base = _on_fixed()
    shifted = _on_fixed((s_w, t_w, s_s * 0.3 + 1.0, t_s))
    assert _f(shifted["loss_cc"]) == _f(base["loss_cc"]) and _f(shifted["loss_bc"]) == _f(base["loss_bc"])
    # the strong view enters loss_kd through τ ∈ {T, 3, 5} only
    s, sw, ts = s_s.tolist(), (s_s * 0.3 + 1.0).tolist(), t_s.tolist()
    delta = 0.9 * sum(_kd(sw, ts, t) - _kd(s, ts, t) for t in (4.0, 3.0, 5.0))
    assert _f(shifted["loss_kd"]) - _f(base["loss_kd"]) == pytest.approx(delta, rel=1e-9)


def test_logit_std_standardises_the_instance_terms_only_as_the_authors():
    plain = _on_fixed(temperature=2.0, kd_weight=9.0)
    std = _on_fixed(temperature=2.0, kd_weight=9.0, logit_std=True)
    for name in ("loss_ce", "loss_kd", "loss_cc", "loss_bc"):
        assert _f(std[name]) == pytest.approx(REF_LS[name], rel=1e-10), name
    assert _f(std["loss_cc"]) == _f(plain["loss_cc"]) and _f(std["loss_bc"]) == _f(plain["loss_bc"])
    assert _f(std["loss_kd"]) != pytest.approx(_f(plain["loss_kd"]), rel=1e-3)


def test_losses_have_correct_float64_gradients():
    s_w, t_w, s_s, t_s = _views()
    s_w, s_s = s_w[:3, :4].clone().requires_grad_(True), s_s[:3, :4].clone().requires_grad_(True)
    t_w, t_s = t_w[:3, :4], t_s[:3, :4]

    def f(a, b):
        out = mlkd_losses((a, t_w), (b, t_s), 2.0)
        return torch.stack([out["kd"], out["cc"], out["bc"]])

    assert torch.autograd.gradcheck(f, (s_w, s_s))
    assert torch.autograd.gradcheck(lambda a, b: mlkd_losses((a, t_w), (b, t_s), 2.0, logit_std=True)["kd"], (s_w, s_s))
    assert mlkd_losses((s_w, t_w), (s_s, t_s), 2.0)["cc"].dtype == torch.float64


def test_without_the_strong_view_forward_train_says_what_is_missing():
    s_w, t_w, _, _ = _views()
    d = on_logit_halves(MLKD, C)
    with pytest.raises(ValueError, match="strong view"):
        d.forward_train(torch.cat([s_w, t_w], 1), torch.tensor(Y), None)


def test_check_pair_needs_two_classes():
    cnn, mlp = _model("cnn", 0, channels=4), _model("mlp", 0, hidden=[16])
    assert MLKD.check_pair(MLKD.Params(), _pair(mlp, cnn)) is None
    why = MLKD.check_pair(MLKD.Params(), PairInfo([], [], 1, 1, 8))
    assert "at least 2 classes" in why and "1" in why


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    full, resumed, _ = two_epochs_and_resumed(functools.partial(digits_distiller, MLKD), digits, tmp_path)
    assert full.status == "completed" and len(full.history) == 2
    assert all(set(e.losses) == {"loss_ce", "loss_kd", "loss_cc", "loss_bc"} for e in full.history)
    assert all(math.isfinite(v) and v > 0 for e in full.history for v in e.losses.values())
    assert all(0.4 <= e.diagnostics["sample_kept"] <= 0.6 for e in full.history)
    assert_resumed_exactly(full, resumed)
    assert resumed.test_acc == full.test_acc
