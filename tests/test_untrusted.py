"""Untrusted files: changed checkpoints, crafted pickles, YAML with Python tags, names that climb out of folders.

Each attack carries a real payload whose side effect is a marker file (a
pickle whose `__reduce__` makes a folder, a YAML tag that would call
`os.mkdir`); a control proves the payload does run under an unsafe loader,
so "the marker never appears" means kdarena refused it, not that it was
harmless. Everything goes through the real CLI or the real function the CLI
calls, and ends in exit code 2 with one clear line, or in a UserError.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kdarena.cli.app import app
from kdarena.zoo.data import load_dataset
from kdarena.zoo.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ["search", "training", "methods", "zoo", "dashboard", "leaderboards", "sweeps", "benchmarks"]
FAST = ["--set", "teacher.recipe.epochs=1", "--set", "train.epochs=1"]


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def _refused(result, *expected: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _write_yaml(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


# ---------------------------------------------------------------- payloads


class MakeMarker:
    """Unpickling this calls os.mkdir(marker): code run on load, made visible."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def crafted_checkpoint(path: Path, marker: Path, kind: str) -> Path:
    if kind == "pickle":  # a plain pickle stream
        path.write_bytes(pickle.dumps(MakeMarker(marker)))
    elif kind == "torch-zip":  # torch.save's zip format around the same object
        torch.save(MakeMarker(marker), path)
    else:  # a real-looking state_dict with the payload beside the tensors
        from kdarena.zoo.models import build_model
        state = build_model("cnn", num_classes=10, in_channels=1, input_size=8, channels=32).state_dict()
        state["extra"] = MakeMarker(marker)
        torch.save(state, path)
    return path


CHECKPOINT_KINDS = ["pickle", "torch-zip", "state-dict-with-payload"]


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_control_the_crafted_checkpoints_do_run_code_when_loaded_unsafely(tmp_path, kind):
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker, kind)
    if kind == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------- (a) changed teacher weights


def test_stored_teacher_with_changed_bytes_is_refused_by_its_sha256(migrated_store, tmp_path):
    first = _cli("train", "--json", *FAST)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["teacher_trained_now"]
    (weights,) = (migrated_store / "teachers").glob("*.pt")
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit
    weights.write_bytes(bytes(blob))

    line = _refused(_cli("train", *FAST), "stored teacher", "fails its sha256 check", "delete it to retrain")
    assert weights.name in line
    assert weights.read_bytes() == bytes(blob)  # refused, not silently retrained over

    # the sidecar holding the sha256 damaged: refused too, never "no hash, so trust it"
    (meta,) = (migrated_store / "teachers").glob("*.json")
    meta.write_text("{not json")
    _refused(_cli("train", *FAST), "damaged", "delete it")
    meta.write_text(json.dumps({"sha256": None}))
    _refused(_cli("train", *FAST), "damaged")


def _good_teacher(path: Path) -> str:
    from kdarena.zoo.models import build_model
    torch.save(build_model("cnn", num_classes=10, in_channels=1, input_size=8, channels=32).state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pinned_teacher_checkpoint_swapped_for_a_crafted_one_is_refused_before_loading(cache_env, tmp_path):
    path = tmp_path / "teacher.pt"
    sha = _good_teacher(path)
    marker = tmp_path / "marker"
    crafted_checkpoint(path, marker, "state-dict-with-payload")
    line = _refused(_cli("train", *FAST, "--set", f"teacher.checkpoint={path}", "--set", f"teacher.sha256='{sha}'"),
                    "teacher.checkpoint", "fails its sha256 check", "teacher.sha256")
    assert "not a loadable" not in line  # the hash refused it: the file was never unpickled
    assert not marker.exists()


def test_teacher_checkpoint_that_differs_from_its_pin_is_refused(cache_env, tmp_path):
    path = tmp_path / "teacher.pt"
    _good_teacher(path)
    _refused(_cli("train", *FAST, "--set", f"teacher.checkpoint={path}", "--set", f"teacher.sha256='{'0' * 64}'"),
             "fails its sha256 check", "drop teacher.sha256")


# ---------------------------------------------------------------- (b) pickles that run code


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_crafted_pickle_as_teacher_checkpoint_is_refused(cache_env, tmp_path, kind):
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "teacher.pt", marker, kind)
    _refused(_cli("train", *FAST, "--set", f"teacher.checkpoint={path}"),
             "teacher.checkpoint", "not a loadable weights file", "tensors only")
    assert not marker.exists()


