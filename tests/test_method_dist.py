"""DIST: inter- and intra-class Pearson relations, the authors' added epsilon, τ², gradients, and a resumed fit."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.nn import functional as F

from kdarena.methods import METHODS
from kdarena.methods.dist import DIST, dist_terms
from helpers import (Y, ZS, ZT, as_float as _f, assert_resumed_exactly, assert_serves_any_pair_with_logits,
                     digits_distiller, f64 as _t, on_logit_halves, two_epochs_and_resumed)

# The authors' DIST(beta=1, gamma=1, tau=4) ×2 (their CIFAR kd_loss_weight) on ZS, ZT in float64
# (hunto/image_classification_sota lib/models/losses/dist_kd.py @ 6f7a70a, the same file as at d9662f7),
# and its two relations at τ = 4 (inter_class_relation, intra_class_relation, without τ²)
REF_AUTHORS_CIFAR = 21.5822378973229
REF_INTER_T4, REF_INTRA_T4 = 0.21568273379134217, 0.4587622004999985
# torchdistill's DISTLoss(beta=2, gamma=2, tau=4) on the same (mid_level.py @ 2bc1c18): its clamped epsilon
REF_TORCHDISTILL_CIFAR = 21.58223905204964
# a very confident teacher (below) against itself at τ = 1: the authors' intra relation, and torchdistill's
CONFIDENT = [[10.0, 0.0, 0.1, -0.1], [10.0, 0.1, 0.0, 0.2], [10.0, -0.2, 0.1, 0.0]]
REF_AUTHORS_SELF_INTRA, REF_TORCHDISTILL_SELF_INTRA = 0.9902410172799427, 0.0


def _pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    ca, cb = [v - ma for v in a], [v - mb for v in b]
    dot = sum(x * y for x, y in zip(ca, cb))
    return dot / (math.sqrt(sum(x * x for x in ca)) * math.sqrt(sum(y * y for y in cb)) + eps)


def _by_hand(zs, zt, tau) -> tuple[float, float]:
    """(inter, intra) from the paper: 1 − mean Pearson over samples, and over classes, of softmax(z/τ)."""
    def probs(rows):
        out = []
        for row in rows:
            e = [math.exp(v / tau) for v in row]
            out.append([v / sum(e) for v in e])
        return out

    ys, yt = probs(zs), probs(zt)
    b, c = len(ys), len(ys[0])
    inter = 1 - sum(_pearson(ys[i], yt[i]) for i in range(b)) / b
    intra = 1 - sum(_pearson([ys[i][k] for i in range(b)], [yt[i][k] for i in range(b)]) for k in range(c)) / c
    return inter, intra


def _on_fixed(zs, zt, **params) -> dict[str, torch.Tensor]:
    d = on_logit_halves(DIST, **params)
    return d.forward_train(torch.cat([_t(zs), _t(zt)], 1), torch.tensor(Y), None)[1]


def test_registered_with_the_authors_cifar_recipe_and_space():
    assert METHODS["dist"] is DIST
    assert DIST.Params().model_dump() == {"ce_weight": 1.0, "beta": 2.0, "gamma": 2.0, "tau": 4.0, "logit_std": False}
    assert set(DIST.space) == {"beta", "gamma", "tau", "logit_std"}
    assert DIST.space["logit_std"].choices == (False, True)
    assert "dist_kd.py" in DIST.reference


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_relations_equal_the_papers_pearson_definitions(tau):
    inter, intra = dist_terms(_t(ZS), _t(ZT), tau)
    hand_inter, hand_intra = _by_hand(ZS, ZT, tau)
    assert _f(inter) == pytest.approx(hand_inter, rel=1e-12)
    assert _f(intra) == pytest.approx(hand_intra, rel=1e-12)


def test_loss_is_ce_plus_tau_squared_relations_and_matches_the_authors():
    inter, intra = dist_terms(_t(ZS), _t(ZT), 4.0)
    assert _f(inter) == pytest.approx(REF_INTER_T4, rel=1e-12) and _f(intra) == pytest.approx(REF_INTRA_T4, rel=1e-12)
    losses = _on_fixed(ZS, ZT)
    assert set(losses) == {"loss_ce", "loss_inter", "loss_intra"}
    assert _f(losses["loss_inter"]) == pytest.approx(2.0 * 16.0 * REF_INTER_T4, rel=1e-12)
    assert _f(losses["loss_intra"]) == pytest.approx(2.0 * 16.0 * REF_INTRA_T4, rel=1e-12)
    assert _f(losses["loss_inter"] + losses["loss_intra"]) == pytest.approx(REF_AUTHORS_CIFAR, rel=1e-12)
    assert _f(losses["loss_ce"]) == pytest.approx(float(F.cross_entropy(_t(ZS), torch.tensor(Y))), rel=1e-12)
    weighted = _on_fixed(ZS, ZT, beta=0.5, gamma=3.0, tau=2.0, ce_weight=0.0)
    hand_inter, hand_intra = _by_hand(ZS, ZT, 2.0)
    assert _f(weighted["loss_inter"]) == pytest.approx(0.5 * 4.0 * hand_inter, rel=1e-12)
    assert _f(weighted["loss_intra"]) == pytest.approx(3.0 * 4.0 * hand_intra, rel=1e-12)
    assert _f(weighted["loss_ce"]) == 0.0


def test_epsilon_is_added_to_the_norm_product_as_the_authors_not_clamped_as_torchdistill():
    # on ordinary logits the two conventions differ in the 7th digit, and we give the authors' value
    total = _f(sum(_on_fixed(ZS, ZT).values()) - _on_fixed(ZS, ZT)["loss_ce"])
    assert total == pytest.approx(REF_AUTHORS_CIFAR, rel=1e-12)
    assert total != pytest.approx(REF_TORCHDISTILL_CIFAR, rel=1e-8)
    # a very confident teacher: each class's probability barely varies over the batch (centred norms ~1e-5),
    # so ‖a‖‖b‖ + 1e-8 shrinks every column's correlation: intra stays near 1 for a student equal to the teacher
    inter, intra = dist_terms(_t(CONFIDENT), _t(CONFIDENT), 1.0)
    assert _f(intra) == pytest.approx(REF_AUTHORS_SELF_INTRA, rel=1e-9)
    assert _f(intra) != pytest.approx(REF_TORCHDISTILL_SELF_INTRA, abs=0.5)
    assert _f(inter) == pytest.approx(0.0, abs=1e-6)
    # the hand-written formula with the added epsilon agrees
    assert _f(intra) == pytest.approx(_by_hand(CONFIDENT, CONFIDENT, 1.0)[1], rel=1e-9)


def test_logit_std_standardises_both_sides_before_tau():
    def z(row):
        m = sum(row) / len(row)
        sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))
        return [(v - m) / (1e-7 + sd) for v in row]

    losses = _on_fixed(ZS, ZT, logit_std=True, tau=2.0)
    hand_inter, hand_intra = _by_hand([z(r) for r in ZS], [z(r) for r in ZT], 2.0)
    assert _f(losses["loss_inter"]) == pytest.approx(2.0 * 4.0 * hand_inter, rel=1e-9)
    assert _f(losses["loss_intra"]) == pytest.approx(2.0 * 4.0 * hand_intra, rel=1e-9)
    # a student equal to the teacher up to a per-sample scale and shift has no relation loss to learn
    scaled = [[3.0 * v + 1.0 for v in row] for row in ZT]
    same, itself = _on_fixed(scaled, ZT, logit_std=True), _on_fixed(ZT, ZT, logit_std=True)
    for name in ("loss_inter", "loss_intra"):
        assert _f(same[name]) == pytest.approx(_f(itself[name]), abs=1e-9)
        assert _f(same[name]) == pytest.approx(0.0, abs=1e-4)  # not exactly 0: ρ(a, a) = ‖a‖²/(‖a‖² + ε)


def test_relations_have_correct_float64_gradients():
    torch.manual_seed(0)
    zs = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: torch.stack(dist_terms(a, zt, 2.0)), (zs,))
    assert dist_terms(zs, zt, 2.0)[0].dtype == torch.float64
    assert dist_terms(zs.detach().to(torch.bfloat16), zt, 2.0)[0].dtype == torch.float64  # promoted with the teacher


def test_a_batch_of_one_has_a_flat_intra_relation_not_nan():
    inter, intra = dist_terms(_t(ZS[:1]), _t(ZT[:1]), 4.0)
    assert math.isfinite(_f(inter)) and _f(intra) == pytest.approx(1.0)


def test_check_pair_serves_any_pair_with_logits():
    assert_serves_any_pair_with_logits(DIST)


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    full, resumed, _ = two_epochs_and_resumed(functools.partial(digits_distiller, DIST), digits, tmp_path)
    assert full.status == "completed" and len(full.history) == 2
    assert all(set(e.losses) == {"loss_ce", "loss_inter", "loss_intra"} for e in full.history)
    assert all(math.isfinite(v) and v >= 0 for e in full.history for v in e.losses.values())
    assert all({"inter", "intra"} <= set(e.diagnostics) for e in full.history)
    assert_resumed_exactly(full, resumed)
    assert resumed.test_acc == full.test_acc
