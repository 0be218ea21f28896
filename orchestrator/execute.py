"""Execute one batch: one compiled program advancing every run of the batch chunk by chunk.

No Ray here: an actor (orchestrator.schedule) holds a `BatchExecutor`, and so can a script or
a benchmark. The executor keeps one `learners.runner.BatchRunner` per static signature, so each
signature compiles once per process; hyperparameters and seeds are arrays [B]. A chunk is
`log_every` steps; after each chunk the host reads only the reduced metrics [B].

Divergence: the task's reducer is wrapped (`guard_reducer`, the one divergence flag) so that a
run's first non-finite prediction records the step and freezes its metrics; after each chunk the
learner state is also checked for non-finite values. Such a run is `diverged`; the rest of its
batch goes on.

Precision: a batch of `dtype = "float64"` learners is compiled and run with 64-bit JAX enabled
for that batch only (`jax.enable_x64`, a context: float32 batches in the same process are not
affected, whatever ran before them).

Checkpoints: given a checkpoint store (a ResultsStore) and `checkpoint_every` steps, the
executor saves the batch's whole state every `checkpoint_every` steps (orchestrator.checkpoint)
and, before starting, resumes from the batch's checkpoint when one exists for the same program.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np

from orchestrator import checkpoint as checkpoints_format
from orchestrator.learner_kinds import learner_kind
from orchestrator.plan import Batch
from orchestrator.runs import Run, package_version
from orchestrator.schema import SCHEMA_VERSION, to_table
from orchestrator.task_kinds import task_kind

NOT_DIVERGED = -1


class GuardState(NamedTuple):
    inner: Any  # the task reducer's state
    steps: Any  # [] int32: steps seen
    diverged_at: Any  # [] int32: steps seen at the first non-finite prediction, or NOT_DIVERGED


def guard_reducer(reducer):
    """Wrap a Reducer: stop counting a run's metrics at its first non-finite prediction."""
    import jax
    import jax.numpy as jnp

    from environments.core import Reducer

    def init():
        return GuardState(reducer.init(), jnp.zeros((), jnp.int32), jnp.full((), NOT_DIVERGED, jnp.int32))

    def update(state: GuardState, prediction, step):
        steps = state.steps + 1
        healthy = state.diverged_at == NOT_DIVERGED
        finite = jnp.isfinite(prediction)
        updated = reducer.update(state.inner, jnp.where(finite, prediction, 0.0), step)
        keep = healthy & finite
        inner = jax.tree.map(lambda new, old: jnp.where(keep, new, old), updated, state.inner)
        diverged_at = jnp.where(healthy & ~finite, steps, state.diverged_at)
        return GuardState(inner, steps, diverged_at)

    def read(state: GuardState):
        return {**reducer.read(state.inner), "diverged_at": state.diverged_at}

    return Reducer(init=init, update=update, read=read)


def task_reducer(task, log_every: int):
    """The task's on-device error measures (names as in TaskKind.metrics)."""
    return task_kind(task.kind).reducer(task.params_dict.get("window"), log_every)


def batch_dtype(batch: Batch) -> str:
    """The float dtype of a batch's learners ('float32' or 'float64'; the signature fixes it)."""
    return batch.runs[0].config_dict.get("dtype", "float32")


def precision(batch: Batch):
    """A context that enables 64-bit JAX while a float64 batch compiles and runs (else nothing)."""
    import jax

    return jax.enable_x64(True) if batch_dtype(batch) == "float64" else contextlib.nullcontext()


def device_description() -> str:
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return "cpu"
    return f"{device.platform}:{device.id} {getattr(device, 'device_kind', '')}".strip()


@dataclass
class _Compiled:
    """What one static signature needs: the runner (compiled on first use) and read-outs."""

    runner: Any
    read_metrics: Any  # carry -> dict of [B] arrays
    state_finite: Any  # carry -> [B] bool
    device_stream: bool  # generated inside the scan (else replayed from a recording per batch)
    module: Any
    cost: Any


