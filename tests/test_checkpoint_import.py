"""Teacher checkpoints from RepDistiller, mdistiller and torchvision load into the zoo and give their logits.

The reference logits were computed once by the reference repositories' own
model code (tests/fixtures/make_reference_checkpoints.py); here each
network's state_dict is written the way each trainer saves it and loaded
through the function `kdarena train` loads `teacher.checkpoint` with.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdarena.cli.app import app
from kdarena.training.config import TeacherConfig
from kdarena.training.teacher_store import load_user_checkpoint
from kdarena.zoo.errors import UserError
from kdarena.zoo.models import build_model

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from reference_weights import fixed_input, state_dict_for  # noqa: E402

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "reference_checkpoints.json").read_text())
NETWORKS = {n["reference"]: n for n in FIXTURES["networks"]}


def _optimizer_state() -> dict:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05, momentum=0.9).state_dict()


def _save_as(fmt: str, state: dict[str, torch.Tensor], path: Path) -> Path:
    """`state` saved as that code base's trainer saves a network."""
    if fmt == "repdistiller":  # train_teacher.py
        obj = {"epoch": 240, "model": state, "best_acc": torch.tensor(73.5), "optimizer": _optimizer_state()}
    else:  # mdistiller's trainer, a vanilla run's "best": the network is `student` in a DataParallel distiller
        obj = {"epoch": 240, "model": {f"module.student.{k}": v for k, v in state.items()},
               "optimizer": _optimizer_state(), "best_acc": 73.5}
    torch.save(obj, path)
    return path


def _model(net: dict):
    torch.manual_seed(0)
    return build_model(net["arch"], num_classes=net["num_classes"], in_channels=3, input_size=32, **net["options"])


def _load(model, path: Path, fmt: str) -> None:
    """As `kdarena train` loads teacher.checkpoint (the arch only labels the config here: `model` is built)."""
    load_user_checkpoint(model, TeacherConfig(arch="cnn", checkpoint=str(path), format=fmt))


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(fixed_input())


@pytest.mark.parametrize("fmt", ["repdistiller", "mdistiller"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_reference_checkpoint_gives_the_reference_logits(name, fmt, tmp_path):
    net = NETWORKS[name]
    path = _save_as(fmt, state_dict_for(net["keys"]), tmp_path / "ckpt_epoch_240.pth")
    expected = torch.tensor(net["logits"][fmt])
    for given in ("auto", fmt):  # detected from the key names, or named
        model = _model(net)
        assert not torch.allclose(_logits(model), expected, atol=1e-2)  # a fresh model is not the reference
        _load(model, path, given)
        torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "net", "model"])
def test_every_wrapper_and_the_dataparallel_prefix_are_opened(wrapper, tmp_path):
    net = NETWORKS["resnet8"]
    state = {f"module.{k}": v for k, v in state_dict_for(net["keys"]).items()}
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, tmp_path / "t.pt")
    model = _model(net)
    _load(model, tmp_path / "t.pt", "auto")
    torch.testing.assert_close(_logits(model), torch.tensor(net["logits"]["repdistiller"]), atol=1e-5, rtol=0)


def test_kdarena_and_torchvision_checkpoints_load_as_they_are(tmp_path):
    import torchvision

    own = _model(NETWORKS["resnet8"])
    torch.save(own.state_dict(), tmp_path / "own.pt")
    tv = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    for path, arch, fmt, reference in ((tmp_path / "own.pt", "resnet8", "kdarena", own),
                                       (tmp_path / "tv.pt", "resnet18", "torchvision", tv)):
        for given in ("auto", fmt):
            model = build_model(arch, num_classes=10, in_channels=3, input_size=224 if arch == "resnet18" else 32)
            _load(model, path, given)
            x = torch.randn(1, 3, 64, 64)
            torch.testing.assert_close(model.eval()(x), reference.eval()(x), atol=1e-5, rtol=0)


def test_another_networks_checkpoint_names_the_format_and_the_keys(tmp_path):
    path = _save_as("repdistiller", state_dict_for(NETWORKS["wrn_16_2"]["keys"]), tmp_path / "wrn.pth")
    with pytest.raises(UserError) as caught:
        _load(_model(NETWORKS["resnet8"]), path, "auto")
    message = str(caught.value)
    assert message.startswith(f"teacher.checkpoint {path}: its keys do not fit CifarResNet as a ")
    assert "(format auto: the closest of kdarena, repdistiller)" in message
    assert "missing (the model's layers.0.0.conv1.weight (16, 16, 3, 3)" in message
    assert "unexpected (the file's block1.layer.0.bn1.weight (16)" in message
    assert "check teacher.arch and teacher.options" in message


