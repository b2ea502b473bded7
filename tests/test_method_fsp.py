"""FSP (Yim et al. 2017): the matrix, the loss, its gradients, the two-stage schedule, and the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdarena.methods import METHODS, StepInfo
from kdarena.methods.engine import fit
from kdarena.methods.fsp import FSP, fsp_matrix, stage_one_epochs
from kdarena.methods.recipe import Recipe
from kdarena.zoo.models import build_model
from helpers import (assert_cli_refuses_an_mlp_student, cli_train_summary, digits_cnn as _cnn, digits_pair as _pair,
                     with_small_train as _small)


def _fsp(student, teacher, **params) -> FSP:
    return FSP(student, teacher.eval(), FSP.Params(**params), _pair(student, teacher))


STEP = StepInfo(epoch=0, total_epochs=10, step=0, steps_per_epoch=1)


def test_fsp_matrix_equals_hand_computation():
    # two 2×2 maps with 2 channels each, one sample
    f1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]],    # channel 0
                        [[0.0, 1.0], [1.0, 0.0]]]])  # channel 1
    f2 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]],
                        [[2.0, 2.0], [2.0, 2.0]]]])
    # G[i,j] = Σ_{s,t} F1[s,t,i]·F2[s,t,j] / (h·w), h·w = 4:
    # G[0,0] = (1·1 + 2·0 + 3·0 + 4·1)/4 = 1.25   G[0,1] = (1+2+3+4)·2/4 = 5
    # G[1,0] = (0·1 + 1·0 + 1·0 + 0·1)/4 = 0      G[1,1] = (0+1+1+0)·2/4 = 1
    expected = torch.tensor([[[1.25, 5.0], [0.0, 1.0]]])
    assert torch.allclose(fsp_matrix(f1, f2), expected)
    # a 4×4 second map is average-pooled to 2×2 first: each 2×2 block of it averages to f2's entry
    big = f2.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.allclose(fsp_matrix(f1, big), expected)
    assert torch.allclose(fsp_matrix(big, f1), expected.mT)


def test_loss_is_zero_for_a_copy_of_the_teacher_and_sums_squared_entries():
    teacher = _cnn(0, 8).eval()
    twin = FSP(copy.deepcopy(teacher), teacher, FSP.Params(), _pair(teacher, teacher))  # same weights, same mode
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert float(twin.fsp_loss(twin.student.forward_stages(x).stages, teacher.forward_stages(x).stages)) == 0.0
    assert twin.extra_params() == 0  # equal channels: no adapter

    other = FSP(_cnn(1, 8), teacher, FSP.Params(pair_weights=[2.0, 0.0]), _pair(teacher, teacher))
    with torch.no_grad():
        s, t = other.student.forward_stages(x).stages, teacher.forward_stages(x).stages
        loss = other.fsp_loss(s, t)
        # summed over the 8×16 matrix entries, averaged over the batch, pair 0 weighted 2, pair 1 weighted 0
        by_hand = 2.0 * (fsp_matrix(t[0], t[1]) - fsp_matrix(s[0], s[1])).pow(2).sum() / 5
    assert torch.isfinite(loss) and float(loss) > 0
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)


def test_gradients_reach_student_and_adapters_never_teacher():
    teacher, student = _cnn(0, 16), _cnn(1, 8)
    fsp = _fsp(student, teacher, stages=1, fsp_weight=1.0)
    # 1×1 adapters 8→16, 16→32, 32→64 (no bias), outside the deployed student
    assert fsp.extra_params() == 8 * 16 + 16 * 32 + 32 * 64
    _, losses = fsp.forward_train(torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,)), STEP)
    assert set(losses) == {"loss_ce", "loss_fsp"} and all(torch.isfinite(v) for v in losses.values())
    fsp.backward(losses, STEP)
    for name, p in fsp.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for stage in fsp.student.stages:
        assert stage.convs[0].weight.grad.abs().sum() > 0
    for adapter in fsp.adapters:
        assert adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_first_stage_length_rounds_and_keeps_both_stages():
    assert stage_one_epochs(0.3, 10) == 3
    assert stage_one_epochs(0.25, 10) == 3  # rounds half up
    assert stage_one_epochs(0.05, 10) == 1  # round(0.5) would leave stage 1 empty: at least one epoch
    assert stage_one_epochs(0.2, 2) == 1
    assert stage_one_epochs(0.9, 4) == 3  # never all epochs: stage 2 always runs
    assert stage_one_epochs(0.2, 1) == 0  # a one-epoch run has room for CE only


def test_two_stage_runs_fsp_alone_then_ce_alone(digits):
    teacher, student = _cnn(0, 16), _cnn(1, 8)
    fsp = _fsp(student, teacher, stages=2, init_epochs=0.5, fsp_weight=0.01)
    result = fit(fsp, _small(digits), Recipe(epochs=4, batch_size=64), device=torch.device("cpu"), evaluate_test=False)
    assert result.status == "completed"
    assert [e.diagnostics["stage"] for e in result.history] == [1, 1, 2, 2]
    assert [set(e.losses) for e in result.history] == [{"loss_fsp"}] * 2 + [{"loss_ce"}] * 2
    assert [("fsp_loss" in e.diagnostics) for e in result.history] == [True, True, False, False]
    # stage 1 moves the student's flow towards the teacher's
    assert result.history[1].diagnostics["fsp_loss"] < result.history[0].diagnostics["fsp_loss"]

    one = _fsp(_cnn(1, 8), teacher, stages=1, fsp_weight=0.01)
    result = fit(one, _small(digits), Recipe(epochs=2, batch_size=64), device=torch.device("cpu"), evaluate_test=False)
    assert [e.diagnostics["stage"] for e in result.history] == [1, 1]
    assert all(set(e.losses) == {"loss_ce", "loss_fsp"} for e in result.history)


def test_check_pair_refuses_mlp_and_wrong_pair_weights():
    cnn, mlp = _cnn(0, 8), build_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=[32, 32])
    assert "spatial feature maps" in FSP.check_pair(FSP.Params(), _pair(mlp, cnn))
    assert "spatial feature maps" in FSP.check_pair(FSP.Params(), _pair(cnn, mlp))
    assert "pair_weights" in FSP.check_pair(FSP.Params(pair_weights=[1.0]), _pair(cnn, cnn))
    one_stage = build_model("cnn", num_classes=10, in_channels=1, input_size=8, num_stages=1)
    assert "at least 2" in FSP.check_pair(FSP.Params(), _pair(one_stage, one_stage))
    assert FSP.check_pair(FSP.Params(), _pair(cnn, cnn)) is None
    assert METHODS["fsp"] is FSP


def test_cli_trains_fsp_and_records_diagnostics(cache_env, tmp_path):
    assert_cli_refuses_an_mlp_student("fsp")
    summary = cli_train_summary("method.name=fsp", "teacher.recipe.epochs=2", "train.epochs=2")
    assert summary["status"] == "completed" and summary["method"] == "fsp"
    assert summary["extra_params"] == 8 * 32 + 16 * 64 + 32 * 128  # default pair: 8/16/32 → 32/64/128 channels
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "diag_stage")] == [1, 2]
    assert "diag_fsp_loss" in run.data.metrics and run.data.metrics["extra_params"] > 0


def test_fsp_stage_at_chance_by_design_is_not_divergence(digits):
    """Stage 1 trains no classifier, so val_acc sits at chance; chance_patience judges only from stage 2."""
    teacher, student = _cnn(1, 16), _cnn(0)
    fsp = _fsp(student, teacher, stages=2, init_epochs=0.5)
    assert fsp.classifier_free_epochs(4) == 2
    result = fit(fsp, digits, Recipe(epochs=4, chance_patience=1), device=torch.device("cpu"), evaluate_test=False)
    assert result.status == "completed", result.reason
    assert result.history[0].val_acc < 0.2 and result.history[-1].val_acc > 0.5  # at chance, then learning
