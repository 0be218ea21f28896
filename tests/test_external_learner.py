"""Adding a learner (docs/learners.md): the documented linear TD(lambda) learner, written outside the
project, runs through `ccn run` (embedded Ray) and `ccn report` by its module path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "learners.md"


def documented_example() -> tuple[str, str]:
    """The worked example's learner module and spec, exactly as docs/learners.md shows them."""
    section = DOCS.read_text().split("## Adding a learner: a worked example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    spec = re.search(r"```toml\n(.*?)```", section, flags=re.DOTALL).group(1)
    return code, spec


def ccn(folder: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(folder)}  # the learner's folder, not the project's
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *arguments], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_documented_external_learner_runs_and_is_reported(tmp_path):
    code, spec = documented_example()
    assert 35 <= len(code.strip().splitlines()) <= 70  # a short module
    package = tmp_path / "my_learners"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "linear_td.py").write_text(code)
    (tmp_path / "sweep.toml").write_text(spec)

    run = ccn(tmp_path, "run", "sweep.toml", "--results", "results", "--workers", "1", "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 runs; 0 were already done, 4 ran now" in run.stdout, run.stdout
    rows = duckdb.sql(
        f"SELECT learner, learner_name, shape, step_size, lam, dtype, cost_source, flops_per_step, params, status "
        f"FROM read_parquet('{tmp_path}/results/linear-td/runs/**/*.parquet') ORDER BY step_size"
    ).fetchall()
    assert len(rows) == 4
    for row in rows:
        assert row[:3] == ("my_learners.linear_td", "my_learners.linear_td", "linear")
        assert row[4:7] == (0.9, "float32", "measured") and row[7] > 0 and row[8] == 13  # w [12] and b
        assert row[9] == "complete"
    assert {row[3] for row in rows} == {0.01, 0.001}

    report = ccn(tmp_path, "report", "results", "--spec", "sweep.toml", "--out", "report")
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| my_learners.linear_td | linear |" in text
    assert f"| {rows[0][7]:,} (measured) |" in text  # its FLOPs, marked as measured

    # on a cluster: `ccn submit` uploads the learner's package beside the project's (py_modules)
    (package / ".env").write_text("SECRET=not-for-the-cluster\n")
    dry = ccn(tmp_path, "submit", "sweep.toml", "--results", "/shared/results", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    uploaded = ("py_modules:", "working_dir:")
    listed = [line.strip() for line in dry.stdout.splitlines() if line.strip().startswith(uploaded)]
    assert "py_modules: my_learners/linear_td.py" in listed and "py_modules: my_learners/__init__.py" in listed
    assert "py_modules: orchestrator/cli.py" in listed and not any(".env" in line for line in listed)
