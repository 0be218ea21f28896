"""Checkpointed batches: a batch stopped after a checkpoint resumes from it, with identical results.

In-process (the executor alone) and on Ray (the actor's process killed with SIGKILL mid-batch,
the driver retries the batch on a new actor, which resumes from the checkpoint).
"""

from __future__ import annotations

import io
import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from orchestrator import api, checkpoint
from orchestrator.execute import CHUNK_TARGET_STEPS, BatchExecutor
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
    """A real results store whose process 'dies' right after its n-th checkpoint (or segment) is written."""

    def __init__(self, root, sweep, crash_after: int, crash_on: str = "checkpoint"):
        super().__init__(root, sweep)
        self.crash_after, self.crash_on, self.written = crash_after, crash_on, 0
        self.checkpoints: list[bytes] = []  # every checkpoint written, in order
        self.segment_bytes: list[int] = []  # the size of every segment written

    def write_segment(self, batch_key, name, metrics):
        written = super().write_segment(batch_key, name, metrics)
        self.segment_bytes.append(Path(self.segment_path(batch_key, name)).stat().st_size)
        self._maybe_crash("segment")
        return written

    def write_checkpoint(self, batch_key, data):
        written = super().write_checkpoint(batch_key, data)
        self.checkpoints.append(data)
        self._maybe_crash("checkpoint")
        return written

    def _maybe_crash(self, what):
        if what == self.crash_on:
            self.written += 1
            if self.written == self.crash_after:
                raise Crash(f"killed after {what} {self.written}")


@pytest.fixture(scope="module")
def executor():
    """One executor for the in-process tests: the tiny program compiles once per log points per call."""
    made = BatchExecutor()
    yield made
    made.chunk_target_steps = CHUNK_TARGET_STEPS


@pytest.fixture(scope="module")
def reference(tmp_path_factory, executor):
    """The uninterrupted batch (no store: never checkpoints), one log point per call: (sweep, batch, runs, metrics)."""
    sweep = load_spec(write_spec(tmp_path_factory.mktemp("reference")))
    [batch] = plan_batches(sweep.name, sweep.runs, workers=1, batch_size=4)
    per_call(executor, 1)
    runs, metrics = executor.run(batch)
    return sweep, batch, runs, metrics


def per_call(executor, log_points: int) -> None:
    """Make the executor advance `log_points` log points per call (log_every = 1000; 6 log points)."""
    executor.chunk_target_steps = 1000 * log_points


def header_bytes(data: bytes) -> bytes:
    with np.load(io.BytesIO(data)) as archive:
        return archive["header"].tobytes()


@pytest.mark.parametrize("crashed_per_call, crash_after, resumed_at, resumed_per_call", [
    (1, 2, 4000, 1),  # checkpoints at 2000 and 4000
    (3, 1, 3000, 3),  # calls end at 3000 and 6000: the checkpoint due at 2000 is taken at 3000
    (1, 2, 4000, 3),  # resumed with another chunking: the last 2 log points in one call
])
def test_a_batch_stopped_after_a_checkpoint_resumes_from_it_with_identical_results(
        tmp_path, executor, reference, crashed_per_call, crash_after, resumed_at, resumed_per_call):
    sweep, batch, reference_runs, reference_metrics = reference
    store = CrashingStore(str(tmp_path / "results"), sweep.name, crash_after=crash_after)
    per_call(executor, crashed_per_call)
    with pytest.raises(Crash):
        executor.run(batch, checkpoints=store, checkpoint_every=sweep.checkpoint_every)
    saved = checkpoint.decode(store.read_checkpoint(batch.batch_key))
    assert saved.steps_done == resumed_at and saved.run_keys == [run.run_key for run in batch.runs]
    assert len(saved.segments) == crash_after and store.list_segments(batch.batch_key) == sorted(saved.segments)

    per_call(executor, resumed_per_call)
    runs, metrics = executor.run(batch, attempt=2, checkpoints=store, checkpoint_every=sweep.checkpoint_every)
    assert [row["resumed_from_step"] for row in runs] == [resumed_at] * 4  # only the rest recomputed
    assert metrics.equals(reference_metrics, check_metadata=True)  # every log point, bitwise, in order
    assert [row["status"] for row in runs] == [row["status"] for row in reference_runs]
    assert metrics.num_rows == 4 * 6
    store.delete_checkpoint(batch.batch_key)  # its segments go with it
    assert store.read_checkpoint(batch.batch_key) is None and store.list_segments(batch.batch_key) == []
    assert not Path(store.segment_dir(batch.batch_key)).exists()


