"""CPU actors claim distinct cores machine-wide; a dead actor's core is free again."""

from __future__ import annotations

import os
import subprocess
import sys
import time

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
