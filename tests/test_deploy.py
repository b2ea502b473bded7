"""Deployable students: the model card `kdarena train` writes beside student.pt, `kdarena deploy` to ONNX, TorchScript
and an exported program (each loaded back by its own runtime and checked against PyTorch), `--register` into MLflow's
Model Registry, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kdarena.cli.app import app
from kdarena.training.deploy import Normalised, raw_pixels
from kdarena.training.record import Tag
from kdarena.training.student_card import build_student, read_card
from kdarena.zoo.data import load_dataset

# a 4-channel cnn distilled with kd from a 1-epoch teacher, one epoch: seconds on digits
TRAIN = ["--set", "teacher.recipe.epochs=1", "--set", "train.epochs=1", "--set", "student.options.channels=4"]


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """{'uri', 'run_id', 'summary', 'folder'}: one `kdarena train` run in a private store, its artifacts downloaded."""
    work = tmp_path_factory.mktemp("deploy")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDARENA_CACHE", str(work / "cache"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(work)
        result = _cli("train", "--json", *TRAIN)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        folder = work / "artifacts"
        folder.mkdir()
        for name in ("student.pt", "student.json", "config.yaml"):
            mlflow.artifacts.download_artifacts(run_id=summary["run_id"], artifact_path=name, dst_path=str(folder),
                                                tracking_uri=uri)
        yield {"uri": uri, "run_id": summary["run_id"], "summary": summary, "folder": folder, "work": work}


@pytest.fixture()
def store(trained, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    monkeypatch.chdir(tmp_path)
    return trained


def _reference(trained) -> Normalised:
    card = read_card(trained["folder"] / "student.json")
    return Normalised(build_student(card, trained["folder"] / "student.pt"), card["input"]["mean"],
                      card["input"]["std"]).eval()


def test_train_writes_a_card_that_rebuilds_the_student_as_it_was_scored(trained):
    card = json.loads((trained["folder"] / "student.json").read_text())
    summary, data = trained["summary"], load_dataset("digits")
    run = MlflowClient(trained["uri"]).get_run(trained["run_id"])
    assert card["student"] == {"arch": "cnn", "options": {"channels": 4}, "label": "cnn(channels=4)"}
    assert card["classes"] == {"count": 10, "names": [str(i) for i in range(10)]}
    assert card["input"]["channels"] == 1 and card["input"]["size"] == 8
    assert card["input"]["mean"] == pytest.approx(list(data.mean)) and card["input"]["std"] == pytest.approx(list(data.std))
    assert card["teacher"] == {"arch": "cnn", "label": run.data.tags["kdarena.teacher_label"],
                               "sha256": summary["teacher_sha256"]}
    assert card["method"] == {"name": "kd", "params": summary["method_params"]}
    assert card["dataset"]["fingerprint"] == data.fingerprint
    # the card's config is the run's re-runnable config.yaml
    assert card["config"] == yaml.safe_load((trained["folder"] / "config.yaml").read_text())
    for name in ("test_acc", "params", "macs", "latency_ms"):
        assert card["scores"][name] == pytest.approx(run.data.metrics[name]), name
    # the student rebuilt from the card, fed raw pixels (uint8 / 255) with its normalisation in front, scores
    # on the test split exactly what the run recorded
    model = _reference(trained)
    with torch.no_grad():
        predicted = model(data.test.images.float() / 255).argmax(1)
    assert float((predicted == data.test.labels).float().mean()) == pytest.approx(summary["test_acc"], abs=1e-6)


def _load_back(fmt: str, path: Path):
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()


@pytest.mark.parametrize("fmt, name", [("onnx", "student.onnx"), ("torchscript", "student.ts"),
                                       ("exported-program", "student.pt2")])
def test_deploy_writes_a_checked_model_that_takes_raw_pixels(store, tmp_path, fmt, name):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the deploy extra: pip install 'kdarena[deploy]'")
    out = tmp_path / name
    result = _cli("deploy", store["run_id"], "--format", fmt.upper(), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == fmt and report["output"] == str(out) and report["run_id"] == store["run_id"]
    assert 0 <= report["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no partial file left beside it
    # loaded back by its own runtime: the student's logits on raw pixels, any batch size
    deployed, reference = _load_back(fmt, out), _reference(store)
    for batch in (1, 5):
        x = raw_pixels(read_card(store["folder"] / "student.json"), batch, seed=42)
        with torch.no_grad():
            assert torch.allclose(torch.as_tensor(deployed(x)), reference(x), atol=1e-4, rtol=0)


def test_deploy_from_a_local_folder_prints_what_it_wrote(store, tmp_path):
    out = tmp_path / "student.ts"
    result = _cli("deploy", str(store["folder"]), "--format", "torchscript", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (torchscript)" in result.stdout and "largest difference from PyTorch" in result.stdout
    assert out.is_file()


def test_register_logs_an_mlflow_model_that_loads_back_with_the_same_outputs(store):
    result = _cli("deploy", store["run_id"], "--register", "digits-student", "--json")
    assert result.exit_code == 0, result.output
    registered = json.loads(result.stdout)["registered"]
    assert registered == {"name": "digits-student", "version": "1", "model_uri": "models:/digits-student/1"}
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pytorch.load_model("models:/digits-student/1")
    x = raw_pixels(read_card(store["folder"] / "student.json"), 4, seed=7)
    with torch.no_grad():
        assert torch.allclose(model(x), _reference(store)(x), atol=1e-5, rtol=0)
    info = mlflow.models.get_model_info("models:/digits-student/1")
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
    assert MlflowClient(store["uri"]).get_model_version("digits-student", "1").run_id == store["run_id"]
    # it loads where kdarena cannot be imported: what `mlflow models serve` runs needs torch and MLflow alone
    without = ("import sys, json, torch, mlflow\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'kdarena':\n"
               "            raise ImportError('blocked')\n"
               "sys.meta_path.insert(0, Block())\n"
               f"mlflow.set_tracking_uri({store['uri']!r})\n"
               "model = mlflow.pytorch.load_model('models:/digits-student/1')\n"
               "torch.manual_seed(0)\n"
               "print(json.dumps(model(torch.rand(2, 1, 8, 8)).tolist()))\n")
    done = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reference = _reference(store)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = reference(torch.rand(2, 1, 8, 8))
    assert torch.allclose(torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])), expected, atol=1e-5)
    # a second registration is the name's next version
    again = _cli("deploy", store["run_id"], "--register", "digits-student", "--json")
    assert json.loads(again.stdout)["registered"]["version"] == "2"


def test_a_check_that_fails_exits_1_and_writes_nothing(store, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "student.json").write_bytes((store["folder"] / "student.json").read_bytes())
    state = torch.load(store["folder"] / "student.pt", weights_only=True)
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
               folder / "student.pt")
    out = tmp_path / "student.ts"
    result = _cli("deploy", str(folder), "--format", "torchscript", "-o", str(out))
    assert result.exit_code == 1
    assert "differ from PyTorch's by up to nan" in result.output and "was not written" in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.parametrize("args, says", [
    (["0123456789abcdef0123456789abcdef", "--format", "torchscript", "-o", "s.ts"],
     "is neither a file or folder here nor a run in"),
    (["RUN", "--format", "tflite", "-o", "s.tflite"], "--format 'tflite' is not a format kdarena exports; choose "
                                                       "one of: onnx, torchscript, exported-program"),
    (["RUN", "--format", "torchscript", "-o", "."], "is a folder; give the file to write"),
    (["RUN", "--format", "torchscript", "-o", "missing/s.ts"], "its folder missing does not exist"),
    (["RUN", "--format", "torchscript"], "give --format and -o FILE together"),
    (["RUN"], "nothing to do: give --format FORMAT -o FILE to export, and/or --register NAME"),
    (["EMPTY", "--format", "torchscript", "-o", "s.ts"], "holds no student.pt and no student.json"),
    (["FOLDER", "--register", "local"], "--register needs a run id"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(store, tmp_path, args, says):
    (tmp_path / "empty").mkdir()
    swap = {"RUN": store["run_id"], "EMPTY": str(tmp_path / "empty"), "FOLDER": str(store["folder"])}
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _cli("deploy", *[swap.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert says in result.output and result.output.startswith("error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if "--register" in args:  # nothing registered either
        assert MlflowClient(store["uri"]).search_registered_models(filter_string="name = 'local'") == []


def test_onnx_without_the_deploy_extra_names_the_extra(store, tmp_path):
    # a fresh interpreter in which onnxruntime cannot be imported, as in an install without the extra
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'onnxruntime':\n"
               "            raise ImportError('blocked: not installed')\n"
               "sys.meta_path.insert(0, Block())\n"
               "from kdarena.cli import main\n"
               "sys.argv = ['kdarena'] + sys.argv[1:]\n"
               "main()\n")
    out = tmp_path / "student.onnx"
    done = subprocess.run([sys.executable, "-c", blocker, "deploy", store["run_id"], "--format", "onnx", "-o", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "pip install 'kdarena[deploy]'" in done.stderr and "onnxruntime" in done.stderr
    assert not out.exists()


def test_runs_without_a_deployable_student_exit_2(store, tmp_path):
    client = MlflowClient(store["uri"])
    run = client.get_run(store["run_id"])
    (teacher,) = client.search_runs([run.info.experiment_id], filter_string="tags.`kdarena.role` = 'teacher'")
    # a student run recorded before model cards: its weights, no card
    older = client.create_run(run.info.experiment_id, tags={"kdarena.role": "train"}).info.run_id
    client.log_artifact(older, str(store["folder"] / "student.pt"))
    diverged = _cli("train", "--json", "--set", "method.name=baseline", "--set", "train.lr=1e4",
                    "--set", "train.epochs=2", "--set", "student.options.channels=4")
    assert diverged.exit_code == 1, diverged.output
    cases = {teacher.info.run_id: "holds no student.pt",
             older: "has no student.json (it was recorded by a kdarena without model cards)",
             json.loads(diverged.stdout)["run_id"]: "ended diverged (non-finite"}
    for run_id, says in cases.items():
        result = _cli("deploy", run_id, "--format", "torchscript", "-o", str(tmp_path / "s.ts"))
        assert result.exit_code == 2 and says in result.output, result.output
    assert not (tmp_path / "s.ts").exists()


def test_deploy_a_config_finds_the_run_that_trained_it(store, tmp_path):
    """`kdarena deploy CONFIG`: the run an exported header names, else a completed run of the same config."""
    config = yaml.safe_load((store["folder"] / "config.yaml").read_text())
    plain = tmp_path / "mine.yaml"  # the run's config as a user keeps it: no header
    plain.write_text(yaml.safe_dump(config))
    other_seed = tmp_path / "seed7.yaml"  # the same config, another seed: the seed is no part of "the same config"
    other_seed.write_text(yaml.safe_dump(config | {"train": config["train"] | {"seed": 7}}))
    for path in (plain, other_seed):
        result = _cli("deploy", str(path), "--format", "torchscript", "-o", str(tmp_path / "s.ts"), "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["run_id"] == store["run_id"]
    # a header naming a run wins over the config's content (`kdarena export` writes one)
    named = tmp_path / "exported.yaml"
    named.write_text(f"# rank 1: kd, MLflow run {store['run_id']}\n" + yaml.safe_dump(config | {"method": {"name": "at"}}))
    result = _cli("deploy", str(named), "--format", "torchscript", "-o", str(tmp_path / "e.ts"), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["run_id"] == store["run_id"]
    assert json.loads(result.stdout)["source"] == f"run {store['run_id']} (of {named})"


def test_deploy_a_config_never_trained_exits_2_and_says_how(store, tmp_path):
    config = yaml.safe_load((store["folder"] / "config.yaml").read_text())
    untrained = tmp_path / "wider.yaml"
    untrained.write_text(yaml.safe_dump(config | {"student": {"arch": "cnn", "options": {"channels": 6}}}))
    result = _cli("deploy", str(untrained), "--format", "torchscript", "-o", str(tmp_path / "s.ts"))
    assert result.exit_code == 2 and result.output.startswith("error:")
    assert f"no completed run of the config in {untrained}" in result.output
    assert f"kdarena train {untrained}" in result.output
    gone = tmp_path / "gone.yaml"
    gone.write_text(f"# rank 1: kd, MLflow run {'0' * 32}\n" + yaml.safe_dump(config))
    result = _cli("deploy", str(gone), "--format", "torchscript", "-o", str(tmp_path / "s.ts"))
    assert result.exit_code == 2 and f"comes from run {'0' * 32}, which is not in" in result.output
    assert not (tmp_path / "s.ts").exists()


@pytest.mark.parametrize("fmt, name", [("onnx", "s.onnx"), ("torchscript", "s.ts"), ("exported-program", "s.pt2")])
def test_a_sweeps_best_student_deploys_in_every_format(swept_store, tmp_path, monkeypatch, fmt, name):
    """The student a sweep names its best (the parent run's tag), as the quickstart leaves one, deployed and checked."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the deploy extra: pip install 'kdarena[deploy]'")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", swept_store["tracking_uri"])
    client = MlflowClient(swept_store["tracking_uri"])
    parent = json.loads((swept_store["sweep_dir"] / "records.json").read_text())["parent_run_id"]
    best = client.get_run(parent).data.tags[Tag.BEST_RUN_ID]
    out = tmp_path / name
    result = _cli("deploy", best, "--format", fmt, "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["run_id"] == best and out.is_file() and 0 <= report["max_abs_diff"] <= 1e-4
