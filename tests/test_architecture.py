"""The layout ARCHITECTURE.md describes, held: which folder may import which, one home for the record's names,
no environment set at import, and `kdarena sync` without Ray Tune."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kdarena.training import record

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["zoo", "methods", "training", "search", "leaderboards", "dashboard", "cli", "sweeps"]
# what each folder must never import: kdarena's folders, and the heavy or UI libraries kept out of it
FORBIDDEN = {
    "zoo": {"methods", "training", "search", "leaderboards", "dashboard", "cli"},
    "methods": {"training", "search", "leaderboards", "dashboard", "cli"},
    "training": {"search", "leaderboards", "dashboard", "cli", "ray"},
    "search": {"dashboard", "cli"},
    "leaderboards": {"search", "dashboard", "cli", "ray", "streamlit", "torch", "methods", "zoo.models", "zoo.data"},
    "dashboard": {"search", "cli", "ray", "torch"},
}
# of training/, the read side takes only the record's vocabulary and the tracking helpers (both light)
LEADERBOARDS_MAY_IMPORT = {"training.record", "training.tracking", "zoo.errors"}


def _modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, at any depth (function-level imports count), relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
                found.append((node.lineno, f"kdarena.{name}"))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def _kdarena_part(module: str) -> str | None:
    return module.removeprefix("kdarena.") if module.startswith("kdarena.") else None


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_one_way(folder):
    broken = []
    for path in _modules(folder):
        for line, module in _imports(path):
            part = _kdarena_part(module)
            target = part if part is not None else module
            for banned in FORBIDDEN[folder]:
                if target == banned or target.startswith(banned + "."):
                    broken.append(f"{path.relative_to(REPO)}:{line} imports {module}")
            if folder == "leaderboards" and part is not None and part.split(".")[0] in ("training", "zoo") \
                    and part not in LEADERBOARDS_MAY_IMPORT:
                broken.append(f"{path.relative_to(REPO)}:{line} imports {module} (loads torch)")
    assert not broken, "\n".join(broken)


def test_nothing_imports_the_cli():
    users = [f"{p.relative_to(REPO)}:{line}" for folder in PACKAGES if folder != "cli" for p in _modules(folder)
             for line, module in _imports(p) if module == "kdarena.cli" or module.startswith("kdarena.cli.")]
    assert not users


def _record_names() -> dict[str, str]:
    """Every tag, status and distinctive metric or param name the record's vocabulary defines."""
    names = {}
    for cls in (record.Tag, record.Status):
        for attr, value in vars(cls).items():
            if attr.isupper() and isinstance(value, str):
                names[value] = f"{cls.__name__}.{attr}"
    names[record.Role.TAG] = "Role.TAG"
    # metric names that are not also plain words of configs, CLI choices or Tune results
    for attr in ("TEST_ACC", "BEST_VAL_ACC", "EPOCHS_COMPLETED", "TEACHER_VAL_ACC", "TEACHER_TEST_ACC",
                 "LATENCY_MS", "EXTRA_PARAMS", "EPOCH_SECONDS", "TRAIN_ACC", "FINAL_VAL_ACC"):
        names[getattr(record.Metric, attr)] = f"Metric.{attr}"
    for attr in ("DATASET_NAME", "METHOD_NAME", "SEED", "LR", "WEIGHT_DECAY"):
        names[getattr(record.Param, attr)] = f"Param.{attr}"
    return names


# modules that work on the leaderboard's frames, whose columns are named after the metrics they hold, and never
# read or write MLflow themselves: metric names there are column names (tags and statuses are still checked)
FRAME_ONLY = {"leaderboards/board.py", "leaderboards/render.py", "leaderboards/references.py", "leaderboards/text.py",
              "leaderboards/sweeps.py", "dashboard/views/leaderboard.py", "dashboard/views/charts.py",
              "dashboard/views/sweeps.py", "dashboard/views/__init__.py", "cli/app.py", "cli/sweep_view.py"}


def test_the_record_names_are_spelled_out_only_in_the_vocabulary():
    """A renamed tag must rename it everywhere: no module but training/record.py writes one out."""
    names = _record_names()
    metric_names = {v for v in names if not v.startswith(("kdarena.", "mlflow.")) and v not in
                    {getattr(record.Status, a) for a in vars(record.Status) if a.isupper()}}
    tag_pattern = re.compile(r"(?<![\w.])(kdarena\.[a-z_0-9]+|mlflow\.parentRunId)(?![\w.])")
    stray = []
    for folder in ("training", "search", "leaderboards", "dashboard", "cli"):
        for path in _modules(folder):
            relative = str(path.relative_to(REPO))
            if relative == "training/record.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
                    continue
                text = node.value
                if text in metric_names and relative in FRAME_ONLY:
                    continue
                if text in names:
                    stray.append(f"{path.relative_to(REPO)}:{node.lineno} {text!r} (use {names[text]})")
                for tag in tag_pattern.findall(text):  # inside SQL, filter strings and messages too
                    if tag in names:
                        stray.append(f"{path.relative_to(REPO)}:{node.lineno} {tag!r} in {text[:60]!r} "
                                     f"(use {names[tag]})")
    assert not stray, "\n".join(stray)


def test_no_module_sets_environment_variables_when_imported():
    """`os.environ[...] = ...` or `setdefault` only inside functions: set where a command starts."""
    at_import = []
    for folder in PACKAGES:
        for path in _modules(folder):
            tree = ast.parse(path.read_text())
            for node in tree.body:  # module level only; code under `def` runs when called
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                if path.name == "app.py" and folder == "dashboard":
                    continue  # Streamlit's entry script: running it is the command starting
                for sub in ast.walk(node):
                    source = ast.unparse(sub) if isinstance(sub, (ast.Call, ast.Assign)) else ""
                    if "os.environ" in source and ("setdefault" in source or isinstance(sub, ast.Assign)):
                        at_import.append(f"{path.relative_to(REPO)}:{sub.lineno} {source[:80]}")
    assert not at_import, "\n".join(at_import)


def test_comments_and_docstrings_cite_only_what_is_in_the_repository():
    # documents kept outside the repository, and the folder this checkout sits in (a machine's path) unless that is
    # the system's temp folder, which tests name on purpose (short Ray socket paths, escape attempts)
    machine = "" if REPO.parent == Path(tempfile.gettempdir()) else "|" + re.escape(f"{REPO.parent}/")
    outside = re.compile(r"design\.md|methods\.md|references\.md|the brief|\.\./shared" + machine)
    hits = []
    for folder in [*PACKAGES, "benchmarks", "tests"]:
        for path in _modules(folder):
            if path == Path(__file__).resolve():
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if outside.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{number} {line.strip()[:90]}")
    assert not hits, "\n".join(hits)


def test_modules_stay_small_or_say_why():
    long = []
    for folder in PACKAGES:
        for path in _modules(folder):
            text = path.read_text()
            if text.count("\n") > 420 and "Why this module is long" not in text[:3000]:
                long.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
    assert not long, "\n".join(long)


def test_sync_does_not_import_ray_tune(tmp_path):
    """`kdarena sync` on a sweep folder whose parent run exists: MLflow only, no Ray."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("kdarena")
    parent = client.create_run(experiment).info.run_id
    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / "records.json").write_text(json.dumps({"parent_run_id": parent, "trials": {}, "tracking_uri": uri,
                                                    "experiment_id": experiment, "status": "FINISHED"}))
    code = ("import sys\nfrom kdarena.cli import app\n"
            f"try:\n    app(['sync', {str(sweep)!r}])\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
