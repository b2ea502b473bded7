from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from kdarena.methods import METHODS
from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import fit, lr_factor
from kdarena.methods.kd import KD, kd_loss
from kdarena.methods.recipe import Recipe

from helpers import assert_same_state, digits_cnn, digits_pair as _pair


def _teacher(digits):
    teacher = digits_cnn(123, channels=16)
    fit(Baseline(teacher, None, Baseline.Params(), _pair(teacher, teacher)), digits,
        Recipe(epochs=3, batch_size=64), device=torch.device("cpu"), evaluate_test=False)
    return teacher.eval()


def test_engine_learns_digits_to_90_percent(digits):
    student = digits_cnn(0)
    result = fit(Baseline(student, None, Baseline.Params(), _pair(student, student)), digits,
                 Recipe(epochs=12, batch_size=64, lr=0.05, chance_patience=1), device=torch.device("cpu"))
    assert result.status == "completed"
    assert len(result.history) == 12
    assert result.test_acc >= 0.90
    assert result.history[-1].losses["loss_ce"] < result.history[0].losses["loss_ce"]


def test_kd_with_alpha_zero_equals_baseline_step_for_step(digits):
    teacher = _teacher(digits)
    recipe = Recipe(epochs=2, batch_size=64)
    a, b = digits_cnn(5), digits_cnn(5)
    ra = fit(Baseline(a, None, Baseline.Params(), _pair(a, teacher)), digits, recipe, device=torch.device("cpu"))
    rb = fit(KD(b, teacher, KD.Params(alpha=0.0, temperature=4.0), _pair(b, teacher)), digits, recipe,
             device=torch.device("cpu"))
    assert_same_state(a, b)
    assert [e.val_acc for e in ra.history] == [e.val_acc for e in rb.history]
    assert rb.history[0].losses["loss_kd"] == 0.0


def test_kd_loss_equals_hand_computation():
    torch.manual_seed(0)
    zs, zt = torch.randn(4, 5), torch.randn(4, 5)
    tau = 3.0
    ps, pt = F.softmax(zs / tau, 1), F.softmax(zt / tau, 1)
    hand = tau**2 * float(sum((pt[b] * (pt[b].log() - ps[b].log())).sum() for b in range(4)) / 4)
    assert math.isclose(float(kd_loss(zs, zt, tau)), hand, rel_tol=1e-5)
    assert float(kd_loss(zt, zt, tau)) == pytest.approx(0.0, abs=1e-7)


def test_kd_total_loss_mixes_ce_and_soft_term(digits):
    teacher = _teacher(digits)
    student = digits_cnn(1)
    kd = KD(student, teacher, KD.Params(alpha=0.7, temperature=2.0), _pair(student, teacher))
    x = torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    logits, losses = kd.forward_train(x, y, None)
    assert float(losses["loss_ce"]) == pytest.approx(0.3 * float(F.cross_entropy(logits, y)), rel=1e-6)
    assert float(losses["loss_kd"]) == pytest.approx(0.7 * float(kd_loss(logits, teacher(x), 2.0)), rel=1e-5)


def test_resume_from_checkpoint_equals_uninterrupted_run(digits, tmp_path):
    teacher = _teacher(digits)
    recipe = Recipe(epochs=4, batch_size=64)

    def run(model, ckpt, stop_after=None):
        def on_epoch(e):
            if stop_after is not None and e.epoch + 1 == stop_after:
                raise KeyboardInterrupt
        kd = KD(model, teacher, KD.Params(), _pair(model, teacher))
        return fit(kd, digits, recipe, device=torch.device("cpu"), checkpoint_path=ckpt, on_epoch=on_epoch)

    whole = digits_cnn(9)
    full = run(whole, tmp_path / "a.pt")
    resumed_model = digits_cnn(9)
    with pytest.raises(KeyboardInterrupt):
        run(resumed_model, tmp_path / "b.pt", stop_after=2)
    fresh = digits_cnn(9)  # a new process: fresh weights, the checkpoint carries the rest
    resumed = run(fresh, tmp_path / "b.pt")
    assert [e.val_acc for e in resumed.history] == [e.val_acc for e in full.history]
    assert resumed.test_acc == full.test_acc
    assert_same_state(whole, fresh)


class _Exploding(Baseline):
    name = "exploding"

    def forward_train(self, images, labels, step):
        logits, losses = super().forward_train(images, labels, step)
        if step.epoch == 1:
            losses["loss_ce"] = losses["loss_ce"] * float("inf")
        return logits, losses


def test_non_finite_loss_ends_run_as_diverged(digits):
    student = digits_cnn(0)
    result = fit(_Exploding(student, None, Baseline.Params(), _pair(student, student)), digits,
                 Recipe(epochs=5, batch_size=64), device=torch.device("cpu"))
    assert result.status == "diverged"
    assert "loss_ce" in result.reason and "epoch 2" in result.reason
    assert len(result.history) == 1 and result.test_acc is None


class _Collapsing(Baseline):
    """Trained to answer class 0 whatever the image: finite losses, a model that learned nothing."""

    def forward_train(self, images, labels, step):
        return super().forward_train(images, torch.zeros_like(labels), step)


def test_val_acc_stuck_at_chance_ends_run_as_diverged(digits):
    student = digits_cnn(0)
    result = fit(_Collapsing(student, None, Baseline.Params(), _pair(student, student)), digits,
                 Recipe(epochs=8, batch_size=64, chance_patience=2), device=torch.device("cpu"))
    assert result.status == "diverged"
    assert "at chance" in result.reason and "2 epochs in a row" in result.reason
    assert len(result.history) <= 2 and result.test_acc is None
    # without a patience the same run goes the full budget
    student = digits_cnn(0)
    result = fit(_Collapsing(student, None, Baseline.Params(), _pair(student, student)), digits,
                 Recipe(epochs=3, batch_size=64), device=torch.device("cpu"))
    assert result.status == "completed" and result.history[-1].val_acc < 0.15


def test_schedules_warm_up_then_decay():
    r = Recipe(epochs=10, warmup_epochs=2, schedule="cosine")
    assert lr_factor(r, 0, 10) == pytest.approx(1 / 20)
    assert lr_factor(r, 19, 10) == pytest.approx(1.0)
    assert lr_factor(r, 99, 10) < 0.01
    s = Recipe(epochs=10, schedule="step", milestones=[0.5, 0.8], gamma=0.1)
    assert [lr_factor(s, e * 10, 10) for e in (0, 5, 8)] == pytest.approx([1.0, 0.1, 0.01])


def test_adamw_recipe_trains(digits):
    student = digits_cnn(0)
    result = fit(Baseline(student, None, Baseline.Params(), _pair(student, student)), digits,
                 Recipe(epochs=3, optimizer="adamw", lr=3e-3, weight_decay=1e-4), device=torch.device("cpu"))
    assert result.history[-1].val_acc > 0.5


def test_registry_holds_baseline_and_kd():
    assert {"baseline", "kd"} <= set(METHODS)