def test_segments_hold_each_metric_row_once_and_unlisted_or_missing_ones_are_not_trusted(
        tmp_path, executor, reference):
    sweep, batch, _, reference_metrics = reference
    per_call(executor, 1)
    store = CrashingStore(str(tmp_path / "results"), sweep.name, crash_after=5, crash_on="segment")
    with pytest.raises(Crash):  # the 5th segment (rows of step 5000) is written, its checkpoint never is
        executor.run(batch, checkpoints=store, checkpoint_every=1000)
    saved = checkpoint.decode(store.read_checkpoint(batch.batch_key))
    assert saved.steps_done == 4000 and saved.segments == ["1000-1000", "2000-2000", "3000-3000", "4000-4000"]
    assert "5000-5000" in store.list_segments(batch.batch_key)  # left by the crash, named by no checkpoint
    segments = [store.read_segment(batch.batch_key, name) for name in saved.segments]
    assert all(segment.num_rows == 4 for segment in segments)  # only the rows since the previous checkpoint
    assert pa.concat_tables(segments).equals(reference_metrics.slice(0, 16))

    # bytes grow linearly with the run: a checkpoint's header adds one segment name, never the rows so far
    # (its numbers, e.g. compute_seconds 9.87 -> 10.02 on a loaded machine, may gain a digit or two)
    headers = [len(header_bytes(data)) for data in store.checkpoints]
    numbers = [sum(len(json.dumps(value)) for key, value in json.loads(header_bytes(data)).items()
                   if isinstance(value, int | float)) for data in store.checkpoints]
    growth = [(size - digits) - (headers[0] - numbers[0]) for size, digits in zip(headers, numbers, strict=True)]
    assert len(headers) == 4 and growth == [0, 13, 26, 39] and headers[-1] < 2000, (headers, numbers)
    assert len('"4000-4000", ') == 13
    assert max(store.segment_bytes) < 1.2 * min(store.segment_bytes)

    runs, metrics = executor.run(batch, attempt=2, checkpoints=store, checkpoint_every=0)
    assert [row["resumed_from_step"] for row in runs] == [4000] * 4
    assert metrics.equals(reference_metrics, check_metadata=True)

    Path(store.segment_path(batch.batch_key, "2000-2000")).unlink()  # a segment it names is gone: start over
    runs, metrics = executor.run(batch, attempt=3, checkpoints=store, checkpoint_every=0)
    assert all(row["resumed_from_step"] is None for row in runs)
    assert metrics.equals(reference_metrics, check_metadata=True)


def test_a_checkpoint_of_the_old_format_is_not_resumed(tmp_path, executor, reference, monkeypatch):
    sweep, batch, _, reference_metrics = reference
    per_call(executor, 1)
    store = CrashingStore(str(tmp_path / "results"), sweep.name, crash_after=1)
    with pytest.raises(Crash):
        executor.run(batch, checkpoints=store, checkpoint_every=2000)
    saved = checkpoint.decode(store.read_checkpoint(batch.batch_key))
    monkeypatch.setattr(checkpoint, "FORMAT", 1)
    store.write_checkpoint(batch.batch_key, checkpoint.encode(saved))  # the same state, stamped format 1
    monkeypatch.undo()
    with pytest.raises(ValueError, match="format 1"):
        checkpoint.decode(store.read_checkpoint(batch.batch_key))
    runs, metrics = executor.run(batch, checkpoints=store)
    assert all(row["resumed_from_step"] is None for row in runs)
    assert metrics.equals(reference_metrics, check_metadata=True)


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


UORO_SPEC = """
name = "ckpt-uoro"
steps = 4000
seeds = [0, 1]
log_every = 1000
checkpoint_every = 2000

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "uoro"
shape = "3"
step_size = 1e-3
"""


def test_a_learner_state_holding_a_prng_key_checkpoints_and_resumes(tmp_path):
    """UORO keeps a typed PRNG key in its state: a checkpoint stores its key data and a resume rewraps it."""
    path = tmp_path / "uoro.toml"
    path.write_text(textwrap.dedent(UORO_SPEC))
    sweep = load_spec(path)
    [batch] = plan_batches(sweep.name, sweep.runs, workers=1)
    executor = BatchExecutor(chunk_target_steps=1000)
    _, reference_metrics = executor.run(batch)
    store = CrashingStore(str(tmp_path / "results"), sweep.name, crash_after=1)
    with pytest.raises(Crash):
        executor.run(batch, checkpoints=store, checkpoint_every=sweep.checkpoint_every)
    saved = checkpoint.decode(store.read_checkpoint(batch.batch_key))
    assert saved.steps_done == 2000 and any(leaf.dtype == np.uint32 for leaf in saved.leaves)
    runs, metrics = executor.run(batch, attempt=2, checkpoints=store, checkpoint_every=sweep.checkpoint_every)
    assert [row["resumed_from_step"] for row in runs] == [2000, 2000]
    assert metrics.equals(reference_metrics, check_metadata=True)
