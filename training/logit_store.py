"""A stored teacher's logits on a training split, kept beside the teacher store for every later run and sweep.

Named by a hash of everything that decides their bits: the teacher's weights
(sha256) and what builds it, the data (content fingerprint and the validation
split), the normalisation, and the engine's path (`methods.teacher_logits.LogitPath`:
device, dtype, memory format, batch size, threads, torch). Written and
verified as stored teachers are (atomic file, sha256 in a sidecar written
last, tensors-only load, one writer at a time); but a file that fails a check
is derived data, not a teacher: it is computed again, with a message, and
replaced, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from kdarena.methods.engine import compute_teacher_logits, logit_path
from kdarena.methods.execution import Execution
from kdarena.methods.teacher_logits import TeacherLogits
from kdarena.zoo.data import Dataset
from kdarena.zoo.errors import UserError
from kdarena.zoo.models.formats import read_tensors

from .config import TrainConfig
from .teacher_store import StoredTeacher, file_sha256, locked, write_stored

LOGITS_FORMAT = 1
FOLDER = "logits"  # under the teacher store


def logits_key(teacher: StoredTeacher, cfg: TrainConfig, data: Dataset, execution: Execution) -> str:
    """Content hash of everything that decides the bits of `cfg`'s teacher's logits on `data`'s training split."""
    identity = {
        "format": LOGITS_FORMAT,
        "teacher": {"sha256": teacher.sha256, "arch": cfg.teacher.arch, "options": cfg.teacher.options,
                    "format": cfg.teacher.format},
        "dataset": {"fingerprint": data.fingerprint, "val_fraction": cfg.dataset.val_fraction,
                    "split_seed": cfg.dataset.split_seed, "mean": data.mean, "std": data.std, **data.reading},
        "path": asdict(logit_path(cfg.train, execution)),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def stored_teacher_logits(teacher: StoredTeacher, cfg: TrainConfig, data: Dataset, execution: Execution,
                          cache_dir: Path, say: Callable[[str], None]) -> TeacherLogits:
    """`teacher`'s logits on `data`'s training split as a fit of `cfg` under `execution` computes them: from the
    store when there and intact, else computed now and stored (`say` tells why a stored file was not used)."""
    key = logits_key(teacher, cfg, data, execution)
    path = cache_dir / FOLDER / f"{key}.pt"
    with locked(path.with_suffix(".lock")):
        if path.exists() or path.with_suffix(".json").exists():
            logits, damage = _load(path, (len(data.train), data.num_classes))
            if logits is not None:
                return TeacherLogits(logits, logit_path(cfg.train, execution))
            say(f"stored teacher logits {path}: {damage}; computing them again")
        computed = compute_teacher_logits(teacher.model, data, cfg.train, execution)
        try:
            write_stored(path, {"logits": computed.logits.cpu()},
                         {"key": key, "teacher_sha256": teacher.sha256, "fingerprint": data.fingerprint,
                          "path": asdict(computed.path)})
        except OSError:
            pass  # a read-only store: these logits serve this run, and the next computes them again
        return computed


def _load(path: Path, shape: tuple[int, int]) -> tuple[torch.Tensor | None, str]:
    """(the stored logits, "") if the file passes every check, else (None, what is wrong with it)."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        return None, "its sidecar is missing or unreadable (no sha256)"
    if not path.is_file():
        return None, "the logits file beside its sidecar is missing"
    if file_sha256(path) != meta["sha256"]:
        return None, "it fails its sha256 check (changed or truncated)"
    try:  # tensors only: a crafted pickle is refused here, never run
        state = read_tensors(path, "stored teacher logits", "")
    except UserError:
        return None, "it is not a tensors-only file"
    logits = state.get("logits") if isinstance(state, dict) else None
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or tuple(logits.shape) != shape:
        return None, f"it holds no {shape[0]}×{shape[1]} floating-point logits"
    return logits, ""