def test_crafted_pickle_in_the_teacher_store_is_refused_even_with_a_matching_sidecar(cache_env, tmp_path):
    """An attacker who can write the store can write the sidecar's hash too: loading must still be tensors only."""
    from kdarena.training.config import parse_config
    from kdarena.training.teacher_store import teacher_key

    cfg = parse_config({}, "default")
    store = cache_env / "teachers"
    store.mkdir(parents=True)
    key = teacher_key(cfg.teacher, cfg.dataset, load_dataset("digits"))
    marker = tmp_path / "marker"
    weights = crafted_checkpoint(store / f"{key}.pt", marker, "torch-zip")
    (store / f"{key}.json").write_text(json.dumps({"key": key, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}))
    _refused(_cli("train", "--set", "train.epochs=1"), f"stored teacher {key}", "not a loadable weights file")
    assert not marker.exists()


def test_crafted_pickle_as_stored_teacher_logits_is_never_run_and_is_computed_again(migrated_store, tmp_path):
    """A teacher's stored logits are derived data: a crafted file, even with a matching sidecar, is never unpickled;
    the run says so, computes them again and goes on."""
    assert _cli("train", *FAST).exit_code == 0
    (logits,) = (migrated_store / "teachers" / "logits").glob("*.pt")
    marker = tmp_path / "marker"
    crafted_checkpoint(logits, marker, "torch-zip")
    meta = logits.with_suffix(".json")
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"sha256": hashlib.sha256(logits.read_bytes()).hexdigest()}))
    result = _cli("train", *FAST)
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert f"stored teacher logits {logits}: it is not a tensors-only file; computing them again" in result.stderr
    assert torch.load(logits, weights_only=True)["logits"].shape == (1295, 10)  # replaced by real ones


def test_crafted_pickle_as_imagenet_weights_option_is_refused(cache_env, tmp_path):
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "resnet.pt", marker, "torch-zip")
    cfg = _write_yaml(tmp_path / "cfg.yaml", {"teacher": {"arch": "resnet18", "options": {"weights": str(path)}},
                                              "train": {"epochs": 1}})
    _refused(_cli("train", str(cfg)), "is not a loadable weights file", "never pickled objects")
    assert not marker.exists()


def _trial_checkpoint_fit(tmp_path: Path, path: Path):
    from kdarena.methods.baseline import Baseline
    from kdarena.methods.engine import fit
    from kdarena.methods.recipe import Recipe
    from kdarena.zoo.data import load_dataset
    from kdarena.zoo.models import build_model, stage_shapes
    from kdarena.methods import PairInfo

    data = load_dataset("digits")
    student = build_model("cnn", num_classes=10, in_channels=1, input_size=8, channels=4)
    pair = PairInfo(stage_shapes(student, 1, 8), stage_shapes(student, 1, 8), 10, 1, 8)
    return fit(Baseline(student, None, Baseline.Params(), pair), data, Recipe(epochs=1), device=torch.device("cpu"),
               checkpoint_path=path)


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_crafted_trial_checkpoint_never_runs_its_code(tmp_path, kind):
    """A trial resumes from `checkpoint.pt` in Ray's storage: a crafted one is refused, its code never runs."""
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "checkpoint.pt", marker, kind)
    with pytest.raises(Exception) as info:
        _trial_checkpoint_fit(tmp_path, path)
    assert isinstance(info.value, (pickle.UnpicklingError, UserError, RuntimeError)), repr(info.value)
    assert not marker.exists()


