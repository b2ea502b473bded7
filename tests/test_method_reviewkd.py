"""Knowledge review: HCL (mdistiller's skipped level and overlapping bins), the ABF review path, warm-up, resume."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from kdarena.methods import METHODS, PairInfo, StepInfo
from kdarena.methods.reviewkd import ReviewKD, hcl, hcl_loss
from kdarena.zoo.models import StageShape
from helpers import (assert_refuses_mlps_for_want_of_spatial_maps, assert_resumed_exactly, assert_same_state,
                     digits_batch as _batch, digits_distiller, digits_model as _model, digits_teacher_student,
                     sin_pattern, two_epochs_and_resumed)

_reviewkd = functools.partial(digits_distiller, ReviewKD)
_fixed = functools.partial(sin_pattern, scale=2.0)


def _bin_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling written out: bin i spans rows floor(iH/l) .. ceil((i+1)H/l) − 1 (bins may overlap)."""
    h = x.shape[-1]
    out = torch.zeros(*x.shape[:2], size, size, dtype=x.dtype)
    for i in range(size):
        r0, r1 = (i * h) // size, -((-(i + 1) * h) // size)
        for j in range(size):
            c0, c1 = (j * h) // size, -((-(j + 1) * h) // size)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(-2, -1))
    return out


def _hcl_by_hand(s: torch.Tensor, t: torch.Tensor) -> float:
    """The paper's HCL with mdistiller's levels: (4, 2, 1) kept only below H, weights 1, ½, ¼, … normalised."""
    h = s.shape[-1]
    terms = [(1.0, float((s - t).pow(2).mean()))]
    for level in (4, 2, 1):
        if level < h:
            weight = terms[-1][0] / 2
            terms.append((weight, float((_bin_pool(s, level) - _bin_pool(t, level)).pow(2).mean())))
    return sum(w * v for w, v in terms) / sum(w for w, _ in terms)


def test_registered_with_mdistillers_defaults_and_space():
    assert METHODS["reviewkd"] is ReviewKD
    assert ReviewKD.Params().model_dump() == {"reviewkd_weight": 5.0, "warmup": 20 / 240, "student_preact": False}
    assert set(ReviewKD.space) == {"reviewkd_weight", "warmup"}
    assert "ReviewKD.py" in ReviewKD.reference


# mdistiller mdistiller/distillers/ReviewKD.py @ a08d46f: hcl_loss([s], [t]) in float64 on the tensors below
@pytest.mark.parametrize("h, reference", [(6, 2.6552555633150936), (4, 2.5862646290710773),
                                          (1, 3.6137788082655433), (7, 2.82553093175493)])
def test_hcl_skips_the_level_equal_to_h_and_pools_overlapping_bins(h, reference):
    s, t = _fixed((2, 3, h, h), 0.3), _fixed((2, 3, h, h), 2.0)
    assert float(hcl(s, t)) == pytest.approx(_hcl_by_hand(s, t), rel=1e-12)
    assert float(hcl(s, t)) == pytest.approx(reference, rel=1e-12)


def test_convention_level_equal_to_h_is_skipped_and_bins_overlap():
    s, t = _fixed((1, 2, 4, 4), 0.3), _fixed((1, 2, 4, 4), 2.0)
    with_four = (float((s - t).pow(2).mean()) + 0.5 * float((s - t).pow(2).mean())
                 + 0.25 * float((_bin_pool(s, 2) - _bin_pool(t, 2)).pow(2).mean())
                 + 0.125 * float((_bin_pool(s, 1) - _bin_pool(t, 1)).pow(2).mean())) / 1.875
    assert float(hcl(s, t)) != pytest.approx(with_four, rel=1e-6)  # not pooled 4×4 → 4×4
    x = torch.arange(36, dtype=torch.float64).reshape(1, 1, 6, 6)
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4)
    assert float(pooled[0, 0, 0, 1]) == float(x[0, 0, 0:2, 1:3].mean())  # columns 1..2: overlaps bin 0's 0..1


def test_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(3)
    s = [torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True),
         torch.randn(2, 3, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True)]
    t = [torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64), torch.randn(2, 3, 1, 1, generator=gen, dtype=torch.float64)]
    assert hcl_loss(s, t).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: hcl_loss([a, b], t), tuple(s))
    assert hcl(s[0].detach().bfloat16(), t[0].bfloat16()).dtype == torch.float32


