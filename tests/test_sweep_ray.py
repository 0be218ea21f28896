"""Sweeps on an embedded Ray: spread over actors, exactly once, resumable, failures contained.

One local Ray (2 CPUs) serves the whole module. Runs are tiny (2,000 steps of small CCNs) and
every test uses the same two learner shapes, so the persistent compilation cache stays warm.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from orchestrator import api, cli
from orchestrator.plan import Batch
from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec

SPEC = """
name = "ray-test"
steps = 2000
seeds = [0, 1]
log_every = 1000
batch_size = 4

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:500"
step_size = [0.01, 1e38]   # 1e38 diverges within a few hundred steps

[[learners]]
kind = "ccn"
shape = "3:3:inf"
step_size = [0.01, 0.003]
"""

LONGER = """
name = "ray-resume"
steps = 20000
seeds = [0, 1, 2, 3, 4, 5]
log_every = 1000
batch_size = 1

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:500"
step_size = [0.01, 0.003]
"""


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    cache = tmp_path_factory.mktemp("jax_cache")
    os.environ["CCN_JAX_CACHE_DIR"] = str(cache)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    os.environ.pop("CCN_JAX_CACHE_DIR", None)


def write_spec(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run_rows(results: Path, sweep: str) -> list[tuple]:
    return duckdb.sql(
        f"SELECT run_key, status, step_size FROM read_parquet('{results}/{sweep}/runs/**/*.parquet')"
    ).fetchall()


def test_sweep_spreads_over_actors_completes_each_run_once_and_contains_divergence(ray_cluster, tmp_path):
    spec = write_spec(tmp_path, SPEC)
    sweep = load_spec(spec)
    results = tmp_path / "results"
    report = api.run_sweep(spec, str(results), progress=False)
    assert report.ok and report.ran == len(sweep.runs) == 8
    assert report.actors_used == 2  # two batches (one per shape) on two actors

    rows = run_rows(results, "ray-test")
    assert sorted(key for key, _, _ in rows) == sorted(run.run_key for run in sweep.runs)  # each exactly once
    statuses = {(status, step_size) for _, status, step_size in rows}
    assert statuses == {("diverged", 1e38), ("complete", 0.01), ("complete", 0.003)}
    assert report.diverged == 2
    # the diverged runs' batch-mates completed with finite metrics at every log point
    finals = duckdb.sql(
        f"""SELECT r.status, count(m.step), bool_and(isfinite(m.msre_window))
            FROM read_parquet('{results}/ray-test/runs/**/*.parquet') r
            LEFT JOIN read_parquet('{results}/ray-test/metrics/**/*.parquet') m USING (run_key)
            WHERE r.shape = '4:2:500' GROUP BY r.status ORDER BY r.status"""
    ).fetchall()
    assert finals[0][0] == "complete" and finals[0][1] == 2 * 2 and finals[0][2]
    assert finals[1][0] == "diverged" and finals[1][1] == 0  # diverged before the first log point

    again = api.run_sweep(spec, str(results), progress=False)  # nothing left: no Ray work at all
    assert again.ran == 0 and again.already_done == 8
    status = api.sweep_status(spec, str(results))
    assert (status.complete, status.diverged, status.missing, status.failed) == (6, 2, 0, 0)


def test_a_batch_that_keeps_raising_is_retried_then_reported_failed(ray_cluster, tmp_path):
    from orchestrator import schedule

    spec = write_spec(tmp_path, SPEC)
    good = load_spec(spec).runs[0]
    # 20 columns in stages of 3 cannot be built: the learner raises inside the actor every time
    config = (("columns_per_stage", 3), ("dtype", "float32"), ("steps_per_stage", 500), ("total_columns", 20))
    broken = dataclasses.replace(good, config=config)
    batch = Batch(sweep="ray-test", runs=(broken,), padded_size=1)
    results = tmp_path / "results"
    outcome = schedule.run_batches(
        [batch], str(results), "ray-test", workers=1, accelerator="cpu", max_attempts=2, compilation_cache_dir=None
    )
    assert outcome.runs_failed == 1 and outcome.runs_done == 0
    [failure] = ResultsStore(str(results), "ray-test").failures()
    assert failure["attempts"] == 2 and failure["run_keys"] == [broken.run_key]
    assert "multiple of columns_per_stage" in failure["error"]


def run_command(spec, results, address) -> list[str]:
    """`ccn run SPEC --results RESULTS --address ADDRESS --quiet` as a subprocess argv."""
    return [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", str(results),
            "--address", address, "--quiet"]


def test_driver_killed_mid_sweep_then_rerun_completes_only_the_missing_runs(ray_cluster, tmp_path):
    spec = write_spec(tmp_path, LONGER)
    total = len(load_spec(spec).runs)
    results = tmp_path / "results"
    command = run_command(spec, results, ray_cluster)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs_dir = results / "ray-resume" / "runs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if len(list(runs_dir.glob("**/*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = len(run_rows(results, "ray-resume"))
    assert 0 < done_before < total, "the driver was not killed mid-sweep; make the runs longer"

    time.sleep(2)  # let Ray reclaim the dead driver's actors
    report = api.run_sweep(spec, str(results), progress=False)
    assert report.already_done >= done_before and report.already_done + report.ran == total
    keys = [key for key, _, _ in run_rows(results, "ray-resume")]
    assert len(keys) == len(set(keys)) == total  # no duplicated rows, none missing
    metrics = f"read_parquet('{results}/ray-resume/metrics/**/*.parquet')"
    metric_rows = duckdb.sql(f"SELECT count(*), count(DISTINCT (run_key, step)) FROM {metrics}").fetchall()[0]
    assert metric_rows[0] == metric_rows[1] == total * 20


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_ctrl_c_or_kill_stops_the_driver_cleanly_keeping_what_was_written(ray_cluster, tmp_path, stop):
    spec = write_spec(tmp_path, LONGER.replace('name = "ray-resume"', 'name = "ray-interrupt"'))
    results = tmp_path / "results"
    command = run_command(spec, results, ray_cluster)
    driver = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    runs_dir = results / "ray-interrupt" / "runs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None and not list(runs_dir.glob("**/*.parquet")):
        time.sleep(0.05)
    driver.send_signal(stop)
    _, error = driver.communicate(timeout=30)
    assert driver.returncode == 130, error
    assert "interrupted; rerun the same command to finish what is missing" in error
    status = api.sweep_status(spec, str(results))
    assert status.done >= 1 and status.failed == 0 and not status.duplicates


def test_unreachable_cluster_address_is_one_clear_error_before_compute(tmp_path, capsys):
    spec = write_spec(tmp_path, SPEC)
    code = cli.main(["run", str(spec), "--results", str(tmp_path / "results"), "--address", "127.0.0.1:9"])
    assert code == 1
    assert "cannot reach the Ray cluster at '127.0.0.1:9'" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_cli_status_and_compare_read_the_results(ray_cluster, tmp_path, capsys):
    spec = write_spec(tmp_path, SPEC)
    results = str(tmp_path / "results")
    assert cli.main(["run", str(spec), "--results", results, "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["status", str(spec), "--results", results]) == 0
    assert "8 runs: 8 done (6 complete, 2 diverged), 0 missing, 0 failed" in capsys.readouterr().out
    assert cli.main(["compare", str(spec), "--results", results]) == 0
    table = capsys.readouterr().out
    assert "4:2:500" in table and "3:3:inf" in table and "step_size=0.01" in table


def test_actors_that_cannot_start_stop_the_sweep_with_the_reason(ray_cluster, tmp_path):
    """Actors that die before taking a batch (a node without the project, a broken driver) are not
    replaced forever: after a bounded number of failed starts the sweep stops and says why."""
    from orchestrator import schedule

    class Unstartable(schedule.BatchWorker):  # defined here: Ray ships it by value, its base by name
        def __init__(self, *arguments):
            raise RuntimeError("this node cannot import jaxlib")

    spec = write_spec(tmp_path, SPEC)
    batches = [Batch(sweep="ray-test", runs=(run,), padded_size=1) for run in load_spec(spec).runs[:4]]
    results = tmp_path / "results"
    outcome = schedule.run_batches(
        batches, str(results), "ray-test", workers=2, accelerator="cpu", max_attempts=3,
        compilation_cache_dir=None, worker_class=Unstartable,
    )  # fmt: skip
    assert outcome.stopped and "RuntimeError: this node cannot import jaxlib" in outcome.stopped
    started = int(outcome.stopped.split(" actors in a row died")[0])  # bounded: the limit, plus those joining
    assert schedule.MAX_FAILED_STARTS * 2 <= started <= schedule.MAX_FAILED_STARTS * 2 + 2
    assert outcome.runs_done == 0 and not outcome.interrupted
    assert not ResultsStore(str(results), "ray-test").completed_runs()  # nothing half-written
