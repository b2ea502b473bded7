"""Example sweep files, shipped with the package; `--preset NAME` runs `NAME.yaml`."""

from __future__ import annotations

from pathlib import Path

from kdarena.zoo.errors import UserError

FOLDER = Path(__file__).resolve().parent


def presets() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def preset_path(name: str) -> Path:
    if name not in presets():  # a name, never a path: `--preset ../x` reads nothing outside this folder
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(presets())}")
    return FOLDER / f"{name}.yaml"
