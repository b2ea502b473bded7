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
than those the experiment state *on storage* may restore each trial from.

Which ones may it restore from? The state names a trial's last result,
whose `checkpoint_dir_name` is checkpoint k; Tune registers that checkpoint
as the trial's latest in a separate save step after the result, so a state
saved in between restores from k − 1. The trial cannot report again before
that save is registered (Tune holds its next step until then), so the lag is
never more than one: checkpoints k − 1 and k are kept, older ones go.

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
    states = sorted(experiment_dir.glob(STATE_GLOB))  # Tune restores from the greatest name (its timestamp)
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


def _name(index: int) -> str:
    return f"checkpoint_{index:06d}"


def restorable(trial: SavedTrial) -> list[str]:
    """The checkpoints the saved state may restore `trial` from (see the module docstring), oldest first."""
    if trial.checkpoint is None:
        return []
    index = int(trial.checkpoint.rsplit("_", 1)[1])
    return [_name(i) for i in (index - 1, index) if i >= 0]


def _checkpoints(folder: Path) -> list[Path]:
    # Tune numbers them with zero padding: the names sort in the order they were written
    return sorted(p for p in folder.glob("checkpoint_*") if p.is_dir())


def prune(experiment_dir: Path) -> int:
    """Delete each trial's checkpoints older than the one the saved state names; how many were deleted."""
    deleted = 0
    for trial in saved_trials(experiment_dir) or []:
        keep = restorable(trial)
        if not keep:  # the state names none (or its last result had none): keep them all
            continue
        for old in _checkpoints(trial.folder):
            if old.name < keep[0]:
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
        if trial.status == "TERMINATED":
            continue
        for name in restorable(trial):
            wanted = trial.folder / name
            if wanted.exists():
                continue
            older = [p for p in _checkpoints(trial.folder) if p.name < name and any(p.iterdir())]
            if older:
                shutil.copytree(older[-1], wanted)
                said.append(f"trial {trial.trial_id}: {name} is missing from storage; it resumes from "
                            f"{older[-1].name} instead")
            else:
                wanted.mkdir(parents=True)
                said.append(f"trial {trial.trial_id}: {name} is missing from storage and no older one is there; "
                            "it starts again from scratch")
    return said