class BatchExecutor:
    """Runs batches in this process; compiles once per static signature (cache in `compiled`)."""

    def __init__(self, compilation_cache_dir: str | None = None):
        import jax

        import learners  # noqa: F401  (adds its XLA flags before the backend starts in device_description)

        if compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self.compiled: dict[tuple, _Compiled] = {}
        self.host = socket.gethostname()
        self.device = device_description()
        self.node: str | None = None  # the cluster node's id, set by whoever places the executor

    def _compile(self, batch: Batch) -> _Compiled:
        import jax
        import jax.numpy as jnp

        from learners import runner as learner_runner

        if batch.signature in self.compiled:
            return self.compiled[batch.signature]
        run = batch.runs[0]
        kind = learner_kind(run.learner)
        module = kind.learners_module()
        cfg = kind.make_config(run.config_dict, run.task.n_inputs)
        reducer = guard_reducer(task_reducer(run.task, run.log_every))
        task = task_kind(run.task.kind)
        device_stream = task.device
        stream = task.device_stream(run.task.params_dict) if device_stream else None
        runner = learner_runner.BatchRunner(module, cfg, stream=stream, reducer=reducer, chunk_steps=run.log_every)
        read_metrics = jax.jit(lambda carry: jax.vmap(reducer.read)(carry.reducer))

        def state_finite(carry):
            """[B] bool: every float in each run's learner state is finite (predictions: the guard)."""
            size = carry.reducer.diverged_at.shape[0]
            checks = [
                jnp.all(jnp.isfinite(leaf.reshape(size, -1)), axis=1)
                for leaf in jax.tree.leaves(carry.learner)
                if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.ndim >= 1 and leaf.shape[0] == size
            ]
            return jnp.all(jnp.stack(checks), axis=0) if checks else jnp.ones((size,), bool)

        cost = kind.cost(run.config_dict, run.task.n_inputs)
        compiled = _Compiled(runner, read_metrics, jax.jit(state_finite), device_stream, module, cost)
        self.compiled[batch.signature] = compiled
        return compiled

    def run(
        self, batch: Batch, attempt: int = 1, *, checkpoints=None, checkpoint_every: int = 0
    ) -> tuple[list[dict], list[dict]]:
        """Advance every run of `batch` to the end; returns (runs rows, metrics rows).

        checkpoints: a store with read_checkpoint / write_checkpoint(batch_key, bytes) (a
        ResultsStore) or None; checkpoint_every: steps between checkpoints (a multiple of the
        batch's log_every; 0: never save, but still resume from an existing checkpoint).
        """
        with precision(batch):
            return self._run(batch, attempt, checkpoints=checkpoints, checkpoint_every=checkpoint_every)

    def _run(self, batch: Batch, attempt: int, *, checkpoints, checkpoint_every: int) -> tuple[list[dict], list[dict]]:
        import jax
        import jax.numpy as jnp

        from environments.animal import split_run_seed
        from learners.runner import stack_hypers

        started = time.perf_counter()
        compiled = self._compile(batch)
        padded = list(batch.runs) + [batch.runs[-1]] * (batch.padded_size - len(batch.runs))
        hypers = stack_hypers(compiled.module.Hyper, [run.hyper_dict for run in padded], dtype=batch_dtype(batch))
        seeds = jnp.asarray([run.seed for run in padded], jnp.uint32)
        env_keys, learner_keys = jax.vmap(split_run_seed)(seeds)
        task = batch.runs[0].task
        recorded = None if compiled.device_stream else task_kind(task.kind).host_stream(task.params_dict)
        carry = compiled.runner.init(hypers, learner_keys, env_keys if compiled.device_stream else None)
        structure = jax.tree.structure(carry)

        run0 = batch.runs[0]
        chunks = run0.steps // run0.log_every
        size = len(batch.runs)
        diverged_at = np.full(size, NOT_DIVERGED, np.int64)
        metric_rows: list[dict] = []
        first_chunk, spent_before, resumed_from = 0, 0.0, None
        restored = self._restore(checkpoints, batch, carry) if checkpoints is not None else None
        if restored is not None:
            carry = jax.tree.unflatten(structure, [jnp.asarray(leaf) for leaf in restored.leaves])
            first_chunk = restored.steps_done // run0.log_every
            diverged_at = np.asarray(restored.diverged_at, np.int64).copy()
            metric_rows = list(restored.metric_rows)
            spent_before, resumed_from = restored.compute_seconds, restored.steps_done
            if recorded is not None:
                _seek(recorded, restored.stream_position)
        for chunk in range(first_chunk, chunks):
            steps_done = (chunk + 1) * run0.log_every
            if recorded is None:
                carry, _ = compiled.runner.advance(hypers, carry)
            else:
                carry, _ = compiled.runner.advance(hypers, carry, recorded.take(run0.log_every))
            values = jax.device_get(compiled.read_metrics(carry))
            finite = np.asarray(jax.device_get(compiled.state_finite(carry)))[:size]
            prediction_diverged = np.asarray(values.pop("diverged_at"))[:size]
            newly = (diverged_at == NOT_DIVERGED) & (prediction_diverged != NOT_DIVERGED)
            diverged_at[newly] = prediction_diverged[newly]
            newly = (diverged_at == NOT_DIVERGED) & ~finite
            diverged_at[newly] = steps_done
            for index, run in enumerate(batch.runs):
                if diverged_at[index] != NOT_DIVERGED:
                    continue
                row = {
                    "run_key": run.run_key,
                    "learner": run.learner,
                    "task": run.task.name,
                    "step": steps_done,
                    "cumulative_flops": compiled.cost.flops_per_step * steps_done,
                }
                row.update({name: _float(value[index]) for name, value in values.items()})
                metric_rows.append(row)
            if checkpoints is not None and checkpoint_every and steps_done % checkpoint_every == 0 \
                    and steps_done < run0.steps:
                checkpoint = checkpoints_format.Checkpoint(
                    batch_key=batch.batch_key,
                    run_keys=[run.run_key for run in batch.runs],
                    padded_size=batch.padded_size,
                    steps_done=steps_done,
                    structure=str(structure),
                    leaves=[np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(carry))],
                    diverged_at=diverged_at,
                    metric_rows=metric_rows,
                    stream_position=None if recorded is None else recorded.steps_taken,
                    compute_seconds=spent_before + time.perf_counter() - started,
                )
                checkpoints.write_checkpoint(batch.batch_key, checkpoints_format.encode(checkpoint))

        wall_seconds = spent_before + time.perf_counter() - started
        finished_at = datetime.now(UTC)
        run_rows = [
            runs_row(
                run,
                batch,
                compiled.cost,
                diverged_at=int(diverged_at[i]),
                wall_seconds=wall_seconds,
                attempt=attempt,
                finished_at=finished_at,
                host=self.host,
                device=self.device,
                node=self.node,
                resumed_from_step=resumed_from,
            )
            for i, run in enumerate(batch.runs)
        ]
        return run_rows, metric_rows

    @staticmethod
    def _restore(checkpoints, batch: Batch, carry) -> checkpoints_format.Checkpoint | None:
        """The batch's checkpoint if it fits this program exactly (same runs, tree and leaf shapes)."""
        import jax

        data = checkpoints.read_checkpoint(batch.batch_key)
        if data is None:
            return None
        try:
            checkpoint = checkpoints_format.decode(data)
        except ValueError:
            return None
        fresh = jax.tree.leaves(carry)
        fits = (
            checkpoint.batch_key == batch.batch_key
            and checkpoint.run_keys == [run.run_key for run in batch.runs]
            and checkpoint.padded_size == batch.padded_size
            and checkpoint.structure == str(jax.tree.structure(carry))
            and len(checkpoint.leaves) == len(fresh)
            and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(checkpoint.leaves, fresh, strict=True))
            and checkpoint.steps_done % batch.runs[0].log_every == 0
            and 0 < checkpoint.steps_done < batch.runs[0].steps
        )
        return checkpoint if fits else None

    def tables(self, batch: Batch, attempt: int = 1, **checkpointing):
        """run(...) as Arrow tables of the results schema: (runs, metrics)."""
        run_rows, metric_rows = self.run(batch, attempt, **checkpointing)
        return to_table("runs", run_rows), to_table("metrics", metric_rows)


