"""Checkpoints saved by other code bases, loaded into the zoo's networks.

The CIFAR teachers people reuse were trained by RepDistiller and mdistiller
(the same model code, so the same key names), or are torchvision's; a timm
network's own state_dict (`model.state_dict()` of `timm.create_model`) loads
into `arch: timm/NAME`. The zoo
defines the same networks layer for layer under its own key names; each
family says how the reference names become its own (`StagedModel.
REFERENCE_RENAMES`) or that its names are torchvision's (`TORCHVISION_KEYS`).
This module unwraps what trainers save around a state_dict, detects the
format from the key names (or takes the one given), renames, and refuses a
file that does not fit with the keys that differ and their shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UserError
from .base import StagedModel

FORMATS = ("auto", "kdarena", "repdistiller", "mdistiller", "torchvision", "timm")
# what trainers save around the weights: RepDistiller {epoch, model, best_acc, optimizer}, mdistiller {model},
# Lightning-style {state_dict}, pytorch-cifar {net, acc, epoch}
WRAPPERS = ("model", "state_dict", "net")
_SHOWN = 3  # keys named per kind of mismatch; the rest are counted


def read_tensors(path: Path, what: str, fix: str) -> object:
    """A weights file's contents, tensors only: never a pickled object that could run code. `.safetensors` (the
    format timm's and the Hugging Face hub's weights come in) or a `torch.save` file; a UserError naming `what`,
    the file and then `fix` otherwise."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{what} '{path}' is a .safetensors file and reading one needs the safetensors package: "
                            "pip install safetensors (it comes with kdarena[timm])") from None
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # a truncated or foreign file: safetensors raises its own error types
            raise UserError(f"{what} '{path}' cannot be read as safetensors ({type(exc).__name__}); {fix}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for crafted pickles, RuntimeError for truncated zips, …
        # not torch's own text: it spans lines and suggests weights_only=False, which would run a crafted file's code
        raise UserError(f"{what} '{path}' is not a loadable weights file ({type(exc).__name__}; kdarena loads tensors "
                        f"only, never pickled objects); {fix}") from None


def unwrap(obj: object) -> dict[str, torch.Tensor] | None:
    """The state_dict inside a loaded checkpoint (wrappers opened, `module.`/`student.` prefixes stripped), or None."""
    for _ in range(len(WRAPPERS)):
        if not isinstance(obj, Mapping) or _is_state_dict(obj):
            break
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        return None
    state = dict(obj)
    # DataParallel / DDP prefix every key with `module.`; mdistiller's trainer saves its network as `student.`
    # inside the distiller (a vanilla run's checkpoint holds nothing else)
    while prefix := next((p for p in ("module.", "student.") if all(k.startswith(p) for k in state)), None):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def formats_of(model: StagedModel) -> list[str]:
    """The formats `model`'s family can be loaded from (kdarena's own always)."""
    found = ["kdarena"]
    if model.REFERENCE_RENAMES is not None:
        found += ["repdistiller", "mdistiller"]
    if model.TORCHVISION_KEYS:
        found.append("torchvision")
    if model.TIMM_KEYS_UNDER is not None:
        found.append("timm")
    return found


def _renamed(model: StagedModel, state: dict[str, torch.Tensor], fmt: str) -> dict[str, tuple[str, torch.Tensor]]:
    """{this model's key: (the file's key, tensor)} under `fmt`'s names."""
    rules = model.REFERENCE_RENAMES if fmt in ("repdistiller", "mdistiller") else ()
    prefix = model.TIMM_KEYS_UNDER if fmt == "timm" else ""
    out = {}
    for key, tensor in state.items():
        new = prefix + key
        for pattern, replacement in rules or ():
            new = re.sub(pattern, replacement, new)
        out[new] = (key, tensor)
    return out


def _mismatch(own: dict[str, torch.Tensor], renamed: dict[str, tuple[str, torch.Tensor]]) -> list[str]:
    """What keeps the renamed file from loading, one phrase per kind; empty when it fits."""
    # checkpoints from PyTorch < 0.4.1 have no BN step counters; they hold no weights
    missing = [k for k in own if k not in renamed and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in renamed if k not in own]
    wrong = [k for k in own if k in renamed and renamed[k][1].shape != own[k].shape]

    def listed(keys: list[str], show) -> str:
        more = f", … {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
        return ", ".join(show(k) for k in keys[:_SHOWN]) + more

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (the model's {listed(missing, lambda k: f'{k} {_shape(own[k])}')})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (the file's "
                        f"{listed(unexpected, lambda k: f'{renamed[k][0]} {_shape(renamed[k][1])}')})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (file vs model: "
                        f"{listed(wrong, lambda k: f'{k} {_shape(renamed[k][1])} vs {_shape(own[k])}')})")
    return problems


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def load_state(model: StagedModel, state: dict[str, torch.Tensor], fmt: str, what: str, fix: str) -> str:
    """Load a checkpoint's `state` into `model` under format `fmt` ("auto": the one whose keys fit); return it.

    A UserError starting with `what` names the format tried and the first
    missing, unexpected and wrongly shaped keys with their shapes, then `fix`.
    """
    if fmt not in FORMATS:
        raise UserError(f"{what}: unknown checkpoint format '{fmt}'; use one of {', '.join(FORMATS)}")
    family = type(model).__name__
    usable = formats_of(model)
    if fmt != "auto" and fmt not in usable:
        raise UserError(f"{what}: {family} has no '{fmt}' format (no such network there); "
                        f"use one of {', '.join(['auto'] + usable)}")
    # mdistiller's names are RepDistiller's and torchvision's (where usable) kdarena's own: try each naming once
    tried = [f for f in usable if f not in ("mdistiller", "torchvision")] if fmt == "auto" else [fmt]
    own = model.state_dict()
    closest: tuple[int, str, list[str]] | None = None  # (keys in common, format, problems)
    for candidate in tried:
        renamed = _renamed(model, state, candidate)
        problems = _mismatch(own, renamed)
        if not problems:
            model.load_state_dict({k: t for k, (_, t) in renamed.items()}, strict=False)
            return candidate
        common = sum(1 for k in renamed if k in own)
        if closest is None or common > closest[0]:
            closest = (common, candidate, problems)
    assert closest is not None
    _, candidate, problems = closest
    if {k.split(".", 1)[0] for k in state} >= {"student", "teacher"}:
        fix = ("It holds a whole distiller (mdistiller's latest/best files keep the student and the teacher): give "
               "the one network's own file (mdistiller's student_best, or the teacher checkpoint it started from)")
    how = (f"as a '{candidate}' checkpoint (format auto: the closest of {', '.join(tried)})" if fmt == "auto"
           else f"as a '{fmt}' checkpoint")
    raise UserError(f"{what}: its keys do not fit {family} {how}: {'; '.join(problems)}. {fix}")
