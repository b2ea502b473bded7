"""The `kdarena` command line: parses arguments, delegates, prints."""

from . import deploy as _deploy  # noqa: F401  (registers `kdarena deploy` on the app)
from . import recommend as _recommend  # noqa: F401  (registers `kdarena recommend` on the app)
from .app import app, main

__all__ = ["app", "main"]
