"""Attention transfer: the attention maps, the loss, where its gradients go, and `kdarena train`."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.nn import functional as F
from kdarena.methods import METHODS
from kdarena.methods.at import AT, at_loss, attention_map
from helpers import (as_float as _f, assert_backward_reaches_the_student_alone, cli_train, cli_train_summary,
                     digits_batch as _batch, digits_distiller, digits_model as _model, digits_pair as _pair,
                     digits_teacher_student, fit_alone_and_distilled)

_at = functools.partial(digits_distiller, AT)


def test_registered_with_the_authors_defaults_and_space():
    assert METHODS["at"] is AT
    assert AT.Params().model_dump() == {"at_weight": 1000.0, "p": 2}
    assert AT.space["p"].choices == (1, 2, 4)
    with pytest.raises(ValueError):
        AT.Params(p=3)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_attention_map_is_the_unit_normalised_channel_mean_of_abs_power(p):
    torch.manual_seed(0)
    f = torch.randn(3, 5, 4, 4)
    q = attention_map(f, p)
    assert q.shape == (3, 16)
    assert torch.allclose(q.norm(dim=1), torch.ones(3))
    hand = torch.stack([f[b].abs().pow(p).sum(0).flatten() for b in range(3)])
    assert torch.allclose(q, hand / hand.norm(dim=1, keepdim=True), atol=1e-6)
    # a sign flip or a channel permutation leaves the attention unchanged
    assert torch.allclose(attention_map(-f[:, torch.randperm(5)], p), q, atol=1e-6)


def test_larger_map_is_pooled_to_the_smaller_before_comparing():
    torch.manual_seed(0)
    small = torch.rand(2, 3, 4, 4)
    large = F.interpolate(small, scale_factor=2, mode="nearest")  # the same attention at 8×8
    assert _f(at_loss([large], [small], 2)) == pytest.approx(0.0, abs=1e-12)
    assert _f(at_loss([small], [large], 2)) == pytest.approx(0.0, abs=1e-12)
    assert _f(at_loss([small], [torch.rand(2, 7, 4, 4)], 2)) > 0


def test_loss_is_zero_for_a_copy_of_the_teacher_and_positive_otherwise():
    teacher = _model("cnn", 0, channels=8)
    x, y = _batch()
    same = _at(copy.deepcopy(teacher), teacher)
    same.eval()  # both in eval: identical BN statistics, identical features
    _, losses = same.forward_train(x, y, None)
    assert _f(losses["loss_at"]) == 0.0
    other = _at(_model("cnn", 3, channels=8), teacher)
    other.eval()
    assert _f(other.forward_train(x, y, None)[1]["loss_at"]) > 0


def test_total_is_ce_plus_half_beta_at_with_gradients_to_the_student_only():
    teacher, student = digits_teacher_student(channels=16, num_stages=4)  # 4 spatial stages against the student's 3
    d = _at(student, teacher, at_weight=300.0, p=4)
    assert len(d.pairs) == 3 and d.pairs[0] == (0, 0) and d.pairs[-1] == (2, 3)
    x, y = _batch()
    logits, losses = d.forward_train(x, y, None)
    assert set(losses) == {"loss_ce", "loss_at"}
    # L_AT by hand from the models' own feature maps: per pair, the larger map average-pooled to the smaller's
    # H×W, Q = vec(mean_c |F|^p) / ‖·‖₂ per sample, mean over batch and positions of (Q_s − Q_t)², summed over pairs
    with torch.no_grad():
        fs, ft = student.forward_stages(x).stages, teacher.forward_stages(x).stages
        hand = 0.0
        for si, ti in d.pairs:
            a, b = fs[si], ft[ti]
            size = min(a.shape[-2:], b.shape[-2:], key=lambda hw: hw[0] * hw[1])
            a, b = F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)
            qa, qb = (m.abs().pow(4).mean(dim=1).reshape(len(m), -1) for m in (a, b))
            qa, qb = qa / qa.norm(dim=1, keepdim=True), qb / qb.norm(dim=1, keepdim=True)
            hand += float(((qa - qb) ** 2).sum() / qa.numel())
    assert hand > 0
    assert _f(losses["loss_at"]) == pytest.approx(300.0 / 2 * hand, rel=1e-5)
    assert d.pop_diagnostics()["at_loss"] == pytest.approx(hand, rel=1e-5)  # the diagnostic is the unweighted L_AT
    assert _f(losses["loss_ce"]) == pytest.approx(_f(F.cross_entropy(logits, y)), rel=1e-6)

    assert_backward_reaches_the_student_alone(d, losses)


def test_at_weight_zero_is_the_student_trained_alone(digits):
    teacher = _model("cnn", 0, channels=16)
    _, result = fit_alone_and_distilled(lambda student: _at(student, teacher, at_weight=0.0), digits, 128)
    assert result.history[0].losses["loss_at"] == 0.0 and result.history[0].diagnostics["at_loss"] > 0


def test_check_pair_refuses_pairs_without_spatial_maps():
    cnn, mlp = _model("cnn", 0, channels=4), _model("mlp", 0, hidden=[16, 16])
    assert AT.check_pair(AT.Params(), _pair(cnn, cnn)) is None
    why = AT.check_pair(AT.Params(), _pair(mlp, cnn))
    assert "student has no" in why and "spatial" in why and "fitnets" in why
    assert "teacher has no" in AT.check_pair(AT.Params(), _pair(cnn, mlp))


def test_train_cli_at_records_the_attention_diagnostic(migrated_store, tmp_path):
    summary = cli_train_summary("method.name=at", "teacher.recipe.epochs=2", "train.epochs=2")
    assert summary["status"] == "completed" and summary["method"] == "at"
    assert summary["extra_params"] == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "diag_at_loss")) == [1, 2]
    assert {"train_loss_ce", "train_loss_at"} <= set(run.data.metrics)
    assert float(run.data.params["method.params.at_weight"]) == 1000.0


def test_train_cli_refuses_at_on_an_mlp_student_before_any_work(cache_env, tmp_path):
    result = cli_train("method.name=at", "student.arch=mlp", "train.epochs=2")
    assert result.exit_code == 2, result.output
    assert "method 'at'" in result.stderr and "student 'mlp'" in result.stderr and "spatial" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "mlflow.db").exists() and not cache_env.exists()
