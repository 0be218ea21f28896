"""CPU actors claim distinct cores machine-wide; a dead actor's core is free again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

CLAIM = """
import os, sys, time
from orchestrator.schedule import claim_core
core = claim_core(sys.argv[1])
print(core if core is None else f"{core} {sorted(os.sched_getaffinity(0))}", flush=True)
time.sleep(60)
"""


def start_claim(lock_dir) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", CLAIM, str(lock_dir)], stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def test_each_process_pins_itself_to_a_core_no_other_holds(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    holders = []
    try:
        for _ in cores:
            holders.append(start_claim(tmp_path))
        claimed = [line.split(" ", 1) for _, line in holders]
        assert sorted(int(core) for core, _ in claimed) == cores  # every core once
        assert all(affinity == f"[{core}]" for core, affinity in claimed)  # each pinned to its own
        extra, line = start_claim(tmp_path)
        holders.append((extra, line))
        assert line == "None"  # no core left: not pinned
        first, first_line = holders[0]
        first.kill()
        first.wait()
        time.sleep(0.1)
        again, line = start_claim(tmp_path)  # the kernel dropped the dead process's lock
        holders.append((again, line))
        assert line.split(" ", 1)[0] == first_line.split(" ", 1)[0]
    finally:
        for process, _ in holders:
            process.kill()
            process.wait()


def test_a_lock_problem_never_stops_the_process_it_only_stays_unpinned(tmp_path):
    """A lock folder that is a file, a symlink, or another user's: no exception, no pinning, nothing written."""
    from orchestrator.schedule import claim_core

    before = os.sched_getaffinity(0)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert claim_core(str(blocker)) is None  # not a folder (the old code raised from outside its try)
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert claim_core(str(link)) is None  # a planted symlink is not followed
    assert list(target.iterdir()) == []
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    assert claim_core(str(open_to_all)) is None and list(open_to_all.iterdir()) == []
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        assert claim_core(str(theirs)) is None and list(theirs.iterdir()) == []
    assert os.sched_getaffinity(0) == before


CLAIM_AS = """
import fcntl, os, stat, sys  # fcntl: imported before the user change (the interpreter may be private)
from orchestrator import schedule
schedule.CORE_LOCK_BASE = sys.argv[1]
if len(sys.argv) > 2:  # become another user (effective ids), as a second user's actor would be
    os.setegid(int(sys.argv[2]))
    os.seteuid(int(sys.argv[2]))
core = schedule.claim_core()
folder = os.path.join(sys.argv[1], f"ccn-sweeps-cores-{os.geteuid()}")
info = os.lstat(folder)
print(core, oct(stat.S_IMODE(info.st_mode)), info.st_uid, flush=True)
"""


def test_each_user_gets_a_private_lock_folder_and_a_second_user_still_pins():
    """Two users on one machine: each claims a core in its own 0700 folder (no PermissionError)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second user")
    base = tempfile.mkdtemp(prefix="ccn-pin-")  # like /tmp: anyone may create a folder in it
    os.chmod(base, 0o1777)
    env = {key: value for key, value in os.environ.items() if key != "CCN_CORE_LOCK_DIR"}
    try:
        first = subprocess.run([sys.executable, "-c", CLAIM_AS, base], capture_output=True, text=True, env=env)
        second = subprocess.run(
            [sys.executable, "-c", CLAIM_AS, base, "65534"], capture_output=True, text=True, env=env
        )
        assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
        core, mode, owner = first.stdout.split()
        assert core != "None" and mode == "0o700" and owner == "0"
        core, mode, owner = second.stdout.split()
        assert core != "None" and mode == "0o700" and owner == "65534"  # its own folder, not root's
    finally:
        shutil.rmtree(base)
