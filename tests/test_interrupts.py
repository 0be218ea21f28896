"""The driver's Ctrl-C handling (orchestrator.interrupts) and the stop of an interrupted Ray start
(orchestrator.schedule.stop_started_processes), in-process; tests/test_interrupt.py runs `ccn run`.

Signals go to this test process only (os.kill of its own pid), with the handlers restored after.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from orchestrator import interrupts
from orchestrator.schedule import stop_started_processes


@pytest.fixture
def installed():
    interrupts.install()  # tests/conftest.py restores the handlers and clears the flag afterwards
    yield


def deliver(signum: int) -> None:
    """Send `signum` to this process and let the main thread run its handler."""
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs at the next bytecode boundary


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_interrupts_and_later_ones_let_the_cleanup_finish(installed, signum):
    assert not interrupts.requested()
    interrupts.check()  # nothing requested: no-op
    with pytest.raises(KeyboardInterrupt):
        deliver(signum)
    assert interrupts.requested()
    cleaned = []
    deliver(signal.SIGINT)  # a second Ctrl-C during the cleanup: recorded, not raised
    deliver(signal.SIGTERM)
    cleaned.append("lease released")
    assert cleaned == ["lease released"]
    with pytest.raises(KeyboardInterrupt):  # and the polling points still see the stop
        interrupts.check()


def test_an_interrupt_that_python_drops_is_raised_at_the_next_check(installed):
    class Finalised:
        def __del__(self):
            deliver(signal.SIGINT)  # raised inside __del__: Python prints "Exception ignored" and drops it

    Finalised()
    gc.collect()
    assert interrupts.requested()
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()


def test_shielded_reruns_an_interrupted_action_then_raises(installed):
    calls = []

    def release():
        calls.append(len(calls))
        if len(calls) == 1:
            deliver(signal.SIGINT)  # the one Ctrl-C lands in the middle of the release

    with pytest.raises(KeyboardInterrupt):
        interrupts.shielded(release)
    assert calls == [0, 1]
    interrupts.shielded(release)  # nothing lands: runs once, raises nothing
    assert calls == [0, 1, 2]


def test_stop_started_processes_stops_what_was_started_since_and_its_descendants():
    sleeper = "import time; time.sleep(600)"
    tree = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); time.sleep(600)"
    unrelated = subprocess.Popen([sys.executable, "-c", sleeper])
    started = None
    try:
        before = {child.pid for child in psutil.Process().children()}
        started = subprocess.Popen([sys.executable, "-c", tree])
        deadline = time.monotonic() + 30
        while not psutil.Process(started.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = psutil.Process(started.pid).children()[0]
        stop_started_processes(before)
        assert started.poll() is not None
        assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
        assert unrelated.poll() is None  # started before: not ours to stop
    finally:
        for process in (unrelated, started):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        with contextlib.suppress(NameError, psutil.Error):
            grandchild.kill()
