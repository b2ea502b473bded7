"""The zoo's catalogue for `kdarena models`: each model's params and MACs at its default input.

Profiling every model takes most of a minute, and the answer only changes
when the zoo's code or torch changes, so it is computed once per version of
both (keyed by the content of the zoo's model and cost code) and kept in the
cache folder; an unwritable cache only costs the time again.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .cache import cache_root


def _version_key() -> str:
    """A digest of what the catalogue depends on: torch's version and the zoo's model and cost sources."""
    digest = hashlib.sha256(torch.__version__.encode())
    package = resources.files(__package__)
    sources = [package / "cost.py", package / "catalog.py",
               *sorted((p for p in (package / "models").iterdir() if p.name.endswith(".py")), key=lambda p: p.name)]
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def catalog_path() -> Path:
    return cache_root() / "catalog" / f"models-{_version_key()}.json"


def model_catalog() -> list[dict[str, Any]]:
    """One dict per zoo model, by name: params, MACs, FLOPs, input shape, classes, summary."""
    path = catalog_path()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: profile again
        pass
    rows = profile_zoo()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rows))
        tmp.replace(path)  # whole or not at all: two processes may write it at once
    except OSError:
        pass
    return rows


def profile_zoo() -> list[dict[str, Any]]:
    """Profile every zoo model now (tens of seconds)."""
    from .cost import profile_cost
    from .models import MODELS, build_model

    rows = []
    for name, entry in sorted(MODELS.items()):
        model = build_model(name, num_classes=entry.num_classes, in_channels=entry.in_channels, input_size=entry.input_size)
        cost = profile_cost(model, in_channels=entry.in_channels, input_size=entry.input_size, latency=False)
        rows.append({"name": name, "params": cost.params, "macs": cost.macs, "flops": cost.flops,
                     "input": [entry.in_channels, entry.input_size, entry.input_size], "num_classes": entry.num_classes,
                     "summary": entry.summary})
    return rows
