"""A gymnasium task from a spec (`kind = "gym"`): a tiny CartPole sweep, `ccn run` on the embedded Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
name = "gym-cartpole"
steps = 400
seeds = [0, 1]
log_every = 200

[[tasks]]
kind = "gym"
env_id = "CartPole-v1"
gamma = 0.9
window = 200

[[learners]]
kind = "ccn"
shape = "2:2:inf"
step_size = 0.01

[[learners]]
kind = "tbptt"
shape = "2:3"
step_size = 0.001
"""


def test_a_cartpole_sweep_runs_end_to_end(tmp_path):
    spec = tmp_path / "gym.toml"
    spec.write_text(textwrap.dedent(SPEC))
    results = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", str(results), "--workers", "1",
         "--quiet"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "4 runs; 0 were already done, 4 ran now (0 diverged in all), 0 failed" in completed.stdout
    runs = duckdb.sql(
        f"SELECT learner_name, task, task_kind, n_inputs, status, task_params "
        f"FROM read_parquet('{results}/gym-cartpole/runs/**/*.parquet') ORDER BY learner_name"
    ).fetchall()
    assert [row[:5] for row in runs] == [("columnar", "gym-CartPole-v1-random", "gym", 4, "complete")] * 2 + [
        ("tbptt", "gym-CartPole-v1-random", "gym", 4, "complete")] * 2
    assert '"env_id": "CartPole-v1"' in runs[0][5] and '"gamma": 0.9' in runs[0][5]
    metrics = duckdb.sql(
        f"SELECT step, msre_window, msre_interval, msre_episode "
        f"FROM read_parquet('{results}/gym-cartpole/metrics/**/*.parquet')"
    ).fetchall()
    assert sorted({row[0] for row in metrics}) == [200, 400] and len(metrics) == 8
    assert all(value is not None and value >= 0 for row in metrics for value in row[1:])  # episodic measures too
