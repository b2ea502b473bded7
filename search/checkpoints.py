"""Trial checkpoints on storage: a resumed trial always finds the checkpoint it restores from.

Why a checkpoint could be missing: Ray Tune keeps one checkpoint per trial
(`CheckpointConfig(num_to_keep=1)`) and deletes the previous one the moment
it registers a new one, while the experiment state that `Tuner.restore`
reads is saved after that, and uploaded in the background. A driver killed
in between leaves a saved state naming a checkpoint that is gone; the
resumed trial failed ("Could not recover from checkpoint as it does not
exist on storage anymore") and a final seed was lost.

Why not turn Tune's deletion off: with `num_to_keep=1`, Tune also saves its
experiment state after every checkpoint (it forces a save once a trial has
checkpointed `num_to_keep` times since the last one); without it the saved
state falls 10 s or more behind, and a resume replays finished trials or
re-runs trials Ray never recorded. So deletion stays, and `repair` runs
before every restore: each unfinished trial gets the checkpoint its saved
state will restore it from, as a copy of the trial's newest checkpoint whose
epoch the driver has recorded, or, with none, as an empty folder (the
trial's trainable finds no `trial.pt` there and starts from scratch).
Either way it says so, and the trial never fails for it. A checkpoint
holds its epoch in `epoch` beside `trial.pt`: the worker may have written
one more checkpoint whose result the driver never processed, and resuming
from it would leave that epoch out of the record.

A stand-in also clears the decision Tune had pending for the trial. Tune
saves the decision it made on a trial's last result (`STOP` once a trial
reaches its budget or ASHA stops it) with the experiment state, and applies
it to the first result the restored trial reports: a trial that had
finished, restarted from scratch because its checkpoint was gone, was cut
after one epoch and recorded early-stopped. A trial restored from an older
point reports epochs that decision was not made on, so the scheduler
decides again.

Which checkpoint will the saved state restore from? It names the trial's
last result, whose `checkpoint_dir_name` is checkpoint k; Tune registers
that checkpoint in a separate save step after the result, so a state saved
in between restores from k − 1. The trial cannot report again before that
save is registered (Tune holds its next step until then), so the lag is one
at most: both are provided.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

STATE_GLOB = "experiment_state-*.json"
CHECKPOINT_FILE = "trial.pt"  # what a trial's checkpoint folder holds (search/trial.py writes it)
EPOCH_FILE = "epoch"  # beside it: the epochs it has done, as text


@dataclass(frozen=True)
class SavedTrial:
    trial_id: str
    status: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    folder: Path  # the trial's directory on storage
    checkpoint: str | None  # the checkpoint of its last result, e.g. checkpoint_000004


def saved_trials(experiment_dir: Path) -> list[SavedTrial] | None:
    """The trials of the experiment state Tune restores from; None when there is none or it cannot be read.

    Reads only plain fields of the file (each trial's `relative_logdir` and
    `status`, and its last result's `checkpoint_dir_name`); a file being
    written, or of another layout, reads as None and nothing is repaired.
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


def restorable(trial: SavedTrial) -> list[str]:
    """The checkpoints the saved state may restore `trial` from (see the module docstring), oldest first."""
    if trial.checkpoint is None:
        return []
    index = int(trial.checkpoint.rsplit("_", 1)[1])
    return [f"checkpoint_{i:06d}" for i in (index - 1, index) if i >= 0]


def checkpoint_epoch(folder: Path) -> int | None:
    """The epochs a trial's checkpoint folder has done; None if it holds no state (or does not say)."""
    try:
        return int((folder / EPOCH_FILE).read_text()) if (folder / CHECKPOINT_FILE).exists() else None
    except (OSError, ValueError):
        return None


def repair(experiment_dir: Path, recorded: dict[str, int]) -> list[str]:
    """Before a restore: every unfinished trial gets the checkpoints its saved state may restore it from.

    `recorded` gives each trial's last epoch in the sweep's records (by
    Tune's trial id). Returns one line per checkpoint put back, saying what
    the trial resumes from.
    """
    said = []
    stood_in = set()
    for trial in saved_trials(experiment_dir) or []:
        if trial.status == "TERMINATED":
            continue
        # taken before any stand-in is made; only checkpoints of epochs the driver recorded
        usable = sorted(p for p in trial.folder.glob("checkpoint_*")
                        if (epoch := checkpoint_epoch(p)) is not None and epoch <= recorded.get(trial.trial_id, 0))
        for name in restorable(trial):
            wanted = trial.folder / name
            if wanted.exists():
                continue
            stood_in.add(trial.trial_id)
            if usable:
                shutil.copytree(usable[-1], wanted)
                said.append(f"trial {trial.trial_id}: {name} is missing from storage; it resumes from "
                            f"{usable[-1].name} (epoch {checkpoint_epoch(usable[-1])}) instead")
            else:
                wanted.mkdir(parents=True)
                said.append(f"trial {trial.trial_id}: {name} is missing from storage and no other checkpoint of a "
                            "recorded epoch is there; it starts again from scratch")
    _drop_pending_decisions(experiment_dir, stood_in)
    return said


# where Tune's saved controller state keeps the decisions it has not carried out yet, by trial id
PENDING_DECISIONS = ("_cached_trial_decisions", "_queued_trial_decisions")


def _drop_pending_decisions(experiment_dir: Path, trial_ids: set[str]) -> None:
    """Remove `trial_ids`' pending decisions from the state Tune restores from (written whole, then renamed)."""
    if not trial_ids:
        return
    path = sorted(experiment_dir.glob(STATE_GLOB))[-1]
    try:
        state = json.loads(path.read_text())
        runner = state["runner_data"]
        dropped = [runner[field].pop(t) for field in PENDING_DECISIONS if isinstance(runner.get(field), dict)
                   for t in trial_ids if t in runner[field]]
    except (OSError, ValueError, KeyError, TypeError):
        return  # another layout: nothing to drop
    if dropped:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(state))
        os.replace(partial, path)


