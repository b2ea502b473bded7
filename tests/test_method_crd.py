"""Contrastive representation distillation: NCE against memory banks, negatives, momentum updates, exact resume."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kdarena.methods import METHODS, StepInfo
from kdarena.methods.crd import CRD, crd_objective
from helpers import (assert_resumed_exactly, assert_same_state, digits_batch as _batch, digits_model as _model,
                     digits_pair as _pair, sin_pattern as _fixed, two_epochs_and_resumed)


def _crd(student, teacher, num_train: int, **params) -> CRD:
    teacher.eval().requires_grad_(False)
    return CRD(student, teacher, CRD.Params(**params), dataclasses.replace(_pair(student, teacher), num_train=num_train))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _nce_by_hand(anchors, bank, rows, z: float, n: int, tau: float) -> float:
    """−1/B Σ_b [log h⁺/(h⁺ + K/N + ε) + Σ_k log (K/N)/(h_k + K/N + ε)], h = exp(⟨v, m⟩/τ)/Z, looped."""
    total = 0.0
    for b, anchor in enumerate(anchors):
        k = len(rows[b]) - 1
        noise = k / n
        for j, row in enumerate(rows[b]):
            h = math.exp(float(anchor @ bank[row]) / tau) / z
            total += math.log(h / (h + noise + 1e-7)) if j == 0 else math.log(noise / (h + noise + 1e-7))
    return -total / len(anchors)


N, D = 10, 4
BANK_S, BANK_T = _unit(_fixed((N, D), 0.2)), _unit(_fixed((N, D), 1.4))
INDICES, ROWS = torch.tensor([3, 7]), torch.tensor([[3, 1, 5, 8], [7, 0, 2, 9]])
E_S, E_T = _unit(_fixed((2, D), 0.5)), _unit(_fixed((2, D), 2.5))


def _tiny() -> CRD:
    d = _crd(_model("cnn", 1, channels=4), _model("cnn", 0, channels=8), N, feat_dim=D, nce_k=3).double()
    with torch.no_grad():
        d.memory_s.copy_(BANK_S)
        d.memory_t.copy_(BANK_T)
    return d


def test_registered_with_repdistillers_defaults_and_space():
    assert METHODS["crd"] is CRD and CRD.wants_indices
    assert CRD.Params().model_dump() == {"crd_weight": 0.8, "alpha": 0.0, "temperature": 4.0, "feat_dim": 128,
                                         "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5}
    assert set(CRD.space) == {"crd_weight", "alpha", "nce_t", "nce_k", "feat_dim"}
    assert "criterion.py" in CRD.reference


def test_nce_loss_against_the_banks_follows_the_paper_and_repdistiller():
    d = _tiny()
    loss = d.contrast(E_S, E_T, INDICES, ROWS)
    # Z is fixed on the first batch: mean over its B×(K+1) unnormalised scores, times N
    z_s = sum(math.exp(float(E_S[b] @ BANK_T[r]) / 0.07) for b in range(2) for r in ROWS[b]) / 8 * N
    z_t = sum(math.exp(float(E_T[b] @ BANK_S[r]) / 0.07) for b in range(2) for r in ROWS[b]) / 8 * N
    assert float(d.z[0]) == pytest.approx(z_s, rel=1e-12) and float(d.z[1]) == pytest.approx(z_t, rel=1e-12)
    want = _nce_by_hand(E_S, BANK_T, ROWS, z_s, N, 0.07) + _nce_by_hand(E_T, BANK_S, ROWS, z_t, N, 0.07)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    # RepDistiller crd/memory.py + crd/criterion.py @ b84f547, float64, the same banks, embeddings and rows:
    # ContrastMemory(4, 10, 3, 0.07, 0.5) then ContrastLoss(10) on each side
    assert float(loss) == pytest.approx(18.812093900693824, rel=1e-12)
    assert float(d.z[0]) == pytest.approx(278.8646664490593, rel=1e-12)
    assert float(d.z[1]) == pytest.approx(2057286.3908859561, rel=1e-12)
    # the batch's slots moved halfway to the new embeddings, renormalised; the others stayed
    assert torch.allclose(d.memory_s[3], _unit((0.5 * BANK_S[3] + 0.5 * E_S[0]).unsqueeze(0))[0], atol=1e-15)
    assert torch.allclose(d.memory_t[7], _unit((0.5 * BANK_T[7] + 0.5 * E_T[1]).unsqueeze(0))[0], atol=1e-15)
    assert torch.equal(d.memory_s[0], BANK_S[0])
    # a second batch keeps Z and reads the updated banks (same reference run, second call)
    loss2 = d.contrast(_unit(_fixed((2, D), -0.8)), _unit(_fixed((2, D), 3.1)), torch.tensor([1, 3]),
                       torch.tensor([[1, 4, 6, 7], [3, 2, 9, 0]]))
    assert float(loss2) == pytest.approx(24.70312471128458, rel=1e-12)
    weights = torch.arange(N * D, dtype=torch.float64).reshape(N, D)
    assert float((d.memory_s * weights).sum()) == pytest.approx(-0.6138605308992373, rel=1e-12)
    assert float((d.memory_t * weights).sum()) == pytest.approx(96.84824552796861, rel=1e-12)


def test_gradcheck_in_float64():
    e_s = E_S.clone().requires_grad_(True)
    e_t = E_T.clone().requires_grad_(True)
    f = lambda a, b: crd_objective(a, b, BANK_S, BANK_T, ROWS, 300.0, 2e6, 0.07, N)  # noqa: E731
    assert f(e_s, e_t).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (e_s, e_t))


def test_check_pair_refuses_a_pair_without_a_training_split_size_and_serves_mlps():
    cnn, mlp = _model("cnn", 0, channels=4), _model("mlp", 0, hidden=[16])
    why = CRD.check_pair(CRD.Params(), _pair(cnn, cnn))
    assert "crd without indices" in why and "num_train 0" in why
    assert CRD.check_pair(CRD.Params(), dataclasses.replace(_pair(mlp, cnn), num_train=100)) is None
    d = _crd(mlp, cnn, 100, nce_k=20)
    x, y = _batch()
    _, losses = d.forward_train(x, y, StepInfo(0, 1, 0, 1, indices=torch.arange(6)))
    assert set(losses) == {"loss_ce", "loss_crd"} and math.isfinite(float(losses["loss_crd"].detach()))
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in mlp.parameters())
    assert all(p.grad is not None for p in [*d.embed_s.parameters(), *d.embed_t.parameters()])
    assert all(p.grad is None for p in cnn.parameters())
    with pytest.raises(RuntimeError, match="indices"):
        d.forward_train(x, y, StepInfo(0, 1, 0, 1))


def test_negatives_are_other_classes_and_k_is_clamped_to_the_split():
    d = _crd(_model("cnn", 1, channels=4), _model("cnn", 0, channels=8), 50, nce_k=16384)
    assert d.nce_k == 49
    small = _crd(d.student, d.teacher, 50, nce_k=20)
    labels = torch.arange(50) % 5
    small.labels.copy_(labels)  # every label known: the "exact" rule
    torch.manual_seed(0)
    rows = small.sample_negatives(torch.tensor([0, 6]), labels[[0, 6]])
    assert rows.shape == (2, 21) and rows[:, 0].tolist() == [0, 6]
    for b, anchor in enumerate([0, 6]):
        negatives = rows[b, 1:]
        assert bool((labels[negatives] != labels[anchor]).all())  # never the anchor's class (nor the anchor)
        assert len(set(negatives.tolist())) == 20  # 40 candidates ≥ K: without replacement
    d.labels.copy_(labels)
    rows = d.sample_negatives(torch.tensor([0]), labels[[0]])  # K = 49 > 40 candidates: with replacement
    assert bool((labels[rows[0, 1:]] != 0).all()) and len(set(rows[0, 1:].tolist())) <= 40
    # labels not yet seen count as candidates; the batch's own are learnt at once
    fresh = _crd(d.student, d.teacher, 50, nce_k=20)
    fresh.sample_negatives(torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert fresh.labels[:4].tolist() == [-1, 1, 2, -1]


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    full, resumed, made = two_epochs_and_resumed(lambda s, t: _crd(s, t, len(digits.train), alpha=0.5), digits,
                                                 tmp_path)
    assert full.status == "completed"
    assert all(set(e.losses) == {"loss_ce", "loss_crd", "loss_kd"} for e in full.history)
    assert all(math.isfinite(e.losses["loss_crd"]) and e.losses["loss_crd"] > 0 for e in full.history)
    assert full.history[0].diagnostics["nce_k"] == len(digits.train) - 1
    assert torch.equal(made[0].labels, digits.train.labels.long())  # every label learnt in the first epoch
    assert_resumed_exactly(full, resumed)
    assert_same_state(made[0], made[-1])  # the banks, labels and Z included
