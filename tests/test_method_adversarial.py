"""`adversarial`: a logit discriminator trained against the student, on any pair (MLPs too)."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kdarena.methods import METHODS
from kdarena.methods.adversarial import Adversarial
from kdarena.cli.app import app
from helpers import (assert_logged_finite_each_epoch, assert_resumed_exactly, cli_train_summary, digits_distiller,
                     digits_model as _model, fit_alone_and_distilled, two_epochs_and_resumed)

_adversarial = functools.partial(digits_distiller, Adversarial)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_student_loss_is_finite_and_trains_the_student_only(arch):
    options = {"hidden": [32, 32]} if arch == "mlp" else {"channels": 4}
    student, teacher = _model(arch, 0, **options), _model("cnn", 1, channels=8)
    adv = _adversarial(student, teacher, alpha=0.0, beta=1.0, kd_weight=0.5)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    logits, losses = adv.forward_train(x, y, None)
    assert logits.shape == (6, 10)
    assert set(losses) == {"loss_ce", "loss_adv", "loss_kd"}
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    losses["loss_adv"].backward()  # the adversarial term alone moves the student
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # the discriminator has its own optimizer, never the student's
    owned = {id(p) for p in adv.discriminator.parameters()}
    assert set(adv.aux_optimizers()) == {"discriminator"}
    assert {id(p) for g in adv.aux_optimizers()["discriminator"].param_groups for p in g["params"]} == owned
    in_student_opt = {id(p) for p in adv.student_optimizer_parameters()}
    assert not owned & in_student_opt
    assert {id(p) for p in student.parameters()} <= in_student_opt
    assert adv.extra_params() == sum(p.numel() for p in adv.discriminator.parameters()) > 0


def test_warm_up_teaches_the_discriminator_once_then_d_steps_per_student_step():
    student = _model("mlp", 0, hidden=[32])
    teacher = _model("mlp", 1, hidden=[32])
    with torch.no_grad():  # a teacher that is confident in class 0 on every input
        teacher.classifier.weight.zero_()
        teacher.classifier.bias.copy_(torch.tensor([3.0] + [0.0] * 9))
    adv = _adversarial(student, teacher, d_warmup=50, d_steps=2)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    z_t, z_s = teacher(x), student(x).detach()
    before = adv.discriminator_accuracy(z_t, z_s)
    adv.aux_step(x, y, None)
    after = adv.discriminator_accuracy(z_t, z_s)
    assert after >= 0.9 and after > before
    diag = adv.pop_diagnostics()
    assert diag["d_accuracy"] >= 0.9 and math.isfinite(diag["d_loss"])

    def d_updates() -> int:
        first = next(adv.discriminator.parameters())
        return int(adv.d_optimizer.state[first]["step"])

    assert d_updates() == 50 + 2
    adv.aux_step(x, y, None)  # no second warm-up
    assert d_updates() == 50 + 2 + 2


def test_discriminator_step_moves_only_the_discriminator_and_ignores_the_student_steps_gradient():
    teacher = _model("cnn", 1, channels=8)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    a, b = _adversarial(_model("cnn", 0, channels=4), teacher), _adversarial(_model("cnn", 0, channels=4), teacher)
    b.load_state_dict(a.state_dict())
    before = {k: v.clone() for k, v in a.state_dict().items()}
    a.aux_step(x, y, None)
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("discriminator.") or k == "warmed_up" for k in changed)
    # a student step leaves gradients in D; the next D update must not depend on them
    b.aux_step(x, y, None)
    sum(a.forward_train(x, y, None)[1].values()).backward()
    assert any(p.grad is not None for p in a.discriminator.parameters())
    a.aux_step(x, y, None)
    b.aux_step(x, y, None)
    for pa, pb in zip(a.discriminator.parameters(), b.discriminator.parameters()):
        assert torch.equal(pa, pb)


def test_beta_zero_is_the_student_trained_alone(digits):
    teacher = _model("cnn", 1, channels=8)
    # equal weights and BN statistics too: the discriminator's step leaves the student alone
    alone, distilled = fit_alone_and_distilled(lambda s: _adversarial(s, teacher, beta=0.0, d_warmup=5), digits, 64)
    assert alone.history[0].val_acc == distilled.history[0].val_acc


def test_resume_restores_discriminator_and_its_optimizer(digits, tmp_path):
    full, resumed, _ = two_epochs_and_resumed(lambda s, t: _adversarial(s, t, beta=0.5, d_warmup=10), digits,
                                              tmp_path, batch_size=128, seeds=(1, 9))
    assert_resumed_exactly(full, resumed, ("val_acc", "diagnostics"))
    assert resumed.test_acc == full.test_acc


def test_listed_with_its_search_space():
    assert METHODS["adversarial"] is Adversarial
    listed = {m["name"]: m for m in json.loads(CliRunner().invoke(app, ["methods", "--json"]).stdout)}
    space = listed["adversarial"]["space"]
    assert space["alpha"] == {"type": "float", "low": 0.1, "high": 1.0, "log": False}
    assert space["beta"] == {"type": "float", "low": 1e-3, "high": 1.0, "log": True}
    assert space["d_lr"] == {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}
    assert space["d_steps"]["choices"] == [1, 2, 5] and space["d_hidden"]["choices"] == [64, 128, 256]
    assert {"lr", "weight_decay"} <= set(space)


def test_train_cli_distils_a_cnn_into_an_mlp_and_logs_diagnostics(cache_env, tmp_path):
    summary = cli_train_summary("method.name=adversarial", "student.arch=mlp", "student.options.hidden=[64]",
                                "teacher.options.channels=8", "teacher.recipe.epochs=2", "train.epochs=2",
                                catch_exceptions=False)
    assert summary["status"] == "completed" and summary["student"] == "mlp"
    assert summary["extra_params"] > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert_logged_finite_each_epoch(client, summary["run_id"],
                                    ("diag_d_accuracy", "diag_d_loss", "diag_adv_loss", "train_loss_adv"))
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(summary["run_id"], "diag_d_accuracy"))