def test_crafted_trial_checkpoint_is_a_user_error(tmp_path):
    path = crafted_checkpoint(tmp_path / "checkpoint.pt", tmp_path / "marker", "torch-zip")
    with pytest.raises(UserError, match="cannot be read safely"):
        _trial_checkpoint_fit(tmp_path, path)
    assert not (tmp_path / "marker").exists()


def _png(path: Path, value: int) -> None:
    from torchvision.io import write_png
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(torch.full((3, 8, 8), value, dtype=torch.uint8), str(path))


def _image_tree(root: Path) -> Path:
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            for i in range(3):
                _png(root / split / name / f"{i}.png", 40 * c + i)
    return root


def test_crafted_decoded_image_cache_is_never_unpickled_and_is_rebuilt(tmp_path):
    from kdarena.zoo.data import load_dataset

    root = _image_tree(tmp_path / "tree")
    marker = tmp_path / "marker"
    cache = root / "train" / ".kdarena-decoded.pt"
    crafted_checkpoint(cache, marker, "torch-zip")
    data = load_dataset("imagefolder", root=root, val_fraction=0.2)
    assert not marker.exists()
    assert len(data.train) + len(data.val) == 6 and data.num_classes == 2
    assert torch.load(cache, weights_only=True)["images"].shape == (6, 3, 8, 8)  # replaced by a real one


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}"


# a pickle kdarena reads on purpose: Ray's searcher state in the sweep's own storage, which Ray itself
# unpickles on restore anyway (its experiment state is pickles); storage is as trusted as the code running there
PICKLE_ALLOWED = {"search/per_method.py"}


def test_every_load_in_the_source_is_tensors_only_or_plain_yaml():
    sources = [p for d in PACKAGE_DIRS for p in (REPO / d).rglob("*.py")]
    assert len(sources) > 40
    torch_loads, problems = 0, []
    for path in sources:
        rel = path.relative_to(REPO).as_posix()
        for call, name in _calls(ast.parse(path.read_text(), rel)):
            where = f"{rel}:{call.lineno}"
            kwargs = {k.arg: k.value for k in call.keywords}
            if name == "torch.load":
                torch_loads += 1
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.load", "cloudpickle.loads"):
                if rel not in PICKLE_ALLOWED:
                    problems.append(f"{where}: {name}")
            elif name in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"):
                problems.append(f"{where}: {name}")
            elif name in ("yaml.load", "yaml.load_all"):
                loader = kwargs.get("Loader", call.args[1] if len(call.args) > 1 else None)
                if not (isinstance(loader, ast.Name) and loader.id == "_PlainLoader"):
                    problems.append(f"{where}: {name} with a loader other than the safe one")
        text = path.read_text()
        for unsafe in ("yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader", "Loader=Loader"):
            if unsafe in text:
                problems.append(f"{rel}: mentions {unsafe}")
    assert torch_loads >= 4  # the walk sees the loads it guards
    assert not problems, problems


def test_the_plain_loader_is_a_safe_loader():
    from kdarena.training.documents import _PlainLoader
    assert issubclass(_PlainLoader, yaml.SafeLoader)
    assert not set(_PlainLoader.yaml_constructors) - set(yaml.SafeLoader.yaml_constructors)
    assert not _PlainLoader.yaml_multi_constructors


# ---------------------------------------------------------------- (c) YAML with Python tags


def _payloads(marker: Path) -> dict[str, str]:
    m = json.dumps(str(marker))
    return {
        "apply": f"!!python/object/apply:os.mkdir [{m}]",
        "new": f"!!python/object/new:os.mkdir [{m}]",
        "apply-subprocess": f"!!python/object/apply:subprocess.check_call [[mkdir, {m}]]",
        "name": "!!python/name:os.system ''",
        "module": "!!python/module:os ''",
        "object": "!!python/object:argparse.Namespace {x: 1}",
    }


@pytest.mark.parametrize("payload", ["apply", "new", "apply-subprocess"])
def test_control_the_yaml_payloads_do_run_code_when_loaded_unsafely(tmp_path, payload):
    marker = tmp_path / "marker"
    yaml.unsafe_load(f"x: {_payloads(marker)[payload]}\n")
    assert marker.exists()


