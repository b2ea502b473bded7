"""The teacher store: every teacher trained once, saved with its sha256, reused.

A teacher is named by a hash of what determines its weights: architecture,
options, the data it learns from (the dataset's content fingerprint, never
its name, and the validation split), and its recipe with the augmentation
it actually trains with. Two image folders are two teachers; a folder whose
files changed is new data and trains a new teacher. Its file is written
atomically and its sha256 kept beside it; a load verifies that sha256 and
reads tensors only (`weights_only=True`), so a changed or crafted file is
refused.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from kdarena.methods.engine import FitResult
from kdarena.zoo.data import Dataset
from kdarena.zoo.cache import cache_root
from kdarena.zoo.errors import UserError
from kdarena.zoo.models import StagedModel
from kdarena.zoo.models.formats import WRAPPERS, load_state, read_tensors, unwrap

from .config import DatasetConfig, TeacherConfig
from .record import Metric, Status

# 2: keyed by the dataset's content fingerprint and the resolved augmentation (1 named the dataset only)
STORE_FORMAT = 2


def default_cache_dir() -> Path:
    return cache_root() / "teachers"


def teacher_key(teacher: TeacherConfig, dataset: DatasetConfig, data: Dataset) -> str:
    """Content hash of everything that determines a trained teacher's weights."""
    identity = {
        "format": STORE_FORMAT,
        "arch": teacher.arch,
        "options": teacher.options,
        "dataset": {"fingerprint": data.fingerprint, "val_fraction": dataset.val_fraction,
                    "split_seed": dataset.split_seed, **data.reading},
        "recipe": teacher.recipe.model_dump(mode="json", exclude={"num_threads"})
        | {"augment": teacher.recipe.augment_for(data).model_dump(mode="json")},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class StoredTeacher:
    model: StagedModel
    key: str  # content hash of (arch, options, dataset, recipe, seed); "" for a user checkpoint
    sha256: str  # of the weights file
    path: Path
    val_acc: float | None
    test_acc: float | None
    trained_now: bool  # False when it came from the store or a user file


def load_weights(model: StagedModel, path: Path, expected_sha256: str | None, what: str,
                 fix: str = "the file changed since it was saved; delete it to retrain, or restore the original",
                 fmt: str = "kdarena",
                 misfit: str = "It was saved by another version of this network: delete it to retrain") -> str:
    """Load a checkpoint file into `model`; verify its sha256 before reading a byte of it as weights; return the sha256.

    `fmt` names the file's key names (`zoo.models.formats`): a stored teacher
    is kdarena's own, a user's checkpoint may be RepDistiller's, mdistiller's
    or torchvision's, found from its keys when `fmt` is "auto".
    """
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}; pass an existing weights file")
    sha = file_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise UserError(f"{what}: {path} fails its sha256 check (expected {expected_sha256[:16]}…, got {sha[:16]}…): "
                        f"{fix}")
    loaded = read_tensors(path, what, "give a state_dict saved with torch.save, or a .safetensors file")
    state = unwrap(loaded)
    if state is None:
        raise UserError(f"{what}: {path} holds a {type(loaded).__name__} with no state_dict in it (a mapping of names "
                        f"to tensors, alone or under {', '.join(map(repr, WRAPPERS))})")
    load_state(model, state, fmt, f"{what} {path}", fix=misfit)
    return sha


def _read_meta(path: Path) -> dict:
    """A stored teacher's sidecar; without a readable sha256 in it the weights beside it are not trusted."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or len(meta["sha256"]) != 64:
        raise UserError(f"stored teacher: {path} is damaged (no readable sha256); delete it and {path.stem}.pt "
                        "to retrain the teacher")
    return meta


@contextmanager
def locked(path: Path):
    """One process makes a given stored file (a teacher, its logits); others wait and then load it.

    A cache this process cannot write to (a shared read-only copy) needs no
    lock: nothing will be written to it.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# room for a few checkpoints; a disk with less fills up mid-sweep, so say so before any trial starts
MIN_FREE_BYTES = 64 * 2**20


