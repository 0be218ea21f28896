"""benchmarks/datapath.py: a tiny configuration prints a table that parses, and bad flags stop before compute."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "datapath.py"


def load_module():
    spec = importlib.util.spec_from_file_location("datapath_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def number(cell: str) -> float | None:
    return None if cell == "n/a" else float(cell.replace(",", ""))


def test_a_tiny_configuration_prints_a_table_that_parses(tmp_path):
    datapath = load_module()
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # equal programs at both lengths compile once
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--runs", "4", "--steps", "20000", "30000",
         "--log-every", "5000", "10000", "--checkpoint-every", "10000"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    table = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in out.splitlines()
             if line.startswith("|") and not line.startswith("|-")]
    assert table[0] == list(datapath.COLUMNS), out
    rows = [dict(zip(table[0], row, strict=True)) for row in table[1:]]
    assert [(row["steps"], row["log_every"]) for row in rows] == [
        ("20,000", "5,000"), ("20,000", "10,000"), ("30,000", "5,000"), ("30,000", "10,000")]
    for row in rows:
        values = {name: number(cell) for name, cell in row.items()}
        assert values["wall s"] > 0 and values["process CPU s"] > 0 and values["peak RSS MB"] > 0, row
        assert values["results B"] > 0 and values["ckpts"] >= 1 and values["ckpt B"] > 0, row
        assert values["B/ckpt"] == pytest.approx(values["ckpt B"] / values["ckpts"], rel=1e-3, abs=1)
        assert values["round trips"] is None or values["round trips"] >= 1, row
    assert out.count("wall ratio log_every 5,000 / 10,000 at ") == 2, out
    assert out.count("checkpoint bytes grow ") == 2, out  # a verdict per log_every, from two lengths
    assert "load average" in out


def test_bad_flags_stop_before_any_compute(capsys):
    datapath = load_module()
    with pytest.raises(SystemExit) as stopped:
        datapath.main(["--runs", "0"])
    assert stopped.value.code == 2 and "--runs: must be positive, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:  # checkpoint_every must be a multiple of every log_every
        datapath.main(["--quick", "--checkpoint-every", "1500"])
    assert "steps 20,000, log_every 1,000" in str(stopped.value) and "checkpoint_every" in str(stopped.value)
