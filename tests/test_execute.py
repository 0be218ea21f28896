"""The executor: 64-bit learners run (x64 for their batch only); divergence has one flag, the guard's;
results do not depend on how many log points one jitted call advances (bitwise), and metrics
become a columnar table of exactly the schema's columns."""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pyarrow as pa
import pytest

from learners import runner
from orchestrator import checkpoint
from orchestrator.execute import CHUNK_TARGET_STEPS, NOT_DIVERGED, BatchExecutor, _take_rows, log_points_per_call
from orchestrator.learner_kinds import LEARNER_KINDS
from orchestrator.plan import plan_batches
from orchestrator.results import ResultsStore
from orchestrator.schema import METRICS_SCHEMA, to_table
from orchestrator.spec import load_spec

SPEC = """
name = "exec"
steps = 1400
seeds = [0, 1]
log_every = 200
checkpoint_every = 200

[[tasks]]
{task}

[[learners]]
kind = "ccn"
shape = "{shape}"
step_size = {step_size}
dtype = "{dtype}"
"""
TASKS = {  # a stream generated on the device, and one driven from the host (gymnasium's CartPole)
    "device": ('kind = "trace_patterning"', "4:2:200"),
    "host": ('kind = "gym"\nenv_id = "CartPole-v1"\ngamma = 0.9\nwindow = 400', "2:2:inf"),
}


class RecordingStore(ResultsStore):
    """A real results store that also keeps every checkpoint the executor writes (nothing to resume from)."""

    def __init__(self, root):
        super().__init__(str(root), "exec")
        self.written: list[bytes] = []

    def read_checkpoint(self, batch_key):
        return None

    def write_checkpoint(self, batch_key, data):
        self.written.append(data)
        return super().write_checkpoint(batch_key, data)


def batch_of(tmp_path, dtype="float32", step_size="0.01", stream="device"):
    """The batch of SPEC (one signature per dtype and stream: the module's tests share its programs)."""
    path = tmp_path / f"{dtype}.toml"
    task, shape = TASKS[stream]
    path.write_text(textwrap.dedent(SPEC.format(dtype=dtype, step_size=step_size, task=task, shape=shape)))
    sweep = load_spec(path)
    [batch] = plan_batches(sweep.name, sweep.runs, workers=1, batch_size=4)
    return batch


@pytest.fixture(scope="module")
def executor():
    """One executor for the module: each (signature, log points per call) compiles once."""
    return BatchExecutor()


@pytest.fixture
def one_log_point_per_call(executor):
    executor.chunk_target_steps = 1
    yield executor
    executor.chunk_target_steps = CHUNK_TARGET_STEPS


def test_a_float64_batch_runs_in_64_bits_and_leaves_float32_batches_alone(tmp_path, one_log_point_per_call):
    executor = one_log_point_per_call
    store, batch = RecordingStore(tmp_path / "results"), batch_of(tmp_path, "float64")
    runs, metrics = executor.run(batch, checkpoints=store, checkpoint_every=200)
    assert [row["status"] for row in runs] == ["complete", "complete"]
    assert set(metrics["step"].to_pylist()) == set(range(200, 1401, 200)) and metrics["msre_window"].null_count == 0
    assert not jax.config.jax_enable_x64  # 64-bit JAX only while that batch ran
    run = batch.runs[0]
    kind = LEARNER_KINDS[run.learner]
    with jax.enable_x64(True):
        state = jax.eval_shape(
            lambda: kind.learners_module().init(
                kind.make_config(run.config_dict, run.task.n_inputs), kind.make_hyper(run.hyper_dict),
                jax.random.PRNGKey(0),
            )
        )
    learner_leaves = checkpoint.decode(store.written[0]).leaves[: len(jax.tree.leaves(state))]  # the carry's first
    floats = [leaf.dtype for leaf in learner_leaves if np.issubdtype(leaf.dtype, np.floating)]
    assert floats and set(floats) == {np.dtype(np.float64)}

    store = RecordingStore(tmp_path / "results")
    runs, _ = executor.run(batch_of(tmp_path, "float32"), checkpoints=store, checkpoint_every=200)
    assert [row["status"] for row in runs] == ["complete", "complete"]
    assert not any(leaf.dtype == np.float64 for leaf in checkpoint.decode(store.written[0]).leaves)