def test_review_path_matches_mdistiller_with_the_same_weights():
    # student stages 6×6×3, 3×3×4; teacher 6×6×5, 4×4×6 (+ the pooled level of each)
    pair = PairInfo([StageShape(3, 6, 6, True), StageShape(4, 3, 3, True)],
                    [StageShape(5, 6, 6, True), StageShape(6, 4, 4, True)], 10, 1, 6)
    cnn = _model("cnn", 0, channels=4)
    d = ReviewKD(cnn, cnn, ReviewKD.Params(), pair).double()
    assert [abf.att_conv is not None for abf in d.abfs] == [True, True, False]
    with torch.no_grad():
        for k, abf in enumerate(d.abfs):
            for j, p in enumerate(abf.parameters()):
                p.copy_(0.5 * torch.sin(torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape) * 0.37 + k + 0.1 * j))
    s_levels = [_fixed((2, 3, 6, 6), 0.1), _fixed((2, 4, 3, 3), 0.5), _fixed((2, 4, 1, 1), 0.9)]
    t_levels = [_fixed((2, 5, 6, 6), 1.3), _fixed((2, 6, 4, 4), 1.7), _fixed((2, 6, 1, 1), 2.1)]
    outputs = d.review(s_levels)
    assert [tuple(o.shape) for o in outputs] == [tuple(t.shape) for t in t_levels]
    # mdistiller ReviewKD.py @ a08d46f: its ABFs with these weights, its forward_train loop, hcl_loss, float64
    assert float(hcl_loss(outputs, t_levels).detach()) == pytest.approx(4.369372595572448, rel=1e-12)


def test_warm_up_ramps_the_weight_as_mdistiller():
    teacher, student = digits_teacher_student()
    d = _reviewkd(student, teacher, reviewkd_weight=2.0, warmup=0.25)  # 2 of 8 epochs
    x, y = _batch()
    factors = []
    for epoch in range(4):
        _, losses = d.forward_train(x, y, StepInfo(epoch=epoch, total_epochs=8, step=epoch, steps_per_epoch=1))
        diag = d.pop_diagnostics()
        factors.append(diag["warmup"])
        assert float(losses["loss_reviewkd"].detach()) == pytest.approx(2.0 * diag["warmup"] * diag["hcl_loss"], rel=1e-6)
    assert factors == [0.5, 1.0, 1.0, 1.0]  # epoch 1 of mdistiller's 1-based count already has 1/warm-up
    none = _reviewkd(student, teacher, warmup=0.0)
    none.forward_train(x, y, StepInfo(epoch=0, total_epochs=8, step=0, steps_per_epoch=1))
    assert none.pop_diagnostics()["warmup"] == 1.0


def test_gradients_reach_the_student_and_every_abf_and_check_pair_refuses_mlps():
    teacher, student = digits_teacher_student()
    d = _reviewkd(student, teacher)
    x, y = _batch()
    _, losses = d.forward_train(x, y, StepInfo(epoch=5, total_epochs=8, step=5, steps_per_epoch=1))
    assert set(losses) == {"loss_ce", "loss_reviewkd"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in d.abfs.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert d.extra_params() == sum(p.numel() for p in d.abfs.parameters())
    assert_refuses_mlps_for_want_of_spatial_maps(ReviewKD)


def test_two_epochs_on_digits_complete_and_resume_exactly(digits, tmp_path):
    full, resumed, made = two_epochs_and_resumed(lambda s, t: _reviewkd(s, t, warmup=0.75), digits, tmp_path)
    assert full.status == "completed"
    assert all(set(e.losses) == {"loss_ce", "loss_reviewkd"} for e in full.history)
    assert [e.diagnostics["warmup"] for e in full.history] == [pytest.approx(1 / 1.5), 1.0]
    assert all(math.isfinite(e.losses["loss_reviewkd"]) and e.losses["loss_reviewkd"] > 0 for e in full.history)
    assert_resumed_exactly(full, resumed)
    assert_same_state(made[0], made[-1])
