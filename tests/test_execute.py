"""The executor: 64-bit learners run (x64 for their batch only); divergence has one flag, the guard's."""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest

from learners import runner
from orchestrator import checkpoint
from orchestrator.execute import BatchExecutor
from orchestrator.learner_kinds import LEARNER_KINDS
from orchestrator.plan import plan_batches
from orchestrator.spec import load_spec

SPEC = """
name = "exec"
steps = 400
seeds = [0, 1]
log_every = 200
checkpoint_every = 200

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:200"
step_size = {step_size}
dtype = "{dtype}"
"""


class MemoryCheckpoints:
    """A checkpoint store that keeps what the executor writes (and has nothing to resume from)."""

    def __init__(self):
        self.written: list[bytes] = []

    def read_checkpoint(self, batch_key):
        return None

    def write_checkpoint(self, batch_key, data):
        self.written.append(data)


def batch_of(tmp_path, dtype="float32", step_size="0.01"):
    path = tmp_path / f"{dtype}.toml"
    path.write_text(textwrap.dedent(SPEC.format(dtype=dtype, step_size=step_size)))
    sweep = load_spec(path)
    [batch] = plan_batches(sweep.name, sweep.runs, workers=1, batch_size=4)
    return batch


@pytest.fixture(scope="module")
def executor():
    return BatchExecutor()


def test_a_float64_batch_runs_in_64_bits_and_leaves_float32_batches_alone(tmp_path, executor):
    store, batch = MemoryCheckpoints(), batch_of(tmp_path, "float64")
    runs, metrics = executor.run(batch, checkpoints=store, checkpoint_every=200)
    assert [row["status"] for row in runs] == ["complete", "complete"]
    assert {row["step"] for row in metrics} == {200, 400} and all(row["msre_window"] is not None for row in metrics)
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

    store = MemoryCheckpoints()
    runs, _ = executor.run(batch_of(tmp_path, "float32"), checkpoints=store, checkpoint_every=200)
    assert [row["status"] for row in runs] == ["complete", "complete"]
    assert not any(leaf.dtype == np.float64 for leaf in checkpoint.decode(store.written[0]).leaves)


def test_divergence_has_one_flag_the_guards_and_the_healthy_run_goes_on(tmp_path, executor):
    assert "finite" not in runner.Carry._fields  # the runner keeps no second divergence flag
    runs, metrics = executor.run(batch_of(tmp_path, step_size="[0.01, 1e38]"))
    by_size = {row["step_size"]: row for row in runs}
    assert by_size[0.01]["status"] == "complete" and by_size[0.01]["diverged_at_step"] is None
    assert by_size[1e38]["status"] == "diverged" and 1 <= by_size[1e38]["diverged_at_step"] <= 400
    steps = {row["run_key"]: sorted(m["step"] for m in metrics if m["run_key"] == row["run_key"]) for row in runs}
    assert steps[by_size[0.01]["run_key"]] == [200, 400]
    assert all(step < by_size[1e38]["diverged_at_step"] for step in steps[by_size[1e38]["run_key"]])  # frozen
