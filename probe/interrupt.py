"""Cooperative Ctrl-C / SIGTERM handling for long jobs.

nnsight runs interventions in greenlets and a ``KeyboardInterrupt`` raised by the default SIGINT
handler in the middle of a trace can be lost, leaving Ctrl-C without effect. Inside
:func:`graceful_interrupts` the signal only sets a flag; long loops call :func:`check` at safe
points (between batches, facts and optimisation steps), which raises ``KeyboardInterrupt``
there. A second Ctrl-C exits at once (status 130): every finished fact is already on disk.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

_requested = threading.Event()


def requested() -> bool:
    """Whether an interrupt was requested."""
    return _requested.is_set()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if an interrupt was requested (call at safe points)."""
    if _requested.is_set():
        _requested.clear()
        raise KeyboardInterrupt


@contextlib.contextmanager
def graceful_interrupts():
    """Within the block, SIGINT/SIGTERM request a stop at the next :func:`check`; a second
    signal exits immediately with status 130. Only active in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _requested.is_set():
            sys.stderr.write("\nprobe-attack: interrupted again, exiting now\n")
            sys.stderr.flush()
            os._exit(130)
        _requested.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _requested.clear()
