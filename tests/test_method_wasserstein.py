"""`wasserstein`: WGAN-GP critic on feature maps, adapter trained with the student."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from kdarena.methods import METHODS
from kdarena.methods.wasserstein import Wasserstein, gradient_penalty
from kdarena.cli.app import app
from helpers import (assert_logged_finite_each_epoch, assert_resumed_exactly, cli_train, cli_train_summary,
                     digits_distiller, digits_model as _model, digits_pair as _pair, fit_alone_and_distilled,
                     two_epochs_and_resumed)

_wasserstein = functools.partial(digits_distiller, Wasserstein)


def _linear_critic(shape: tuple[int, ...], norm: float) -> nn.Module:
    critic = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 1))
    with torch.no_grad():
        critic[1].weight.mul_(norm / critic[1].weight.norm())
    return critic


def test_gradient_penalty_is_zero_for_a_unit_norm_linear_critic_and_grows_off_it():
    torch.manual_seed(0)
    real, fake = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    assert float(gradient_penalty(_linear_critic((4, 3, 3), 1.0), real, fake).detach()) == pytest.approx(0.0, abs=1e-10)
    steep = _linear_critic((4, 3, 3), 3.0)
    gp = gradient_penalty(steep, real, fake)
    assert float(gp.detach()) == pytest.approx(4.0, rel=1e-5)  # (‖∇‖ − 1)² = (3 − 1)²
    gp.backward()  # the critic learns from it
    assert steep[1].weight.grad is not None and steep[1].weight.grad.abs().sum() > 0
    # a seeded generator makes the interpolation (so the value, for a non-linear critic) reproducible
    bent = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 1))
    values = [float(gradient_penalty(bent, real, fake, torch.Generator().manual_seed(3)).detach()) for _ in range(2)]
    assert values[0] == values[1]


@pytest.mark.parametrize("student_options", [{"channels": 4}, {"channels": 4, "num_stages": 2}])
def test_student_loss_is_finite_and_trains_student_and_adapter_not_teacher_or_critic(student_options):
    # num_stages=2: the student's last map is 4×4, the teacher's 2×2, so the adapter's output is pooled
    student, teacher = _model("cnn", 0, **student_options), _model("cnn", 1, channels=8)
    w = _wasserstein(student, teacher, adv_weight=1.0, kd_weight=0.5)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    logits, losses = w.forward_train(x, y, None)
    assert logits.shape == (6, 10) and set(losses) == {"loss_ce", "loss_adv", "loss_kd"}
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    losses["loss_adv"].backward()  # the critic's score alone reaches the student through the adapter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.stages.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in w.adapter.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    critic = {id(p) for p in w.critic.parameters()}
    assert set(w.aux_optimizers()) == {"critic"}
    assert {id(p) for g in w.aux_optimizers()["critic"].param_groups for p in g["params"]} == critic
    trained = {id(p) for p in w.student_optimizer_parameters()}
    assert not critic & trained
    assert {id(p) for p in [*student.parameters(), *w.adapter.parameters()]} <= trained
    assert w.extra_params() == sum(p.numel() for m in (w.adapter, w.critic) for p in m.parameters())


def test_critic_steps_change_only_the_critic_and_learn_to_tell_teacher_from_student():
    student, teacher = _model("cnn", 0, channels=4), _model("cnn", 1, channels=8)
    w = _wasserstein(student, teacher, critic_iters=5, critic_lr=1e-3)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    before = {k: v.clone() for k, v in w.state_dict().items()}
    w.aux_step(x, y, None)
    changed = {k for k, v in w.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("critic.") for k in changed)  # student and adapter BN stats too
    first = w.pop_diagnostics()
    assert set(first) == {"wasserstein", "critic_loss", "gradient_penalty"}
    assert all(math.isfinite(v) for v in first.values())
    for _ in range(10):
        w.aux_step(x, y, None)
    w.pop_diagnostics()
    w.aux_step(x, y, None)
    assert w.pop_diagnostics()["wasserstein"] > first["wasserstein"] + 1.0


def test_pairs_without_spatial_maps_or_that_stage_are_refused():
    cnn, mlp = _model("cnn", 0, channels=4), _model("mlp", 0, hidden=[16])
    why = Wasserstein.check_pair(Wasserstein.Params(), _pair(mlp, cnn))
    assert "spatial" in why and "student" in why
    assert "teacher" in Wasserstein.check_pair(Wasserstein.Params(), _pair(cnn, mlp))
    assert "stage 5 does not exist" in Wasserstein.check_pair(Wasserstein.Params(layer=5), _pair(cnn, cnn))
    assert Wasserstein.check_pair(Wasserstein.Params(layer=-2), _pair(cnn, cnn)) is None


def test_adv_weight_zero_is_the_student_trained_alone(digits):
    teacher = _model("cnn", 1, channels=8)
    # equal weights and BN statistics too: critic steps leave the student alone
    alone, distilled = fit_alone_and_distilled(lambda s: _wasserstein(s, teacher, adv_weight=0.0, critic_iters=1),
                                               digits, 64)
    assert alone.history[0].val_acc == distilled.history[0].val_acc


def test_resume_restores_critic_and_its_optimizer(digits, tmp_path):
    full, resumed, _ = two_epochs_and_resumed(lambda s, t: _wasserstein(s, t, critic_iters=1, adv_weight=0.5), digits,
                                              tmp_path, batch_size=128, seeds=(1, 9))
    assert_resumed_exactly(full, resumed, ("val_acc", "diagnostics"))
    assert resumed.test_acc == full.test_acc


def test_listed_with_its_search_space():
    assert METHODS["wasserstein"] is Wasserstein
    listed = {m["name"]: m for m in json.loads(CliRunner().invoke(app, ["methods", "--json"]).stdout)}
    space = listed["wasserstein"]["space"]
    assert space["critic_iters"]["choices"] == [1, 2, 3, 5, 10]
    assert space["adv_weight"] == {"type": "float", "low": 1e-3, "high": 1.0, "log": True}
    assert space["critic_lr"] == {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}
    assert space["gp_weight"] == {"type": "float", "low": 1.0, "high": 20.0, "log": False}
    assert listed["wasserstein"]["defaults"]["gp_weight"] == 10.0


def test_train_cli_records_the_wasserstein_estimate_per_epoch(cache_env, tmp_path):
    summary = cli_train_summary("method.name=wasserstein", "teacher.options.channels=8", "teacher.recipe.epochs=2",
                                "train.epochs=2", catch_exceptions=False)
    assert summary["status"] == "completed" and summary["method"] == "wasserstein"
    assert summary["extra_params"] > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert_logged_finite_each_epoch(client, summary["run_id"],
                                    ("diag_wasserstein", "diag_critic_loss", "diag_gradient_penalty", "train_loss_adv"))


def test_train_cli_refuses_an_mlp_student_naming_method_and_model(cache_env):
    result = cli_train("method.name=wasserstein", "student.arch=mlp")
    assert result.exit_code == 2
    assert "wasserstein" in result.stderr and "mlp" in result.stderr and "spatial" in result.stderr
    assert "Traceback" not in result.output
    assert not (cache_env / "teachers").exists()  # refused before any teacher was trained
