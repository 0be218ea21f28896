"""Ctrl-C stops `ccn run` promptly and cleanly (orchestrator.cli, api.run_sweep, schedule).

`ccn run` with its embedded local Ray, started as a script's background job in a session of its
own (`setsid ccn run ... &`: SIGINT arrives ignored), is sent SIGINT (to its process group, as
`kill -INT -- -PGID` or a terminal's Ctrl-C) once a batch has started. It must exit within
seconds with code 130 and the one line saying so and how to resume, release the sweep's lease,
leave no process of its session behind (its Ray stopped), and keep the results consistent; a
second `ccn run` without --takeover then takes the lease, and a Ctrl-C right after it took the
lease stops it just as cleanly, as does one to a third while its Ray starts (its raylet is up,
its agents are starting: `ray.shutdown` alone would leave them running).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator import api

SPEC = """
name = "interrupt"
steps = 2000000
seeds = [0, 1]
log_every = 100000
batch_size = 1

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:500"
step_size = [0.01]
"""
MESSAGE = "ccn: interrupted; rerun the same command to finish what is missing"
STOP_WITHIN = 30.0  # seconds from SIGINT to the driver's exit


def session_processes(session: int) -> dict[int, str]:
    """pid -> command line of every live process in `session` (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


def background_ccn_run(spec: Path, results: Path, env: dict) -> subprocess.Popen:
    """`setsid ccn run SPEC --workers 1 &` from a script: a session of its own, SIGINT ignored at start."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", str(results), "--workers", "1",
         "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )


def lease_holder(lease: Path) -> int | None:
    """The pid in the sweep's lease file (None: no lease, or not readable yet)."""
    try:
        return json.loads(lease.read_text()).get("pid")
    except (OSError, ValueError):
        return None


def wait_for(condition, process: subprocess.Popen, what: str, seconds: float = 180.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"`ccn run` exited ({process.returncode}) before {what}: {out}{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {seconds:.0f}s")
        time.sleep(0.1)


def interrupt_and_check(driver: subprocess.Popen, lease: Path) -> None:
    """SIGINT to the driver's process group: a prompt exit 130 with MESSAGE, the lease released,
    no process of its session left."""
    sent = time.monotonic()
    os.killpg(driver.pid, signal.SIGINT)
    try:
        _, error = driver.communicate(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`ccn run` did not stop within {STOP_WITHIN:.0f}s of SIGINT")
    took = time.monotonic() - sent
    assert driver.returncode == 130, error
    lines = [line for line in error.splitlines() if line.strip()]
    assert lines[-1] == MESSAGE and lines.count(MESSAGE) == 1, error
    assert not lease.exists(), "the sweep's lease was not released"
    deadline = time.monotonic() + 15
    while session_processes(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_processes(driver.pid) == {}, f"left behind {took:.1f}s after SIGINT"


@pytest.mark.timeout(600)  # three `ccn run` with an embedded Ray; ~1.5 minutes on a busy 2-core machine
def test_ctrl_c_stops_a_background_ccn_run_and_a_rerun_takes_the_lease(tmp_path):
    spec = tmp_path / "interrupt.toml"
    spec.write_text(textwrap.dedent(SPEC))
    results = tmp_path / "results"
    lease = results / "interrupt" / "_driver"
    env = {**os.environ, "WANDB_MODE": "disabled", "CCN_JAX_CACHE_DIR": str(tmp_path / "jax_cache")}
    drivers = []
    try:
        first = background_ccn_run(spec, results, env)
        drivers.append(first)
        batch_started = lambda: any(  # noqa: E731
            cmd.startswith("ray::BatchWorker.run_batch") for cmd in session_processes(first.pid).values()
        )
        wait_for(batch_started, first, "batch started")
        interrupt_and_check(first, lease)
        status = api.sweep_status(spec, str(results))
        assert status.failed == 0 and not status.duplicates and status.done + status.missing == status.total == 2

        second = background_ccn_run(spec, results, env)  # no --takeover: the lease must be free
        drivers.append(second)
        wait_for(lambda: lease_holder(lease) == second.pid, second, "lease taken by the second driver", seconds=60)
        interrupt_and_check(second, lease)  # Ctrl-C right after it took the lease

        third = background_ccn_run(spec, results, env)
        drivers.append(third)
        raylet_started = lambda: any("raylet" in cmd for cmd in session_processes(third.pid).values())  # noqa: E731
        wait_for(raylet_started, third, "the third driver's raylet started", seconds=120)
        interrupt_and_check(third, lease)  # Ctrl-C while it starts its Ray
        status = api.sweep_status(spec, str(results))
        assert status.failed == 0 and not status.duplicates and status.done + status.missing == status.total == 2
    finally:
        for driver in drivers:  # only what this test started: its drivers' sessions
            for pid in session_processes(driver.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if driver.poll() is None:
                driver.wait()
