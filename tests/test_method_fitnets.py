"""FitNets hints: the hint loss, where its gradients go, the two-stage schedule, and `kdarena train`."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from kdarena.methods import METHODS, StepInfo
from kdarena.methods.engine import fit
from kdarena.methods.fitnets import FitNets, hint_stage_epochs
from kdarena.methods.recipe import Recipe
from helpers import (CPU, as_float as _f, cli_train_summary, digits_batch as _batch, digits_distiller,
                     digits_model as _model, digits_pair as _pair, digits_teacher_student, fit_alone_and_distilled)

_fitnets = functools.partial(digits_distiller, FitNets)


def test_registered_with_the_papers_defaults_and_space():
    assert METHODS["fitnets"] is FitNets
    p = FitNets.Params()
    assert (p.stages, p.alpha, p.hint_weight, p.student_stage, p.teacher_stage) == (1, 0.0, 200.0, None, None)
    assert set(FitNets.space) == {"hint_weight", "hint_epochs", "temperature", "alpha", "stages"}
    with pytest.raises(ValueError):
        FitNets.Params(hint_epochs=1.0)
    with pytest.raises(ValueError):
        FitNets.Params(stages=3)


def test_hint_is_zero_when_an_identity_regressor_sees_the_teachers_own_features():
    teacher = _model("cnn", 0, channels=8)
    d = _fitnets(copy.deepcopy(teacher), teacher, regressor_kernel=3)
    conv, bn = d.regressor
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(conv.out_channels):
            conv.weight[c, c, 1, 1] = 1.0
        bn.running_var.fill_(1.0 - bn.eps)  # BN in eval: (x − 0)/sqrt(var + eps) = x
    d.eval()
    x, y = _batch()
    _, losses = d.forward_train(x, y, None)
    assert _f(losses["loss_hint"]) == pytest.approx(0.0, abs=1e-9)

    other = _fitnets(_model("cnn", 7, channels=8), teacher)
    other.regressor.load_state_dict(d.regressor.state_dict())
    other.eval()
    assert _f(other.forward_train(x, y, None)[1]["loss_hint"]) > 1e-3


def test_one_stage_loss_is_ce_kd_and_weighted_hint_with_gradients_to_student_and_regressor_only():
    teacher, student = digits_teacher_student(channels=16)
    d = _fitnets(student, teacher, alpha=0.5, temperature=2.0, hint_weight=10.0)
    x, y = _batch()
    logits, losses = d.forward_train(x, y, None)
    assert set(losses) == {"loss_ce", "loss_kd", "loss_hint"}
    assert all(math.isfinite(_f(v)) for v in losses.values())
    # L_hint by hand: ½·mean over every element of (F_t^h − r(F_s^g))², the regressor applied to the student's
    # guided stage (the same batch statistics in train mode, so the same values as inside forward_train)
    with torch.no_grad():
        guided = student.forward_stages(x).stages[d.student_stage]
        target = teacher.forward_stages(x).stages[d.teacher_stage]
        pred = d.regressor(guided)
        assert pred.shape == target.shape
        hand = 0.5 * float(((target - pred) ** 2).sum()) / target.numel()
    assert hand > 0
    assert _f(losses["loss_hint"]) == pytest.approx(10.0 * hand, rel=1e-5)
    diag = d.pop_diagnostics()
    assert diag["stage"] == 1 and diag["hint_loss"] == pytest.approx(hand, rel=1e-5)

    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.regressor.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # the regressor is training-only: counted apart, optimised with the student
    assert d.extra_params() == sum(p.numel() for p in d.regressor.parameters()) > 0
    assert {id(p) for p in d.regressor.parameters()} <= {id(p) for p in d.student_optimizer_parameters()}


def test_hint_stage_sends_no_gradient_past_the_guided_stage():
    teacher, student = digits_teacher_student(channels=16)
    d = _fitnets(student, teacher, stages=2, hint_epochs=0.2, student_stage=0)
    x, y = _batch()
    _, losses = d.forward_train(x, y, StepInfo(epoch=1, total_epochs=10, step=5, steps_per_epoch=5))
    assert set(losses) == {"loss_hint"}
    losses["loss_hint"].backward()
    guided = {id(p) for p in student.stages[0].parameters()}
    for p in student.parameters():
        assert (p.grad is not None) == (id(p) in guided)
    _, losses = d.forward_train(x, y, StepInfo(epoch=2, total_epochs=10, step=10, steps_per_epoch=5))
    assert set(losses) == {"loss_ce", "loss_kd"}


def test_hint_stage_length_rounds_half_up():
    cases = ((0.125, 4), (0.3, 2), (0.2, 2), (0.0, 10), (0.25, 10))
    assert [hint_stage_epochs(h, n) for h, n in cases] == [1, 1, 0, 0, 3]


def test_two_stage_training_runs_hints_then_kd(digits):
    teacher, student = digits_teacher_student(channels=16)
    d = _fitnets(student, teacher, stages=2, hint_epochs=0.5, alpha=0.9)  # round(0.5·3) = 2 epochs of hints
    classifier0 = student.classifier.weight.detach().clone()
    first0 = student.stages[0].convs[0].weight.detach().clone()
    snapshots = []
    result = fit(d, digits, Recipe(epochs=3, batch_size=128), device=CPU, evaluate_test=False,
                 on_epoch=lambda e: snapshots.append(student.classifier.weight.detach().clone()))
    assert result.status == "completed"
    assert [e.diagnostics["stage"] for e in result.history] == [1, 1, 2]
    assert [set(e.losses) for e in result.history] == [{"loss_hint"}, {"loss_hint"}, {"loss_ce", "loss_kd"}]
    assert all(math.isfinite(e.diagnostics["hint_loss"]) for e in result.history)
    assert result.history[1].diagnostics["hint_loss"] < result.history[0].diagnostics["hint_loss"]
    # hints train the layers up to the guided stage; the classifier waits for stage 2
    assert not torch.equal(student.stages[0].convs[0].weight, first0)
    assert torch.equal(snapshots[0], classifier0) and torch.equal(snapshots[1], classifier0)
    assert not torch.equal(snapshots[2], classifier0)


def test_hint_weight_zero_without_kd_is_the_student_trained_alone(digits):
    teacher = _model("cnn", 0, channels=16)
    fit_alone_and_distilled(lambda student: _fitnets(student, teacher, hint_weight=0.0, alpha=0.0), digits, 128)


@pytest.mark.parametrize("teacher_arch, teacher_options", [("mlp", {"hidden": [48, 48]}), ("cnn", {"channels": 8})])
def test_mlp_student_gets_a_linear_regressor(teacher_arch, teacher_options):
    teacher = _model(teacher_arch, 0, **teacher_options)
    student = _model("mlp", 1, hidden=[16, 16])
    d = _fitnets(student, teacher)
    assert isinstance(d.regressor, nn.Linear)
    x, y = _batch()
    _, losses = d.forward_train(x, y, None)
    assert math.isfinite(_f(losses["loss_hint"])) and _f(losses["loss_hint"]) > 0
    sum(losses.values()).backward()
    assert d.regressor.weight.grad is not None and all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_identity_linear_regressor_on_equal_mlp_features_gives_zero_hint():
    teacher = _model("mlp", 0, hidden=[16, 16])
    d = _fitnets(copy.deepcopy(teacher), teacher)
    with torch.no_grad():
        d.regressor.weight.copy_(torch.eye(16))
        d.regressor.bias.zero_()
    d.eval()
    x, y = _batch()
    assert _f(d.forward_train(x, y, None)[1]["loss_hint"]) == 0.0


def test_check_pair_names_a_stage_that_does_not_exist():
    pair = _pair(_model("cnn", 0, channels=4), _model("cnn", 0, channels=8))
    assert FitNets.check_pair(FitNets.Params(), pair) is None
    assert FitNets.check_pair(FitNets.Params(student_stage=-3, teacher_stage=2), pair) is None
    why = FitNets.check_pair(FitNets.Params(student_stage=3), pair)
    assert "the student has 3 stages" in why and "stage 3 does not exist" in why
    assert "the teacher has 3 stages" in FitNets.check_pair(FitNets.Params(teacher_stage=-4), pair)


def test_train_cli_two_stage_fitnets_records_stages_and_training_only_params(migrated_store, tmp_path):
    summary = cli_train_summary("method.name=fitnets", "method.params.stages=2", "method.params.hint_epochs=0.5",
                                "teacher.recipe.epochs=2", "train.epochs=2")
    assert summary["status"] == "completed" and summary["method"] == "fitnets"
    assert summary["extra_params"] > 0
    assert summary["method_params"]["stages"] == 2

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    assert run.data.metrics["extra_params"] == summary["extra_params"]
    stage = client.get_metric_history(run.info.run_id, "diag_stage")
    assert [(m.step, m.value) for m in sorted(stage, key=lambda m: m.step)] == [(1, 1.0), (2, 2.0)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "diag_hint_loss")] == [1, 2]
    assert "train_loss_hint" in run.data.metrics and "train_loss_ce" in run.data.metrics