def runs_row(
    run: Run,
    batch: Batch,
    cost,
    *,
    diverged_at: int,
    wall_seconds: float,
    attempt: int,
    finished_at: datetime,
    host: str,
    device: str,
    node: str | None = None,
    resumed_from_step: int | None = None,
) -> dict:
    """The `runs` row of one run of a finished batch (see orchestrator.schema).

    A learner setting with a typed column of its own fills it; the others (an external learner's)
    go to `learner_settings` as JSON."""
    kind = learner_kind(run.learner)
    settings = {**run.config_dict, **run.hyper_dict}
    typed = {name: value for name, value in settings.items() if _fits_column(name, value)}
    extra = {name: value for name, value in settings.items() if name not in typed}
    return {
        "run_key": run.run_key,
        "sweep": batch.sweep,
        "learner": run.learner,
        "learner_name": run.learner_name,
        "shape": kind.format_shape(run.config_dict, run.task.n_inputs),
        **typed,
        "learner_settings": json.dumps(extra, sort_keys=True) if extra else None,
        "cost_source": kind.cost_source,
        "task": run.task.name,
        "task_kind": run.task.kind,
        "task_params": json.dumps(dict(run.task.params), sort_keys=True),
        "n_inputs": run.task.n_inputs,
        "seed": run.seed,
        "steps": run.steps,
        "log_every": run.log_every,
        "params": cost.params,
        "learning_params": cost.learning_params,
        "flops_per_step": cost.flops_per_step,
        "paper_ops_per_step": cost.paper_ops_per_step,
        "status": "complete" if diverged_at == NOT_DIVERGED else "diverged",
        "diverged_at_step": None if diverged_at == NOT_DIVERGED else diverged_at,
        "batch_key": batch.batch_key,
        "batch_size": len(batch.runs),
        "wall_seconds": wall_seconds,
        "attempt": attempt,
        "host": host,
        "node": node,
        "device": device,
        "resumed_from_step": resumed_from_step,
        "package_version": package_version(),
        "schema_version": SCHEMA_VERSION,
        "finished_at": finished_at,
    }