# Tune's state files a restore reads, each named after the driver session that wrote it
TUNE_STATE_GLOBS = (STATE_GLOB, "searcher-state-*.pkl", "search_gen_state-*.json")


def heal_state_files(experiment_dir: Path, ray_temp_dir: Path | None = None) -> list[str]:
    """Tune's state files cut short on storage, each replaced by the complete copy in the killed driver's staging
    folder; one line per file healed.

    Tune writes its state into a staging folder under Ray's temp dir (whole files, renamed into place) and copies
    it to storage file by file: a driver killed during that copy left an empty or truncated searcher state, Tune
    could not restore ("Ran out of input") and every `--resume` stopped at once. The staging copy outlives the
    driver on its machine. A damaged file with no complete copy is a UserError naming it.
    """
    from kdarena.zoo.errors import UserError

    temp = ray_temp_dir or Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"
    said = []
    for pattern in TUNE_STATE_GLOBS:
        for path in sorted(experiment_dir.glob(pattern)):
            if _whole(path):
                continue
            copies = [c for c in temp.glob(f"session_*/artifacts/*/{experiment_dir.name}/driver_artifacts/{path.name}")
                      if _whole(c)]
            if not copies:
                raise UserError(f"Ray Tune's saved state {path} is cut short (its driver was killed while it was being "
                                f"written) and no complete copy is left under {temp}; this sweep cannot be continued: "
                                "run it again under another name")
            partial = path.with_name(path.name + ".partial")
            shutil.copyfile(max(copies, key=lambda c: c.stat().st_mtime), partial)
            os.replace(partial, path)
            said.append(f"{path.name} was cut short on storage by the killed driver; restored from Ray's staging copy")
    return said


def _whole(path: Path) -> bool:
    """JSON that parses, or a pickle whose opcodes run to its STOP (read, never executed); Tune's
    `search_gen_state-*.json` is a pickle despite its name."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    try:
        json.loads(data)
        return True
    except ValueError:
        pass
    try:
        ops = list(pickletools.genops(io.BytesIO(data)))
    except ValueError:  # the bytes end before the pickle does
        return False
    return bool(ops) and ops[-1][0].name == "STOP"