def _documents(kind: str, payload: str) -> dict[str, str]:
    base = ("name: evil\nteacher: {arch: cnn}\nstudents: [{arch: cnn}]\nmethods: {kd: {}}\n" if kind == "sweep"
            else "method: {name: kd}\n")
    return {"top level": f"{payload}\n", "a section": f"{base}dataset: {payload}\n",
            "a nested value": f"{base}train: {{epochs: 1, seed: {payload}}}\n",
            "an anchor used later": f"{base}x: &p {payload}\nexperiment: *p\n"}


@pytest.mark.parametrize("command", ["train", "sweep"])
@pytest.mark.parametrize("payload", ["apply", "new", "apply-subprocess", "name", "module", "object"])
def test_yaml_python_tags_are_refused_and_never_run(cache_env, tmp_path, command, payload):
    marker = tmp_path / "marker"
    for where, text in _documents(command, _payloads(marker)[payload]).items():
        path = tmp_path / f"{command}.yaml"
        path.write_text(text)
        args = [command, str(path)] + (["--storage", str(tmp_path / "storage")] if command == "sweep" else [])
        _refused(_cli(*args), "YAML tag", "is refused", "never Python objects")
        assert not marker.exists(), where
    assert not (tmp_path / "storage").exists()


@pytest.mark.parametrize("payload", ["apply", "new", "apply-subprocess"])
def test_yaml_python_tags_in_set_overrides_are_refused(cache_env, tmp_path, payload):
    marker = tmp_path / "marker"
    _refused(_cli("train", "--set", f"train.epochs={_payloads(marker)[payload]}"), "--set", "YAML tag", "is refused")
    assert not marker.exists()


# ---------------------------------------------------------------- (d) names that climb out of their folder

BAD_SWEEP_NAMES = ["../../x", "../x", "..", ".", "/tmp/kdarena-escape", "a/../../b", "a/b", "~/x", "x\\..\\y", "a..b",
                   "", " x", "x\n", "-rf", ".hidden", "x" * 101]


def _sweep_doc(name: str) -> dict:
    return {"name": name, "teacher": {"arch": "cnn"}, "students": [{"arch": "cnn"}], "methods": {"kd": {}},
            "storage": "storage"}


@pytest.mark.parametrize("name", BAD_SWEEP_NAMES)
def test_sweep_name_that_is_a_path_is_refused_before_anything_is_written(cache_env, tmp_path, monkeypatch, name):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    path = _write_yaml(work / "sweep.yaml", _sweep_doc(name))
    _refused(_cli("sweep", str(path)), "name:")
    with pytest.raises(UserError, match="name"):
        from kdarena.search.sweep_config import load_sweep
        load_sweep(path)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == sorted(before + [Path("a/b/sweep.yaml")])
    assert not Path("/tmp/kdarena-escape").exists()


