"""Trial checkpoints on storage: every checkpoint Ray Tune's saved state names stays on disk.

Why kdarena prunes checkpoints itself: Tune's own retention
(`CheckpointConfig(num_to_keep=K)`) deletes a trial's older checkpoint the
moment it registers a new one, while the experiment state it saves on
storage (what `Tuner.restore` reads) is written later, throttled to every
10 s or more and uploaded in the background. A driver killed in between
left a saved state naming a checkpoint that no longer existed, and the
resumed trial failed ("Could not recover from checkpoint as it does not
exist on storage anymore"): a lost final seed. So Tune keeps every
checkpoint (`num_to_keep=None`), and `prune` deletes only checkpoints older
than the one the experiment state *on storage* names for each trial.

`repair` is the second line: if a checkpoint the saved state names is
missing anyway (files lost underneath), the trial restarts from its newest
older checkpoint, or from scratch, and says so, instead of failing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

STATE_GLOB = "experiment_state-*.json"


@dataclass(frozen=True)
class SavedTrial:
    trial_id: str
    status: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    folder: Path  # the trial's directory on storage
    checkpoint: str | None  # the checkpoint folder the saved state restores it from, e.g. checkpoint_000004


def saved_trials(experiment_dir: Path) -> list[SavedTrial] | None:
    """The trials of the newest experiment state on storage; None when there is none or it cannot be read.

    Reads only plain fields of the file (each trial's `relative_logdir` and
    `status`, and its last result's `checkpoint_dir_name`); a file being
    written, or of another layout, reads as None and nothing is pruned.
    """
    states = sorted(experiment_dir.glob(STATE_GLOB), key=lambda p: p.stat().st_mtime)
    if not states:
        return None
    try:
        state = json.loads(states[-1].read_text())
        out = []
        for trial_json, meta_json in state["trial_data"]:
            trial, meta = json.loads(trial_json), json.loads(meta_json)
            last = meta.get("last_result") or {}
            out.append(SavedTrial(str(trial["trial_id"]), str(trial["status"]),
                                  experiment_dir / str(trial["relative_logdir"]), last.get("checkpoint_dir_name")))
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _checkpoints(folder: Path) -> list[Path]:
    # Tune numbers them with zero padding: the names sort in the order they were written
    return sorted(p for p in folder.glob("checkpoint_*") if p.is_dir())


def prune(experiment_dir: Path) -> int:
    """Delete each trial's checkpoints older than the one the saved state names; how many were deleted."""
    trials = saved_trials(experiment_dir)
    deleted = 0
    for trial in trials or []:
        if trial.checkpoint is None:  # the state names none (or its last result had none): keep them all
            continue
        for old in _checkpoints(trial.folder):
            if old.name < trial.checkpoint:
                shutil.rmtree(old, ignore_errors=True)
                deleted += 1
    return deleted


def repair(experiment_dir: Path) -> list[str]:
    """Before a restore: give every unfinished trial the checkpoint its saved state names; say what was done.

    A missing checkpoint is replaced by a copy of the trial's newest older
    one, or by an empty folder (the trial then starts from scratch: its
    trainable finds no `trial.pt` in it).
    """
    said = []
    for trial in saved_trials(experiment_dir) or []:
        if trial.status == "TERMINATED" or trial.checkpoint is None:
            continue
        wanted = trial.folder / trial.checkpoint
        if wanted.exists():
            continue
        older = [p for p in _checkpoints(trial.folder) if p.name < trial.checkpoint]
        if older:
            shutil.copytree(older[-1], wanted)
            said.append(f"trial {trial.trial_id}: {trial.checkpoint} is missing from storage; it resumes from "
                        f"{older[-1].name} instead")
        else:
            wanted.mkdir(parents=True)
            said.append(f"trial {trial.trial_id}: {trial.checkpoint} is missing from storage and no older one is "
                        "there; it starts again from scratch")
    return said