def test_divergence_has_one_flag_the_guards_and_the_healthy_run_goes_on(tmp_path, one_log_point_per_call):
    executor = one_log_point_per_call
    assert "finite" not in runner.Carry._fields  # the runner keeps no second divergence flag
    runs, metrics = executor.run(batch_of(tmp_path, step_size="[0.01, 1e38]"))
    by_size = {row["step_size"]: row for row in runs}
    assert by_size[0.01]["status"] == "complete" and by_size[0.01]["diverged_at_step"] is None
    assert by_size[1e38]["status"] == "diverged" and 1 <= by_size[1e38]["diverged_at_step"] <= 1400
    metrics = metrics.to_pylist()
    steps = {row["run_key"]: sorted(m["step"] for m in metrics if m["run_key"] == row["run_key"]) for row in runs}
    assert steps[by_size[0.01]["run_key"]] == list(range(200, 1401, 200))
    assert all(step < by_size[1e38]["diverged_at_step"] for step in steps[by_size[1e38]["run_key"]])  # frozen


@pytest.mark.parametrize("stream", ["device", "host"])
def test_results_do_not_depend_on_how_many_log_points_one_call_advances(tmp_path, executor, stream):
    batch = batch_of(tmp_path, step_size="[0.01, 1e38]", stream=stream)
    results = {}
    try:  # 7 log points: one per call, all 7 in one call, 3 per call and a remainder program (3 + 3 + 1)
        for target, per_call, calls in ((1, 1, 7), (1400, 7, 1), (600, 3, 3)):
            executor.chunk_target_steps = target
            before = executor.round_trips
            runs, metrics = executor.tables(batch)
            assert executor.last_log_points_per_call == per_call and executor.round_trips - before == calls
            results[per_call] = runs.drop_columns(["wall_seconds", "finished_at"]), metrics
    finally:
        executor.chunk_target_steps = CHUNK_TARGET_STEPS
    reference_runs, reference_metrics = results[1]  # as before: the host reads after every log point
    for runs, metrics in results.values():
        assert runs.equals(reference_runs, check_metadata=True)
        assert metrics.equals(reference_metrics, check_metadata=True)  # bitwise, same row order
    assert reference_metrics.schema.equals(METRICS_SCHEMA, check_metadata=True)
    assert to_table("metrics", reference_metrics.to_pylist()).equals(reference_metrics, check_metadata=True)

    statuses = reference_runs["status"].to_pylist()
    assert statuses.count("diverged") == 2 and statuses.count("complete") == 2
    logged = reference_metrics.select(["run_key", "step"]).to_pylist()
    for run in reference_runs.to_pylist():  # a diverged run's rows stop before its divergence step
        diverged_at = run["diverged_at_step"] or 10**9
        steps = [row["step"] for row in logged if row["run_key"] == run["run_key"]]
        assert steps == [step for step in range(200, 1401, 200) if step < diverged_at]


def old_divergence(guard_step, finite, log_every):
    """The executor's divergence rule as it was with one log point per call (the reference):
    after each log point, a new guard step wins, else a non-finite state diverges at that step."""
    points, runs = finite.shape
    diverged_at = np.full(runs, NOT_DIVERGED, np.int64)
    kept = []
    for point in range(points):
        step = (point + 1) * log_every
        guard = np.where((guard_step != NOT_DIVERGED) & (guard_step <= step), guard_step, NOT_DIVERGED)
        newly = (diverged_at == NOT_DIVERGED) & (guard != NOT_DIVERGED)
        diverged_at[newly] = guard[newly]
        newly = (diverged_at == NOT_DIVERGED) & ~finite[point]
        diverged_at[newly] = step
        kept += [(run, step) for run in range(runs) if diverged_at[run] == NOT_DIVERGED]
    return diverged_at, kept


