"""`arch: timm/NAME`: timm's models as students and teachers through `kdarena train`, their stage features, their
cost, their local weights, and every way of asking for one that cannot work."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kdarena.cli.app import app
from kdarena.zoo.cost import profile_cost
from kdarena.zoo.errors import UserError
from kdarena.zoo.models import build_model, stage_shapes

# CI installs timm (`.ci/run`: kdarena[timm]); the absent-package case runs either way
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")

FAST = ["--set", "teacher.recipe.epochs=1", "--set", "train.epochs=2"]
ZOO_TEACHER = {"arch": "cnn", "options": {"channels": 8}}


def _train(tmp_path: Path, doc: dict, *args: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(doc))
    return CliRunner().invoke(app, ["train", str(path), *args], catch_exceptions=False)


def _digits(arch: str, **options):
    torch.manual_seed(0)
    return build_model(arch, num_classes=10, in_channels=1, input_size=8, **options)


def _run_of(tmp_path: Path, run_id: str):
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)


@pytest.mark.parametrize("method", ["kd", "at", "fitnets"])
@needs_timm
def test_a_timm_student_distils_from_a_zoo_teacher_with_its_costs_recorded(method, migrated_store, tmp_path):
    doc = {"teacher": ZOO_TEACHER, "student": {"arch": "timm/test_resnet"}, "method": {"name": method}}
    result = _train(tmp_path, doc, "--json", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["student"] == "timm/test_resnet" and summary["teacher"] == "cnn"
    # the cost is the deployed timm network's, counted as every zoo model's is
    cost = profile_cost(_digits("timm/test_resnet"), in_channels=1, input_size=8, latency=False)
    assert (summary["params"], summary["macs"]) == (cost.params, cost.macs) and cost.macs > 0
    run = _run_of(tmp_path, summary["run_id"])
    assert run.data.tags["kdarena.status"] == "completed"
    assert run.data.metrics["params"] == cost.params and run.data.metrics["macs"] == cost.macs
    assert run.data.params["student.arch"] == "timm/test_resnet"
    assert 0 <= run.data.metrics["test_acc"] <= 1
    if method != "kd":  # the feature term was computed on the timm student's stage maps
        assert any(k.startswith("train_loss_") and k not in ("train_loss_ce", "train_loss_kd")
                   for k in run.data.metrics), sorted(run.data.metrics)


@needs_timm
def test_a_timm_teacher_trains_and_teaches_a_zoo_student_with_its_options(migrated_store, tmp_path):
    teacher = {"arch": "timm/test_vit", "options": {"patch_size": 2, "drop_rate": 0.1}}
    doc = {"teacher": teacher, "student": {"arch": "cnn", "options": {"channels": 4}}, "method": {"name": "fitnets"}}
    result = _train(tmp_path, doc, "--json", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["teacher"] == "timm/test_vit" and summary["teacher_trained_now"]
    run = _run_of(tmp_path, summary["run_id"])
    assert run.data.tags["kdarena.status"] == "completed" and "teacher_test_acc" in run.data.metrics


@pytest.mark.parametrize("arch, options", [("timm/test_resnet", {}), ("timm/test_vit", {"patch_size": 2}),
                                           ("timm/test_efficientnet", {})])
@needs_timm
def test_stages_come_through_the_contract_and_the_logits_are_the_models_own(arch, options):
    model = _digits(arch, **options).eval()
    x = torch.randn(3, 1, 8, 8)
    out = model.forward_stages(x)
    assert torch.allclose(out.logits, model(x), atol=1e-6) and out.logits.shape == (3, 10)
    shapes = stage_shapes(model, 1, 8)
    assert len(shapes) >= 3 and all(s.spatial for s in shapes)
    assert [(f.shape[1], f.shape[2]) for f in out.stages] == [(s.channels, s.height) for s in shapes]
    assert len(out.preact) == len(out.stages)


@needs_timm
def test_a_vit_is_built_for_the_datasets_size_unless_told_otherwise():
    assert _digits("timm/test_vit", patch_size=2).net.patch_embed.img_size == (8, 8)
    with pytest.raises(UserError, match=r"does not run on 1×8×8 inputs .*patch size"):
        _digits("timm/test_vit", img_size=16, patch_size=16)


@pytest.mark.parametrize("form", ["kdarena", "timm", "safetensors"])
@needs_timm
def test_local_weights_load_in_each_form(form, tmp_path):
    source = _digits("timm/test_resnet")
    path = tmp_path / f"w.{'safetensors' if form == 'safetensors' else 'pt'}"
    if form == "kdarena":  # a kdarena student.pt: the wrapper's own keys (net.…)
        torch.save(source.state_dict(), path)
    elif form == "timm":
        torch.save(source.net.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(source.net.state_dict(), str(path))
    torch.manual_seed(7)  # other initial weights: only loading makes them equal
    loaded = build_model("timm/test_resnet", num_classes=10, in_channels=1, input_size=8, weights=str(path),
                         pretrained=True)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("suffix", "fmt"), [("pt", "auto"), ("safetensors", "auto"), ("pt", "timm")])
@needs_timm
def test_a_timm_state_dict_loads_as_the_teachers_checkpoint(suffix, fmt, migrated_store, tmp_path):
    """A teacher fine-tuned with timm itself: its own keys (no `net.`), as torch.save or safetensors writes them."""
    from kdarena.training.teacher_store import file_sha256, load_weights

    source = _digits("timm/test_resnet")
    path = tmp_path / f"teacher.{suffix}"
    if suffix == "safetensors":
        from safetensors.torch import save_file
        save_file(source.net.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.net.state_dict()}, path)  # a trainer's wrapper, unwrapped too
    loaded = _digits("timm/test_resnet", drop_rate=0.0)
    torch.manual_seed(3)
    for p in loaded.parameters():  # other weights: only the checkpoint makes the logits equal
        torch.nn.init.normal_(p)
    load_weights(loaded, path, None, "teacher.checkpoint", fmt=fmt)
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(source.eval()(x), loaded.eval()(x), atol=1e-6)
    doc = {"teacher": {"arch": "timm/test_resnet", "checkpoint": str(path), "format": fmt},
           "student": {"arch": "cnn", "options": {"channels": 4}}, "train": {"epochs": 1}}
    result = _train(tmp_path, doc, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["teacher_sha256"] == file_sha256(path) and summary["teacher_trained_now"] is False


@needs_timm
def test_weights_for_other_classes_keep_a_fresh_classifier(tmp_path):
    path = tmp_path / "in1k.pt"
    torch.save(build_model("timm/test_resnet", num_classes=5, in_channels=1, input_size=8).net.state_dict(), path)
    with pytest.warns(UserWarning, match="freshly initialised classifier"):
        model = build_model("timm/test_resnet", num_classes=10, in_channels=1, input_size=8, weights=str(path))
    assert model.net.fc.weight.shape == (10, 96)


BAD = {
    "unknown timm name": ({"student": {"arch": "timm/resnet181"}}, "timm has no model 'resnet181'", "timm/resnet18"),
    "empty timm name": ({"student": {"arch": "timm/"}}, "timm has no model ''", "timm.list_models()"),
    "pretrained without weights": ({"student": {"arch": "timm/test_resnet", "options": {"pretrained": True}}},
                                   "never downloads", "options.weights: PATH"),
    "pretrained teacher without weights": ({"teacher": {"arch": "timm/test_resnet", "options": {"pretrained": True}}},
                                           "never downloads", "options.weights: PATH"),
    "a hub download option": ({"student": {"arch": "timm/test_resnet", "options": {"pretrained_cfg_overlay": {}}}},
                              "'pretrained_cfg_overlay' is not accepted", "options.weights"),
    "channels set by hand": ({"student": {"arch": "timm/test_resnet", "options": {"in_chans": 3}}},
                             "'in_chans' is not accepted", "dataset's channel count"),
    "an option timm does not take": ({"student": {"arch": "timm/test_resnet", "options": {"wings": 2}}},
                                     "cannot be built", "'wings'"),
    "too coarse for 8 px": ({"student": {"arch": "timm/test_vit"}}, "does not run on 1×8×8", "patch_size"),
    "missing weights file": ({"student": {"arch": "timm/test_resnet", "options": {"weights": "NOPE.pt"}}},
                             "does not exist", "never downloads"),
    "garbage .safetensors": ({"student": {"arch": "timm/test_resnet", "options": {"weights": "GARBAGE.safetensors"}}},
                             "cannot be read as safetensors", "local state_dict"),
}


@pytest.mark.parametrize("case", list(BAD))
@needs_timm
def test_a_timm_model_that_cannot_work_exits_2_naming_the_fix(case, cache_env, tmp_path):
    doc, what, fix = BAD[case]
    (tmp_path / "GARBAGE.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    result = _train(tmp_path, doc, *FAST)
    assert result.exit_code == 2, result.output
    assert what in result.stderr and fix in result.stderr, result.stderr
    assert "Traceback" not in result.output
    if (tmp_path / "mlflow.db").exists():  # nothing half-written: no run, no stored teacher
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not list(cache_env.rglob("*.pt"))


def test_without_timm_installed_the_message_names_the_extra(cache_env, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets where the package is absent
    result = _train(tmp_path, {"student": {"arch": "timm/test_resnet"}})
    assert result.exit_code == 2, result.output
    assert "pip install 'kdarena[timm]'" in result.stderr and "student.arch" in result.stderr
