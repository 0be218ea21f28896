"""Checkpointed batches: a batch stopped after a checkpoint resumes from it, with identical results.

In-process (the executor alone) and on Ray (the actor's process killed with SIGKILL mid-batch,
the driver retries the batch on a new actor, which resumes from the checkpoint).
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from orchestrator import api, checkpoint
from orchestrator.execute import BatchExecutor
from orchestrator.plan import plan_batches
from orchestrator.results import ResultsStore
from orchestrator.spec import SpecError, load_spec

SPEC = """
name = "ckpt"
steps = {steps}
seeds = [0, 1]
log_every = {log_every}
checkpoint_every = {checkpoint_every}
batch_size = 4

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:{stage}"
step_size = [0.01, 0.003]
"""


def write_spec(tmp_path: Path, steps=6000, log_every=1000, checkpoint_every=2000, stage=1500) -> Path:
    path = tmp_path / "ckpt.toml"
    path.write_text(textwrap.dedent(SPEC.format(steps=steps, log_every=log_every,
                                                checkpoint_every=checkpoint_every, stage=stage)))
    return path


class Crash(RuntimeError):
    pass


class CrashingStore(ResultsStore):
    """A real results store whose process 'dies' right after its n-th checkpoint is written."""

    def __init__(self, root, sweep, crash_after: int):
        super().__init__(root, sweep)
        self.crash_after, self.written = crash_after, 0

    def write_checkpoint(self, batch_key, data):
        super().write_checkpoint(batch_key, data)
        self.written += 1
        if self.written == self.crash_after:
            raise Crash(f"killed after checkpoint {self.written}")


@pytest.fixture(scope="module")
def executor():
    """One executor for the in-process tests: the tiny program compiles once."""
    return BatchExecutor()


def comparable(rows):
    """Metric rows as sortable tuples (floats exactly as computed)."""
    return sorted(tuple(sorted(row.items())) for row in rows)


def test_a_batch_stopped_after_a_checkpoint_resumes_from_it_with_identical_results(tmp_path, executor):
    sweep = load_spec(write_spec(tmp_path))
    [batch] = plan_batches(sweep.name, sweep.runs, workers=1, batch_size=4)
    reference_runs, reference_metrics = executor.run(batch)  # no store: never checkpoints

    store = CrashingStore(str(tmp_path / "results"), sweep.name, crash_after=2)  # at steps 2000 and 4000
    with pytest.raises(Crash):
        executor.run(batch, checkpoints=store, checkpoint_every=sweep.checkpoint_every)
    saved = checkpoint.decode(store.read_checkpoint(batch.batch_key))
    assert saved.steps_done == 4000 and saved.run_keys == [run.run_key for run in batch.runs]

    runs, metrics = executor.run(batch, attempt=2, checkpoints=store, checkpoint_every=sweep.checkpoint_every)
    assert [row["resumed_from_step"] for row in runs] == [4000] * 4  # only 2,000 of 6,000 steps recomputed
    assert comparable(metrics) == comparable(reference_metrics)  # every log point, bitwise
    assert [row["status"] for row in runs] == [row["status"] for row in reference_runs]
    assert len(metrics) == 4 * 6


def test_a_checkpoint_of_another_program_is_ignored(tmp_path, executor):
    sweep = load_spec(write_spec(tmp_path))
    [batch] = plan_batches(sweep.name, sweep.runs, workers=1, batch_size=4)
    store = ResultsStore(str(tmp_path / "results"), sweep.name)
    stale = checkpoint.Checkpoint(
        batch_key=batch.batch_key, run_keys=[run.run_key for run in batch.runs], padded_size=4, steps_done=2000,
        structure="not this program", leaves=[np.zeros(3)], diverged_at=np.full(4, -1),
    )
    store.write_checkpoint(batch.batch_key, checkpoint.encode(stale))
    runs, metrics = executor.run(batch, checkpoints=store)
    assert all(row["resumed_from_step"] is None for row in runs) and len(metrics) == 4 * 6
    store.write_checkpoint(batch.batch_key, b"garbage")
    runs, _ = executor.run(batch, checkpoints=store)
    assert all(row["resumed_from_step"] is None for row in runs)


def test_planning_keeps_a_checkpointed_batch_whole_and_cleanup_removes_finished_ones(tmp_path, executor):
    sweep = load_spec(write_spec(tmp_path))
    runs = list(sweep.runs)
    kept_keys = [runs[3].run_key, runs[0].run_key]
    batches = plan_batches(sweep.name, runs, workers=2, batch_size=1, resumable=[(kept_keys, 2)])
    kept = [b for b in batches if len(b.runs) == 2]
    assert len(kept) == 1 and [r.run_key for r in kept[0].runs] == kept_keys and kept[0].padded_size == 2
    assert sorted(r.run_key for b in batches for r in b.runs) == sorted(r.run_key for r in runs)
    # a checkpoint naming a run that is no longer to do (done meanwhile) is not used
    batches = plan_batches(sweep.name, runs[1:], workers=2, batch_size=1, resumable=[(kept_keys, 2)])
    assert all(len(b.runs) == 1 for b in batches)

    store = ResultsStore(str(tmp_path / "results"), sweep.name)
    [batch] = plan_batches(sweep.name, runs, workers=1, batch_size=4)
    runs_table, metrics_table = executor.tables(batch)
    store.write_checkpoint(batch.batch_key, b"left over by a crash after the runs file was written")
    store.write_checkpoint("0" * 32, b"an unfinished batch's checkpoint")
    store.write_batch(batch.learner, batch.task, batch.batch_key, runs_table, metrics_table)
    assert store.remove_orphans() == 1
    assert store.checkpoint_keys() == ["0" * 32]


def test_checkpoint_every_is_validated(tmp_path):
    with pytest.raises(SpecError, match="checkpoint_every: must be a multiple of log_every"):
        load_spec(write_spec(tmp_path, checkpoint_every=1500))
    assert load_spec(write_spec(tmp_path, checkpoint_every=0)).checkpoint_every == 0
    auto = write_spec(tmp_path, steps=3_000_000, log_every=100_000).read_text().replace(
        "checkpoint_every = 2000", 'checkpoint_every = "auto"')
    (tmp_path / "auto.toml").write_text(auto)
    assert load_spec(tmp_path / "auto.toml").checkpoint_every == 1_000_000


# -- on Ray: the actor's process is killed after a checkpoint ---------------------------------


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _batch_worker_pids() -> list[int]:
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if command.startswith(b"ray::BatchWorker"):
            pids.append(pid)
    return pids


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import ray

    os.environ["CCN_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    os.environ.pop("CCN_JAX_CACHE_DIR", None)


def test_an_actor_killed_after_a_checkpoint_is_replaced_and_the_batch_resumes(local_ray, tmp_path):
    spec = write_spec(tmp_path, steps=120_000, log_every=10_000, checkpoint_every=20_000, stage=50_000)
    reference = api.run_sweep(spec, str(tmp_path / "reference"), progress=False)  # warms the compile cache
    assert reference.ok and reference.resumed_batches == 0

    results = tmp_path / "results"
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(report=api.run_sweep(spec, str(results), progress=False)))
    driver.start()
    checkpoints = results / "ckpt" / "checkpoints"
    killed = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.is_alive() and killed is None:
        if list(checkpoints.glob("*.ckpt")):
            for pid in _batch_worker_pids():
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.02)
    driver.join(timeout=300)
    assert killed is not None, "no checkpoint appeared while the batch ran; make the runs longer"
    report = outcome["report"]
    assert report.ok and report.ran == 4 and report.resumed_batches == 1
    assert report.preempted >= 1  # a killed actor is a preemption: the batch's try is not used up

    runs = f"read_parquet('{results}/ckpt/runs/**/*.parquet')"
    rows = duckdb.sql(f"SELECT count(*), count(DISTINCT run_key), min(attempt), min(resumed_from_step) FROM {runs}")
    [(count, distinct, attempt, resumed_from)] = rows.fetchall()
    assert count == distinct == 4 and attempt == 1 and resumed_from >= 20_000
    query = "SELECT run_key, step, msre_window, msre_interval FROM read_parquet('{}/ckpt/metrics/**/*.parquet')"
    query += " ORDER BY 1, 2"
    assert duckdb.sql(query.format(results)).fetchall() == duckdb.sql(query.format(tmp_path / "reference")).fetchall()
    assert not list(checkpoints.glob("*.ckpt"))  # the finished batch's checkpoint is gone
