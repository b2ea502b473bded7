"""The `kdarena` command line: parses arguments, delegates, prints."""

from .app import app, main

__all__ = ["app", "main"]