@settings(max_examples=100, deadline=None)
@given(name=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z"))
@example(name="a..b")
@example(name="v1.2_final-run")
@example(name="x" * 100)
def test_every_accepted_sweep_name_stays_inside_its_storage(name):
    from kdarena.search.records import sweep_paths
    from kdarena.search.sweep_config import parse_sweep

    # the README's rule: letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 (all the
    # regex allows), and no '..' anywhere; a name within it is accepted, not merely never misused
    if ".." in name:
        with pytest.raises(UserError, match="name"):
            parse_sweep(_sweep_doc(name), "fuzz")
        return
    sweep = parse_sweep(_sweep_doc(name), "fuzz")
    assert sweep.name == name
    storage = Path("/srv/kdarena-storage")
    root = sweep_paths(sweep, str(storage)).root
    assert root.parent == storage and root.name == name and name not in (".", "..")


def test_preset_is_a_name_never_a_path(tmp_path):
    from kdarena.sweeps import preset_path

    assert preset_path("quickstart").name == "quickstart.yaml"
    outside = tmp_path / "outside.yaml"
    _write_yaml(outside, _sweep_doc("outside"))
    for name in ("../sweeps/quickstart", str(outside.with_suffix("")), "../../" + outside.stem, "quickstart/../quickstart"):
        with pytest.raises(UserError, match="unknown preset"):
            preset_path(name)
    _refused(_cli("sweep", "--preset", str(outside.with_suffix(""))), "unknown preset")


def test_teacher_store_names_are_hashes_whatever_the_options():
    from kdarena.training.config import DatasetConfig, TeacherConfig
    from kdarena.training.teacher_store import teacher_key

    for options in ({"channels": "../../../x"}, {"/etc/passwd": 1}, {"a": "\\..\\..\\x"}):
        key = teacher_key(TeacherConfig(arch="cnn", options=options), DatasetConfig(), load_dataset("digits"))
        assert len(key) == 20 and set(key) <= set("0123456789abcdef")


def test_leaderboard_export_file_names_are_slugs_of_any_dataset_name():
    """`kdarena leaderboard --export DIR` names files after datasets read from the (possibly shared) MLflow store."""
    from kdarena.leaderboards.render import slug as _slug

    for name in ("../../evil", "/etc/passwd", "..", ".", "a/../../b", "\\..\\x", "x\n../y", "", "~"):
        slug = _slug(name)
        assert slug and slug not in (".", "..") and "/" not in slug and "\\" not in slug and not slug.startswith(".")


def test_experiment_name_that_looks_like_a_path_writes_nothing_outside(migrated_store, tmp_path, monkeypatch):
    """The MLflow experiment name is only a name: runs and artifacts go where the store says, never to the name."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    result = _cli("train", "--json", "--set", "method.name=baseline", "--set", "train.epochs=1",
                  "--set", "experiment=../../../escape")
    assert result.exit_code == 0, result.output
    assert not (work / "../../../escape").resolve().exists()
    assert not [p for p in tmp_path.rglob("*escape*")]
    # everything written is in the store (the database and the artifacts beside it) or the teacher cache; the
    # working folder stays empty
    stores = (tmp_path / "mlflow.db", tmp_path / "mlartifacts", migrated_store)
    stray = [p for p in tmp_path.rglob("*") if p not in (tmp_path / "a", work)
             and not any(p == s or s in p.parents for s in stores)]
    assert not stray, stray
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(json.loads(result.stdout)["run_id"])
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert tmp_path / "mlartifacts" in artifacts.parents and (artifacts / "student.pt").is_file()


# -- dataset archives


def _tar(path: Path, members: list[tuple[str, str, str]], good_tree: Path | None = None) -> Path:
    """members: (kind, name, target) with kind file | symlink | hardlink."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        if good_tree is not None:
            tar.add(good_tree, arcname=".")
        for kind, name, target in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = b"evil"
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = target
                tar.addfile(info)
    return path


def test_image_tree_archive_loads(tmp_path, monkeypatch):
    from kdarena.zoo.data import load_dataset

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    archive = _tar(tmp_path / "tree.tar.gz", [], good_tree=_image_tree(tmp_path / "tree"))
    data = load_dataset("imagefolder", root=archive, val_fraction=0.2)
    assert data.num_classes == 2 and len(data.test) == 6
    assert (tmp_path / "home" / ".cache" / "kdarena" / "data" / "extracted").is_dir()


ESCAPES = {
    "dot-dot member": [("file", "../evil.png", "")],
    "deep dot-dot member": [("file", "train/cat/../../../../evil.png", "")],
    "absolute member": [("file", "ABS/evil.png", "")],
    "symlink to outside": [("symlink", "train/cat/link.png", "../../../../../evil.png")],
    "absolute symlink": [("symlink", "train/cat/passwd.png", "/etc/passwd")],
    "symlink folder then write through it": [("symlink", "train/out", "../../../.."), ("file", "train/out/evil.png", "")],
    "hardlink to outside": [("hardlink", "train/cat/hard.png", "../../../../evil.png")],
    "absolute hardlink": [("hardlink", "train/cat/hard.png", "/etc/passwd")],
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_image_tree_archive_with_members_outside_is_refused_and_writes_nothing(tmp_path, monkeypatch, case):
    from kdarena.zoo.data import load_dataset

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    absolute = tmp_path / "abs"
    members = [(k, n.replace("ABS", str(absolute)), t) for k, n, t in ESCAPES[case]]
    archive = _tar(tmp_path / "data" / "tree.tar.gz", members, good_tree=_image_tree(tmp_path / "tree"))
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(UserError) as info:
        load_dataset("imagefolder", root=archive)
    message = str(info.value)
    assert "is refused: member" in message and str(archive) in message and "\n" not in message
    created = {p for p in tmp_path.rglob("*")} - before
    # nothing but the folders down to the (empty) extraction root: no member, no leftover .partial tree
    assert all(p.is_dir() for p in created), created
    extracted = tmp_path / "home" / ".cache" / "kdarena" / "data" / "extracted"
    assert not extracted.exists() or not any(extracted.iterdir())
    assert not any(p.name.startswith("evil") for p in tmp_path.rglob("*") if "tree" not in p.parts)
    assert not absolute.exists()


def test_image_tree_archive_refusal_is_exit_2_from_the_cli(cache_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    archive = _tar(tmp_path / "tree.tar.gz", ESCAPES["symlink to outside"], good_tree=_image_tree(tmp_path / "tree"))
    _refused(_cli("train", "--set", "dataset.name=imagefolder", "--set", f"dataset.root={archive}",
                  "--set", "method.name=baseline", "--set", "train.epochs=1"), "is refused: member", "link")


# -- export file names


def _crafted_sweep_dir(tmp_path: Path, method: str, trial_name: str) -> Path:
    from kdarena.training.config import parse_config

    sweep_dir = tmp_path / "sweeps" / "crafted"
    sweep_dir.mkdir(parents=True)
    _write_yaml(sweep_dir / "sweep.yaml", _sweep_doc("crafted") | {"budget": {"epochs": 2}})
    config = parse_config({"method": {"name": "kd"}}, "x").model_dump(mode="json")
    record = {"phase": "trial", "status": "completed", "trial_name": trial_name, "run_id": "0" * 32, "method": method,
              "metrics": {"val_acc": 0.9, "test_acc": 0.8, "epochs_completed": 2, "macs": 10, "params": 10},
              "config": config}
    (sweep_dir / "records.json").write_text(json.dumps({"parent_run_id": None, "trials": {trial_name: record}}))
    return sweep_dir


@pytest.mark.parametrize("method", ["../../../evil", "x/../../../evil", "/tmp/kdarena-evil", "kd/../../evil"])
def test_export_file_names_come_from_validated_names_not_from_records(tmp_path, method):
    sweep_dir = _crafted_sweep_dir(tmp_path, method, trial_name="../../../evil-trial")
    out = tmp_path / "out" / "deeper"
    result = _cli("export", str(sweep_dir), "-o", f"{out}/")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["rank1-kd.yaml"]
    assert not [p for p in tmp_path.rglob("*evil*")] and not Path("/tmp/kdarena-evil.yaml").exists()


@pytest.mark.parametrize("damage", ["records not json", "records missing fields", "sweep.yaml tampered",
                                    "config of another shape"])
def test_damaged_sweep_results_are_refused_by_export(tmp_path, damage):
    sweep_dir = _crafted_sweep_dir(tmp_path, "kd", "t1")
    records = json.loads((sweep_dir / "records.json").read_text())
    if damage == "records not json":
        (sweep_dir / "records.json").write_text("{not json")
    elif damage == "records missing fields":
        del records["trials"]["t1"]["metrics"]
        (sweep_dir / "records.json").write_text(json.dumps(records))
    elif damage == "sweep.yaml tampered":
        (sweep_dir / "sweep.yaml").write_text("name: 5\n")
    else:
        records["trials"]["t1"]["config"] = {"student": "cnn", "method": {"name": 5}}
        (sweep_dir / "records.json").write_text(json.dumps(records))
    _refused(_cli("export", str(sweep_dir), "-o", f"{tmp_path / 'out'}/"), "damaged")
    assert not (tmp_path / "out").exists()