def check_writable(path: Path, what: str = "teacher cache",
                   fix: str = "set cache_dir to a writable folder or KDARENA_CACHE") -> None:
    """`path` exists (made if need be), takes a file, and has MIN_FREE_BYTES free; else a UserError naming `what`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        free = shutil.disk_usage(path).free
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            free = 0
        else:
            raise UserError(f"{what} {path} is not writable ({exc.strerror or exc}); {fix}") from None
    if free < MIN_FREE_BYTES:
        raise UserError(f"{what} {path} is full ({free / 2**20:.1f} MiB free, kdarena needs at least "
                        f"{MIN_FREE_BYTES // 2**20} MiB); free some space, or {fix}")


def load_user_checkpoint(model: StagedModel, teacher: TeacherConfig) -> StoredTeacher:
    """`teacher.checkpoint` loaded into `model` (built from teacher.arch and options) under `teacher.format`."""
    assert teacher.checkpoint is not None
    path = Path(teacher.checkpoint).expanduser()
    # a pinned checkpoint is checked before it is loaded: a swapped file is never unpickled at all
    sha = load_weights(model, path, teacher.sha256, "teacher.checkpoint",
                       fix="it is not the file teacher.sha256 pins; point teacher.checkpoint at the original file "
                           "or drop teacher.sha256", fmt=teacher.format,
                       misfit="The file holds another network or other options: check teacher.arch and "
                              "teacher.options (they must build the network it was saved from), or teacher.format")
    return StoredTeacher(model, "", sha, path, None, None, trained_now=False)


def get_teacher(teacher: TeacherConfig, dataset: DatasetConfig, data: Dataset, cache_dir: Path,
                build: Callable[[], StagedModel], train: Callable[[StagedModel], FitResult]) -> StoredTeacher:
    """The teacher of a config: the user's checkpoint, the stored one, or trained now and stored.

    `build` makes a fresh (seeded) model, `train` trains it and returns the fit.
    """
    model = build()
    if teacher.checkpoint is not None:
        return load_user_checkpoint(model, teacher)

    key = teacher_key(teacher, dataset, data)
    weights = cache_dir / f"{key}.pt"
    meta_path = cache_dir / f"{key}.json"
    if not (meta_path.exists() and weights.exists()):
        check_writable(cache_dir)  # the teacher will be trained and stored here: find out now, not after training
    with locked(cache_dir / f"{key}.lock"):
        if meta_path.exists() and weights.exists():
            meta = _read_meta(meta_path)
            load_weights(model, weights, meta["sha256"], f"stored teacher {key}")
            scores = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
                      for v in (meta.get(Metric.VAL_ACC), meta.get(Metric.TEST_ACC))]  # None: measured again
            return StoredTeacher(model, key, meta["sha256"], weights, *scores, False)
        result = train(model)
        if result.status != Status.COMPLETED:
            raise UserError(f"the teacher diverged while training ({result.reason}); lower teacher.recipe.lr")
        sha = write_stored(weights, model.state_dict(), {
            "key": key, "arch": teacher.arch, "options": teacher.options,
            "dataset": dataset.model_dump() | {"label": data.label, "fingerprint": data.fingerprint},
            "recipe": teacher.recipe.model_dump(mode="json") | {"augment": teacher.recipe.augment_for(data).model_dump()},
            Metric.VAL_ACC: result.val_acc, Metric.TEST_ACC: result.test_acc})
        return StoredTeacher(model, key, sha, weights, result.val_acc, result.test_acc, trained_now=True)


def write_stored(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """`tensors` saved to `path` atomically, then the sidecar beside it (`meta` and the file's sha256); return the sha256.

    The sidecar last: without it the file is not "stored", and a kill in between leaves nothing trusted.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(tensors, tmp)
    os.replace(tmp, path)
    sha = file_sha256(path)
    sidecar = path.with_suffix(".json")
    tmp_meta = sidecar.with_name(sidecar.name + ".partial")
    tmp_meta.write_text(json.dumps(meta | {"sha256": sha}, indent=2))
    os.replace(tmp_meta, sidecar)
    return sha