def test_divergence_rows_and_steps_match_the_one_log_point_rule_whatever_the_calls():
    rng = np.random.default_rng(0)
    log_every, points, runs = 10, 12, 40
    for trial in range(50):
        guard_step = np.where(rng.random(runs) < 0.4, rng.integers(1, points * log_every + 1, runs), NOT_DIVERGED)
        finite = rng.random((points, runs)) > 0.05 * (trial % 3)
        expected_at, expected_rows = old_divergence(guard_step, finite, log_every)
        per_call = int(rng.integers(1, points + 1))
        diverged_at, rows = np.full(runs, NOT_DIVERGED, np.int64), []
        for start in range(0, points, per_call):
            count = min(per_call, points - start)
            steps_at = (start + 1 + np.arange(count, dtype=np.int64)) * log_every
            guard = np.where((guard_step != NOT_DIVERGED) & (guard_step <= steps_at[-1]), guard_step, NOT_DIVERGED)
            values = {"msre": np.broadcast_to(steps_at[:, None] * 1000.0 + np.arange(runs), (count, runs))}
            part = _take_rows(diverged_at, steps_at, guard, finite[start:start + count], values)
            assert np.array_equal(part.metrics["msre"], part.step * 1000.0 + part.run_index)  # values follow rows
            rows += list(zip(part.run_index.tolist(), part.step.tolist(), strict=True))
        assert np.array_equal(diverged_at, expected_at) and rows == expected_rows


def test_log_points_per_call_reach_the_target_divide_the_run_or_leave_one_remainder(tmp_path, executor):
    assert log_points_per_call(7, 200, 1) == 1
    assert log_points_per_call(7, 200, 1400) == 7 and log_points_per_call(7, 200, 10**9) == 7
    assert log_points_per_call(7, 200, 600) == 3  # no divisor of 7 in [2, 3]: 3 + 3 + a remainder of 1
    assert log_points_per_call(20, 200, 1400) == 5  # 7 wanted; 5 divides 20 and is >= 7 / 2
    assert log_points_per_call(1000, 100, 10_000) == 100 and log_points_per_call(100, 100_000, 10_000) == 1
    assert log_points_per_call(1000, 100, 10_000, max_log_points=30) == 25
    assert log_points_per_call(1000, 100, 10_000, max_log_points=0) == 1
    batch = batch_of(tmp_path, stream="host")
    bytes_per_log_point = 4 * (4 + 3) * 200  # CartPole: 4 observations + cumulant, gamma, true return
    executor.host_chunk_bytes = 3 * bytes_per_log_point  # a host stream's arrays per call are capped
    try:
        assert executor.log_points_per_call(batch) == 3
    finally:
        executor.host_chunk_bytes = BatchExecutor().host_chunk_bytes
    assert executor.log_points_per_call(batch) == 7


def test_the_metrics_table_is_built_from_arrays_with_the_schemas_columns():
    from orchestrator.schema import metrics_table

    table = metrics_table(["a", "b"], ["ccn", "ccn"], ["t", "t"], np.array([1, 0, 1]), np.array([10, 20, 20]),
                          np.array([70, 140, 140]), {"msre_window": np.array([0.5, np.nan, np.inf], np.float32)})
    rows = [
        {"run_key": "b", "learner": "ccn", "task": "t", "step": 10, "cumulative_flops": 70, "msre_window": 0.5},
        {"run_key": "a", "learner": "ccn", "task": "t", "step": 20, "cumulative_flops": 140},
        {"run_key": "b", "learner": "ccn", "task": "t", "step": 20, "cumulative_flops": 140},
    ]
    assert table.equals(to_table("metrics", rows), check_metadata=True)
    empty = metrics_table(["a"], ["ccn"], ["t"], np.zeros(0, int), np.zeros(0, int), np.zeros(0, int), {})
    assert empty.schema.equals(METRICS_SCHEMA, check_metadata=True) and empty.num_rows == 0
    with pytest.raises(ValueError, match="msre_typo"):
        metrics_table(["a"], ["ccn"], ["t"], [0], [1], [1], {"msre_typo": np.zeros(1)})
    assert table["run_key"].type == pa.string() and table.schema.field("run_key").nullable is False