def _fits_column(name: str, value) -> bool:
    """Whether a learner setting goes to a typed column of the runs table (same name, a value of its type)."""
    import pyarrow as pa

    from orchestrator.schema import LEARNER_SETTING_COLUMNS, RUNS_SCHEMA

    if name not in LEARNER_SETTING_COLUMNS:
        return False
    column = RUNS_SCHEMA.field(name).type
    if value is None:
        return True
    if isinstance(value, bool):
        return pa.types.is_boolean(column)
    if isinstance(value, int):
        return pa.types.is_integer(column) or pa.types.is_floating(column)
    if isinstance(value, float):
        return pa.types.is_floating(column)
    return isinstance(value, str) and pa.types.is_string(column)


def _seek(stream, position: int) -> None:
    """Continue a host stream from `position` steps: its `seek` (a recording), else by taking them
    (a generated stream, e.g. gym: deterministic given its seed)."""
    if hasattr(stream, "seek"):
        stream.seek(position)
        return
    remaining = position - getattr(stream, "steps_taken", 0)
    while remaining > 0:
        taken = min(remaining, 100_000)
        stream.take(taken)
        remaining -= taken


def _float(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def default_compilation_cache_dir() -> str:
    """$CCN_JAX_CACHE_DIR, else ./.jax_cache (persistent XLA compilation cache)."""
    return os.environ.get("CCN_JAX_CACHE_DIR") or os.path.abspath(".jax_cache")
