"""Where kdarena keeps what it computes once and reuses: $KDARENA_CACHE, else ~/.cache/kdarena."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("KDARENA_CACHE", Path.home() / ".cache" / "kdarena"))