def test_the_same_family_with_other_options_names_the_shapes(tmp_path):
    path = _save_as("mdistiller", state_dict_for(NETWORKS["resnet8x4"]["keys"]), tmp_path / "r8x4.pth")
    with pytest.raises(UserError) as caught:
        _load(_model(NETWORKS["resnet8"]), path, "auto")
    message = str(caught.value)
    assert "as a 'repdistiller' checkpoint (format auto" in message  # the reference names fit, the shapes do not
    assert "of another shape (file vs model: conv1.weight (32, 3, 3, 3) vs (16, 3, 3, 3)" in message
    assert "6 unexpected (the file's layer1.0.downsample.0.weight (64, 32, 1, 1)" in message  # ×4's first stage widens
    assert " missing (" not in message


def test_a_whole_distillers_checkpoint_says_to_give_one_network(tmp_path):
    student = state_dict_for(NETWORKS["resnet8"]["keys"])
    teacher = state_dict_for(NETWORKS["resnet8x4"]["keys"])
    torch.save({"model": {f"module.student.{k}": v for k, v in student.items()}
                | {f"module.teacher.{k}": v for k, v in teacher.items()}}, tmp_path / "best")
    with pytest.raises(UserError, match="holds a whole distiller .* student_best"):
        _load(_model(NETWORKS["resnet8"]), tmp_path / "best", "auto")


def test_a_format_the_family_does_not_have_is_refused(tmp_path):
    path = _save_as("repdistiller", state_dict_for(NETWORKS["resnet8"]["keys"]), tmp_path / "r.pth")
    with pytest.raises(UserError, match="CifarResNet has no 'torchvision' format .* use one of auto, kdarena, "
                                        "repdistiller, mdistiller"):
        _load(_model(NETWORKS["resnet8"]), path, "torchvision")
    with pytest.raises(UserError, match="as a 'kdarena' checkpoint: .*missing"):
        _load(_model(NETWORKS["resnet8"]), path, "kdarena")


def test_reference_names_are_aliases_of_the_zoo_networks():
    from kdarena.training.config import parse_config

    for alias, canonical in (("MobileNetV2", "mobilenetv2_half"), ("ShuffleV1", "shufflenetv1"),
                             ("ShuffleV2", "shufflenetv2"), ("ResNet50", "resnet50"), ("wrn_40_2", "wrn_40_2")):
        cfg = parse_config({"teacher": {"arch": alias}})
        assert cfg.teacher.arch == canonical  # one stored teacher whichever name a config uses


# digits (1×8×8, 10 classes): a RepDistiller-named resnet8 for it, made from a zoo one by the inverse renaming
def _as_repdistiller(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"^layers\.(\d)\.", lambda m: f"layer{int(m[1]) + 1}.", k): v for k, v in state.items()}


def _train(tmp_path: Path, teacher: dict):
    doc = {"teacher": teacher, "train": {"epochs": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    return CliRunner().invoke(app, ["train", "--json", str(tmp_path / "cfg.yaml")], catch_exceptions=False)


def test_train_takes_a_repdistiller_teacher_and_refuses_another_network_with_exit_2(cache_env, tmp_path):
    torch.manual_seed(0)
    zoo = build_model("resnet8", num_classes=10, in_channels=1, input_size=8)
    torch.save({"epoch": 240, "model": _as_repdistiller(zoo.state_dict()), "best_acc": torch.tensor(90.0)},
               tmp_path / "resnet8.pth")
    result = _train(tmp_path, {"arch": "resnet8", "checkpoint": str(tmp_path / "resnet8.pth")})
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert not out["teacher_trained_now"] and out["teacher"].startswith("resnet8")

    torch.manual_seed(0)
    other = build_model("wrn_16_2", num_classes=10, in_channels=1, input_size=8)
    torch.save({"model": other.state_dict()}, tmp_path / "wrn.pth")
    runs_before = _run_count(tmp_path)
    result = _train(tmp_path, {"arch": "resnet8", "checkpoint": str(tmp_path / "wrn.pth"), "format": "repdistiller"})
    assert result.exit_code == 2, result.output
    assert "as a 'repdistiller' checkpoint" in result.stderr, result.stderr
    assert "missing (the model's bn1.weight (16)" in result.stderr, result.stderr
    assert "unexpected (the file's groups.0.0." in result.stderr
    assert "Traceback" not in result.output
    assert _run_count(tmp_path) == runs_before  # nothing trained, nothing recorded
    assert not (cache_env / "teachers").exists() or not list((cache_env / "teachers").glob("*.pt"))


def _run_count(tmp_path: Path) -> int:
    from mlflow.tracking import MlflowClient

    if not (tmp_path / "mlflow.db").exists():
        return 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


def test_format_without_a_checkpoint_is_refused(cache_env, tmp_path):
    result = _train(tmp_path, {"arch": "cnn", "format": "repdistiller"})
    assert result.exit_code == 2 and "teacher.format" in result.stderr and "teacher.checkpoint" in result.stderr
    result = _train(tmp_path, {"arch": "cnn", "format": "caffe"})
    assert result.exit_code == 2 and "teacher.format" in result.stderr and "repdistiller" in result.stderr
