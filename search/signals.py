"""SIGTERM stops a sweep the way Ctrl-C does.

Kubernetes, Slurm and `ray job stop` send SIGTERM. Ray's driver handler
exits at once (and its C++ layer dumps a stack trace), so nothing was saved
in order. While a sweep runs, SIGTERM is handled as SIGINT is at that moment:
inside Ray Tune's `fit` that is Tune's own graceful stop (it saves the
experiment state), elsewhere a KeyboardInterrupt. `stopped_by_sigterm`
tells the CLI to exit 143 (128 + SIGTERM) instead of Ctrl-C's 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_received: set[int] = set()


def stopped_by_sigterm() -> bool:
    return signal.SIGTERM in _received


def _as_interrupt(signum, frame) -> None:
    _received.add(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIG_DFL / SIG_IGN: nobody handles Ctrl-C either; stop as Python's default would
        raise KeyboardInterrupt


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM acts as SIGINT; the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.discard(signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, _as_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
