"""Ctrl-C and SIGTERM in the driver: acted on once, never lost, never in the middle of the cleanup.

`install()` (the CLI's main thread) routes SIGINT and SIGTERM here. The first signal sets
`requested()` and raises KeyboardInterrupt wherever the main thread is, so a blocking step (planning,
Ray's start) stops at once. Later signals only record: the cleanup the first one started (actors
released, Ray stopped, the lease deleted) runs to its end, and the process exits 130 rather than
dying by a second SIGINT. Python drops an exception raised inside a garbage-collection callback or a
`__del__` ("Exception ignored in ..."), so the one KeyboardInterrupt can be lost there: `check()` at
the driver's polling points (the scheduler's wait loop, after Ray has started) raises it again.

Without `install()` (a library caller, the tests' own process) the flag is never set and `check()`
does nothing: KeyboardInterrupt behaves as Python's default handler makes it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested = threading.Event()


def _handle(signum, frame) -> None:
    if _requested.is_set():  # the stop is under way: let its cleanup finish
        return
    _requested.set()
    raise KeyboardInterrupt


def install() -> None:
    """SIGINT and SIGTERM stop the driver as described above (main thread only).

    Also when the process started with SIGINT ignored (`ccn run ... &` from a script, `setsid`):
    Python leaves an inherited SIG_IGN alone, so Ctrl-C or `kill -INT` would not stop the sweep.
    """
    reset()
    for signum in SIGNALS:
        signal.signal(signum, _handle)


def reset() -> None:
    """Forget a recorded stop (a process that runs several commands, e.g. a test session)."""
    _requested.clear()


def requested() -> bool:
    """Whether SIGINT or SIGTERM arrived since `install()`."""
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested: a polling point of the driver."""
    if _requested.is_set():
        raise KeyboardInterrupt


def shielded(action: Callable[[], None]) -> None:
    """Run `action` to its end although the one KeyboardInterrupt may land in it (it is then run
    again, so it must be safe to repeat), and raise that KeyboardInterrupt afterwards."""
    interrupted = False
    while True:
        try:
            action()
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt
