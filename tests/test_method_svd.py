"""SVD distilled feature vectors (Lee, Kim, Song 2018): alignment, loss, a safe backward, clipping, stages, CLI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdarena.methods import METHODS, StepInfo
from kdarena.methods.baseline import Baseline
from kdarena.methods.engine import fit
from kdarena.methods.recipe import Recipe
from kdarena.methods.svd import SVD, GuardedSVD, align, canonical_signs, svd_loss
from kdarena.zoo.models import build_model
from helpers import (assert_cli_refuses_an_mlp_student, cli_train_summary, digits_cnn as _cnn, digits_pair as _pair,
                     with_small_train as _small)


def _svd(student, teacher, **params) -> SVD:
    return SVD(student, teacher.eval(), SVD.Params(**params), _pair(student, teacher))


def _step(epoch: int = 0) -> StepInfo:
    return StepInfo(epoch=epoch, total_epochs=10, step=0, steps_per_epoch=1)


def _batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_alignment_recovers_teacher_vectors_under_sign_flip_and_permutation():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    teacher = canonical_signs(q[:, :2].unsqueeze(0))  # 1×6×2
    for j in range(2):  # canonical: each vector's largest-magnitude entry is positive
        assert teacher[0, teacher[0, :, j].abs().argmax(), j] > 0
    assert torch.equal(canonical_signs(-teacher), teacher)
    # the student's candidates: the teacher's vectors shuffled among others, one of them sign-flipped
    candidates = torch.stack([q[:, 4], -teacher[0, :, 1], q[:, 3], teacher[0, :, 0], q[:, 5]], dim=1).unsqueeze(0)
    assert torch.allclose(align(candidates, teacher), teacher)


def test_loss_is_zero_for_a_copy_of_the_teacher_and_positive_otherwise():
    teacher = _cnn(0, 8).eval()
    x, _ = _batch()
    with torch.no_grad():
        t = teacher.forward_stages(x).stages
        twin = SVD(copy.deepcopy(teacher), teacher, SVD.Params(dfv=2), _pair(teacher, teacher))  # same mode too
        assert float(twin.distill_loss(twin.student.forward_stages(x).stages, t)) == pytest.approx(0.0, abs=1e-10)
        other = SVD(_cnn(1, 8).eval(), teacher, SVD.Params(dfv=2), _pair(teacher, teacher))
        loss = other.distill_loss(other.student.forward_stages(x).stages, t)
    assert math.isfinite(float(loss)) and float(loss) > 1e-4
    assert twin.extra_params() == 0  # equal channels: no adapter


def test_dfv_count_is_clamped_to_the_smallest_stage():
    teacher, student = _cnn(0, 32), _cnn(1, 8)  # stages 8×8, 4×4, 2×2: the last has only 4 singular vectors
    assert _svd(student, teacher, dfv=2).k == 2
    wide = _svd(student, teacher, dfv=8)
    assert wide.k == 4
    _, losses = wide.forward_train(*_batch(), _step())
    loss = losses["loss_svd"].detach()
    assert torch.isfinite(loss) and float(loss) > 0


def test_gradients_reach_student_and_adapters_never_teacher():
    teacher, student = _cnn(0, 16), _cnn(1, 8)
    svd = _svd(student, teacher)  # defaults: one stage, clipping on
    assert svd.extra_params() == 8 * 16 + 16 * 32 + 32 * 64
    _, losses = svd.forward_train(*_batch(), _step())
    assert set(losses) == {"loss_ce", "loss_svd"} and all(torch.isfinite(v) for v in losses.values())
    svd.backward(losses, _step())
    for name, p in svd.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for adapter in svd.adapters:
        assert adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_guarded_backward_is_exact_for_distinct_and_finite_for_equal_singular_values():
    def torch_svd(x):
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        return s, vh.mT

    def objective(fn, x, weights):  # depends on singular values and on vectors up to their sign
        s, v = fn(x)
        return (s ** 3).sum() + ((v[..., :3] ** 2) * weights).sum()

    torch.manual_seed(0)
    for shape in [(2, 9, 5), (2, 4, 7)]:  # tall (HW > C) and wide (HW < C) stages
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(shape[0], shape[2], 3, dtype=torch.float64)
        (ours,) = torch.autograd.grad(objective(GuardedSVD.apply, x, w), x)
        (exact,) = torch.autograd.grad(objective(torch_svd, x, w), x)
        assert torch.allclose(ours, exact, rtol=1e-5, atol=1e-6)

    # singular values 2, 2, 2, 1, 1, 0, 0, 0: the exact gradient divides by σ_i² − σ_j² = 0
    q1, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    sigma = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    x = (q1[:, :8] @ torch.diag(sigma) @ q2.T).unsqueeze(0).requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(GuardedSVD.apply, x, torch.randn(1, 8, 3, dtype=torch.float64)), x)
    assert torch.isfinite(grad).all() and grad.norm() < 100


def test_svd_loss_backward_stays_finite_on_degenerate_feature_maps():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 4))
    equal = (2 * q).T.reshape(1, 4, 4, 4).repeat(2, 1, 1, 1)  # 16×4 per sample, all four singular values 2
    constant = torch.ones(2, 8, 2, 2)  # rank 1: three repeated zero singular values
    student = [equal.clone().requires_grad_(True), constant.clone().requires_grad_(True)]
    teacher = [torch.randn(2, 4, 4, 4), torch.randn(2, 8, 2, 2)]
    loss = svd_loss(student, teacher, k=2, width=8.0)
    loss.backward()
    assert torch.isfinite(loss)
    for f in student:
        assert torch.isfinite(f.grad).all()


def test_clipping_bounds_the_distillation_gradient_per_parameter():
    teacher, student = _cnn(0, 16), _cnn(1, 8)
    svd = _svd(student, teacher, svd_weight=10.0, kernel_width=1.0, dfv=2)
    epoch = 1
    factor = 1 / (1 + math.exp(-epoch))
    _, losses = svd.forward_train(*_batch(16), _step(epoch))
    params = list(svd.student.parameters())
    g_ce = torch.autograd.grad(losses["loss_ce"], params, retain_graph=True)
    g_kd = torch.autograd.grad(losses["loss_svd"], params + list(svd.adapters.parameters()),
                               retain_graph=True, allow_unused=True)
    svd.backward(losses, _step(epoch))

    clipped = kept_whole = 0
    ratios = []
    for p, gc, gd in zip(params, g_ce, g_kd):
        if gd is None:  # the classifier: CE only
            assert torch.equal(p.grad, gc)
            continue
        distill = p.grad - gc
        bound = factor * gc.norm()
        assert distill.norm() <= bound * (1 + 1e-5) + 1e-12
        kept = min(1.0, float(bound / gd.norm()))
        ratios.append(kept)
        # same direction, only scaled down (atol: p.grad − g_ce cancels to float32 precision of g_ce)
        assert torch.allclose(distill, kept * gd, rtol=1e-4, atol=1e-6 * float(gc.abs().max()))
        clipped += kept < 1
        kept_whole += kept == 1
    assert clipped > 0  # the bound was active for some tensors, so the test is not vacuous
    for p, gd in zip(svd.adapters.parameters(), g_kd[len(params):]):
        assert torch.allclose(p.grad, gd)  # training-only adapters: the plain distillation gradient
    assert svd.pop_diagnostics()["clip_ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)


def test_zero_weight_gives_the_baseline_gradients():
    teacher = _cnn(0, 16)
    a, b = _cnn(1, 8), _cnn(1, 8)
    x, y = _batch()
    svd = _svd(a, teacher, svd_weight=0.0)
    _, losses = svd.forward_train(x, y, _step())
    svd.backward(losses, _step())
    base = Baseline(b, None, Baseline.Params(), _pair(b, b))
    _, losses = base.forward_train(x, y, _step())
    base.backward(losses, _step())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_two_stage_runs_svd_alone_then_ce_alone(digits):
    teacher = _cnn(0, 16)
    two = _svd(_cnn(1, 8), teacher, stages=2, init_epochs=0.5)
    result = fit(two, _small(digits), Recipe(epochs=2, batch_size=64), device=torch.device("cpu"), evaluate_test=False)
    assert result.status == "completed"
    assert [e.diagnostics["stage"] for e in result.history] == [1, 2]
    assert [set(e.losses) for e in result.history] == [{"loss_svd"}, {"loss_ce"}]
    assert "svd_loss" in result.history[0].diagnostics and "svd_loss" not in result.history[1].diagnostics
    assert not any("clip_ratio" in e.diagnostics for e in result.history)  # one loss at a time: nothing to clip

    one = _svd(_cnn(1, 8), teacher)
    result = fit(one, _small(digits), Recipe(epochs=1, batch_size=64), device=torch.device("cpu"), evaluate_test=False)
    (epoch,) = result.history
    assert set(epoch.losses) == {"loss_ce", "loss_svd"} and epoch.diagnostics["stage"] == 1
    assert 0 < epoch.diagnostics["clip_ratio"] <= 1


def test_check_pair_refuses_mlp_and_single_stage_networks():
    cnn, mlp = _cnn(0, 8), build_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=[32, 32])
    assert "svd needs spatial feature maps" in SVD.check_pair(SVD.Params(), _pair(mlp, cnn))
    assert "svd needs spatial feature maps" in SVD.check_pair(SVD.Params(), _pair(cnn, mlp))
    one_stage = build_model("cnn", num_classes=10, in_channels=1, input_size=8, num_stages=1)
    assert "at least 2" in SVD.check_pair(SVD.Params(), _pair(one_stage, cnn))
    assert SVD.check_pair(SVD.Params(), _pair(cnn, cnn)) is None
    assert METHODS["svd"] is SVD


def test_cli_trains_svd_and_records_diagnostics(cache_env, tmp_path):
    assert_cli_refuses_an_mlp_student("svd")
    summary = cli_train_summary("method.name=svd", "teacher.recipe.epochs=2", "train.epochs=2")
    assert summary["status"] == "completed" and summary["method"] == "svd"
    assert summary["extra_params"] == 8 * 32 + 16 * 64 + 32 * 128  # default pair: 8/16/32 → 32/64/128 channels
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    for name in ("diag_svd_loss", "diag_stage", "diag_clip_ratio"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
    assert run.data.metrics["extra_params"] > 0
