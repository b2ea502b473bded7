"""The `kdarena` command line: parses arguments, delegates, prints."""

# each registers its commands on the app
from . import leaderboard as _leaderboard  # noqa: F401
from . import catalog as _catalog  # noqa: F401
from . import recommend as _recommend  # noqa: F401
from . import deploy as _deploy  # noqa: F401
from .app import app, main

__all__ = ["app", "main"]
