"""Execute one batch: one compiled program advancing every run of the batch chunk by chunk.

No Ray here: an actor (orchestrator.schedule) holds a `BatchExecutor`, and so can a script or
a benchmark. The executor keeps one `learners.runner.BatchRunner` per static signature, so each
signature compiles once per process; hyperparameters and seeds are arrays [B].

Chunks: one jitted call advances the batch by L log points (`advance_log_points`: L x `log_every`
steps, each log point followed on the device by the reducer's read and a state-finiteness check)
and returns arrays [L, B]; the host makes one round trip per call (`round_trips`). L is chosen for
throughput, independent of `log_every`: the fewest log points making at least `chunk_target_steps`
steps (CHUNK_TARGET_STEPS), a divisor of the run's log points when one of at least half that
exists (else a second, remainder program), and for a host (recorded) stream at most
`host_chunk_bytes` of stream arrays per call. Metrics stay arrays up to the columnar table
(`schema.metrics_table`): no Python object per run per log point.

Divergence: the task's reducer is wrapped (`guard_reducer`, the one divergence flag) so that a
run's first non-finite prediction records the step and freezes its metrics; at each log point
the learner state is also checked for non-finite values (divergence step: that log point's). Such
a run is `diverged` and has metric rows only for the log points before its divergence step; the
rest of its batch goes on.

Precision: a batch of `dtype = "float64"` learners is compiled and run with 64-bit JAX enabled
for that batch only (`jax.enable_x64`, a context: float32 batches in the same process are not
affected, whatever ran before them).

Checkpoints: given a checkpoint store (a ResultsStore) and `checkpoint_every` steps, the
executor saves the batch's state at the first chunk boundary at or past each multiple of
`checkpoint_every` (orchestrator.checkpoint): first a Parquet segment of the metric rows logged
since the previous checkpoint, then the checkpoint naming its segments. Before starting it
resumes from the batch's checkpoint (and its segments) when one exists for the same program.
"""

from __future__ import annotations

import contextlib
import inspect
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
from orchestrator.schema import SCHEMA_VERSION, metrics_table, to_table
from orchestrator.task_kinds import task_kind

NOT_DIVERGED = -1
CHUNK_TARGET_STEPS = 10_000  # steps one jitted call advances at least (whole log points; ~0.5-2 s of device work)
HOST_CHUNK_BYTES = 64 * 2**20  # a host stream's arrays per call at most (observations, cumulants, ...)


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

    takes_keep = "keep" in inspect.signature(reducer.update).parameters

    def update(state: GuardState, prediction, step):
        steps = state.steps + 1
        healthy = state.diverged_at == NOT_DIVERGED
        finite = jnp.isfinite(prediction)
        keep = healthy & finite
        if takes_keep:  # the reducer skips the step itself: no select over (and copy of) its whole state per step
            inner = reducer.update(state.inner, jnp.where(finite, prediction, 0.0), step, keep=keep)
        else:
            updated = reducer.update(state.inner, jnp.where(finite, prediction, 0.0), step)
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


def log_points_per_call(log_points: int, log_every: int, target_steps: int, max_log_points: int | None = None) -> int:
    """L, the log points one jitted call advances: the fewest making >= `target_steps` steps (at
    most `max_log_points` and the run's `log_points`), lowered to the largest divisor of
    `log_points` when that is >= L / 2 (then no remainder program is needed)."""
    chunk = max(1, -(-target_steps // log_every))
    if max_log_points is not None:
        chunk = min(chunk, max(1, max_log_points))
    chunk = min(chunk, log_points)
    divisor = next(d for d in range(chunk, 0, -1) if log_points % d == 0)
    return divisor if 2 * divisor >= chunk else chunk


@dataclass
class _Compiled:
    """What one static signature needs: the runner (compiled on first use, one program per L)."""

    runner: Any
    device_stream: bool  # generated inside the scan (else replayed from a recording per batch)
    module: Any
    cost: Any


class _Logged(NamedTuple):
    """Metric rows as arrays (one entry per kept row, log point major, batch order within)."""

    run_index: np.ndarray  # [rows] index into the batch's runs
    step: np.ndarray  # [rows] int64
    metrics: dict[str, np.ndarray]  # name -> [rows] float32 (as read on the device)


class BatchExecutor:
    """Runs batches in this process; compiles once per static signature (cache in `compiled`).

    chunk_target_steps / host_chunk_bytes: how long one jitted call is (module doc); `round_trips`
    counts the host round trips (one per call) since the executor was made.
    """

    def __init__(self, compilation_cache_dir: str | None = None, *, chunk_target_steps: int = CHUNK_TARGET_STEPS,
                 host_chunk_bytes: int = HOST_CHUNK_BYTES):
        import jax

        import learners  # noqa: F401  (adds its XLA flags before the backend starts in device_description)

        if compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self.compiled: dict[tuple, _Compiled] = {}
        self.host = socket.gethostname()
        self.device = device_description()
        self.node: str | None = None  # the cluster node's id, set by whoever places the executor
        self.chunk_target_steps = chunk_target_steps
        self.host_chunk_bytes = host_chunk_bytes
        self.round_trips = 0  # jitted calls whose read-outs came back to the host
        self.last_log_points_per_call: int | None = None  # L chosen for the last batch run

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

        def read(carry):
            """One run's read-out at a log point: (the guarded reducer's metrics, its learner state is finite)."""
            floats = [leaf for leaf in jax.tree.leaves(carry.learner) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in floats])) if floats else jnp.bool_(True)
            return reducer.read(carry.reducer), finite

        runner = learner_runner.BatchRunner(module, cfg, stream=stream, reducer=reducer, chunk_steps=run.log_every,
                                            read=read)
        cost = kind.cost(run.config_dict, run.task.n_inputs)
        compiled = _Compiled(runner, device_stream, module, cost)
        self.compiled[batch.signature] = compiled
        return compiled

    def log_points_per_call(self, batch: Batch) -> int:
        """L for this batch (module doc)."""
        run = batch.runs[0]
        cap = None
        if not task_kind(run.task.kind).device:  # host stream: observation [d] + cumulant, gamma, true_return
            bytes_per_log_point = 4 * (run.task.n_inputs + 3) * run.log_every
            cap = self.host_chunk_bytes // bytes_per_log_point
        return log_points_per_call(run.steps // run.log_every, run.log_every, self.chunk_target_steps, cap)

    def run(self, batch: Batch, attempt: int = 1, *, checkpoints=None, checkpoint_every: int = 0):
        """Advance every run of `batch` to the end; returns (runs rows, metrics table).

        checkpoints: a ResultsStore (read/write_checkpoint, write/read_segment) or None;
        checkpoint_every: steps between checkpoints (taken at the first chunk boundary at or past
        each multiple; 0: never save, but still resume from an existing checkpoint).
        """
        with precision(batch):
            return self._run(batch, attempt, checkpoints=checkpoints, checkpoint_every=checkpoint_every)

    def _run(self, batch: Batch, attempt: int, *, checkpoints, checkpoint_every: int):
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
        log_every, total_points = run0.log_every, run0.steps // run0.log_every
        size = len(batch.runs)
        diverged_at = np.full(size, NOT_DIVERGED, np.int64)
        point, spent_before, resumed_from = 0, 0.0, None
        segments: list[str] = []
        earlier: list = []  # metric tables of the segments resumed from
        restored = self._restore(checkpoints, batch, carry) if checkpoints is not None else None
        if restored is not None:
            checkpoint, earlier = restored
            carry = jax.tree.unflatten(structure, device_leaves(checkpoint.leaves, jax.tree.leaves(carry)))
            point = checkpoint.steps_done // log_every
            diverged_at = np.asarray(checkpoint.diverged_at, np.int64).copy()
            segments = list(checkpoint.segments)
            spent_before, resumed_from = checkpoint.compute_seconds, checkpoint.steps_done
            if recorded is not None:
                _seek(recorded, checkpoint.stream_position)
        per_call = self.last_log_points_per_call = self.log_points_per_call(batch)
        logged: list[_Logged] = []
        saved_upto = len(logged)  # logged[saved_upto:] are not in a segment yet
        saved_step = tried_step = point * log_every  # the last checkpoint written / attempted
        while point < total_points:
            count = min(per_call, total_points - point)
            steps = None if recorded is None else recorded.take(count * log_every)
            carry, read_out = compiled.runner.advance_log_points(hypers, carry, count, steps)
            values, finite = jax.device_get(read_out)
            self.round_trips += 1
            steps_at = (point + 1 + np.arange(count, dtype=np.int64)) * log_every  # [count]
            guard = np.asarray(values.pop("diverged_at"))[-1, :size].astype(np.int64)
            logged.append(_take_rows(diverged_at, steps_at, guard, np.asarray(finite)[:, :size],
                                     {name: np.asarray(value)[:, :size] for name, value in values.items()}))
            point += count
            steps_done = point * log_every
            due = checkpoint_every and steps_done // checkpoint_every > tried_step // checkpoint_every
            if checkpoints is not None and due and steps_done < run0.steps:
                tried_step = steps_done
                name = f"{saved_step + log_every}-{steps_done}"
                segment = self._metrics_table(batch, compiled.cost, logged[saved_upto:])
                if checkpoints.write_segment(batch.batch_key, name, segment):
                    checkpoint = checkpoints_format.Checkpoint(
                        batch_key=batch.batch_key,
                        run_keys=[run.run_key for run in batch.runs],
                        padded_size=batch.padded_size,
                        steps_done=steps_done,
                        structure=str(structure),
                        leaves=host_leaves(carry),
                        diverged_at=diverged_at,
                        segments=[*segments, name],
                        stream_position=None if recorded is None else recorded.steps_taken,
                        compute_seconds=spent_before + time.perf_counter() - started,
                    )
                    written = checkpoints.write_checkpoint(batch.batch_key, checkpoints_format.encode(checkpoint))
                    if written is not False:  # else the next checkpoint's segment starts where this one did
                        segments, saved_upto, saved_step = checkpoint.segments, len(logged), steps_done

        metrics = self._metrics_table(batch, compiled.cost, logged)
        if earlier:
            import pyarrow as pa

            metrics = pa.concat_tables([*earlier, metrics]).replace_schema_metadata(metrics.schema.metadata)
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
        return run_rows, metrics

    @staticmethod
    def _metrics_table(batch: Batch, cost, logged: list[_Logged]):
        """The metrics table of these rows (schema.metrics_table)."""
        names = sorted({name for part in logged for name in part.metrics})
        step = np.concatenate([part.step for part in logged]) if logged else np.zeros(0, np.int64)
        return metrics_table(
            [run.run_key for run in batch.runs],
            [run.learner for run in batch.runs],
            [run.task.name for run in batch.runs],
            np.concatenate([part.run_index for part in logged]) if logged else np.zeros(0, np.int64),
            step,
            step * np.int64(cost.flops_per_step),
            {name: np.concatenate([part.metrics[name] for part in logged]) for name in names},
        )

    @staticmethod
    def _restore(checkpoints, batch: Batch, carry):
        """(the batch's checkpoint, its segments' tables) if it fits this program exactly (same runs,
        tree and leaf shapes) and every segment it names reads back; else None (start over)."""
        import jax

        data = checkpoints.read_checkpoint(batch.batch_key)
        if data is None:
            return None
        try:
            checkpoint = checkpoints_format.decode(data)
        except ValueError:
            return None
        fresh = jax.eval_shape(_key_data, carry)  # the host forms' shapes and dtypes
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
        if not fits:
            return None
        tables = [checkpoints.read_segment(batch.batch_key, name) for name in checkpoint.segments]
        if any(table is None for table in tables):
            return None
        return checkpoint, tables

    def tables(self, batch: Batch, attempt: int = 1, **checkpointing):
        """run(...) as Arrow tables of the results schema: (runs, metrics)."""
        run_rows, metrics = self.run(batch, attempt, **checkpointing)
        return to_table("runs", run_rows), metrics


def _is_key(leaf) -> bool:
    import jax

    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _key_data(carry) -> list:
    """The carry's leaves, a typed PRNG key as its key data (uint32 [..., 2] for threefry)."""
    import jax

    return [jax.random.key_data(leaf) if _is_key(leaf) else leaf for leaf in jax.tree.leaves(carry)]


def host_leaves(carry) -> list[np.ndarray]:
    """The carry's leaves for a checkpoint, as NumPy arrays; a typed PRNG key as its key data (a
    learner may keep keys in its state, e.g. UORO's random signs)."""
    import jax

    return [np.asarray(leaf) for leaf in jax.device_get(_key_data(carry))]


def device_leaves(saved: list, fresh: list) -> list:
    """host_leaves(...) back into device arrays shaped like `fresh` (typed keys rewrapped with their impl)."""
    import jax
    import jax.numpy as jnp

    def one(value, like):
        return jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(like)) if _is_key(like) \
            else jnp.asarray(value)

    return [one(value, like) for value, like in zip(saved, fresh, strict=True)]


def _take_rows(diverged_at: np.ndarray, steps_at: np.ndarray, guard: np.ndarray, finite: np.ndarray,
               values: dict[str, np.ndarray]) -> _Logged:
    """Update `diverged_at` [runs] (in place) from one call's read-outs and keep the rows before each
    run's divergence: the guard's step of the first non-finite prediction ([runs], at the call's last
    log point), else the first log point whose state is not finite ([count, runs]); the earlier wins."""
    never = np.iinfo(np.int64).max
    by_guard = np.where(guard != NOT_DIVERGED, guard, never)
    bad = ~finite
    by_state = np.where(bad.any(axis=0), steps_at[np.argmax(bad, axis=0)], never)
    found = np.minimum(by_guard, by_state)
    newly = (diverged_at == NOT_DIVERGED) & (found != never)
    diverged_at[newly] = found[newly]
    keep = (diverged_at == NOT_DIVERGED)[None, :] | (steps_at[:, None] < diverged_at[None, :])
    points, runs = np.nonzero(keep)
    return _Logged(runs.astype(np.int64), steps_at[points], {name: value[keep] for name, value in values.items()})


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


def default_compilation_cache_dir() -> str:
    """$CCN_JAX_CACHE_DIR, else ./.jax_cache (persistent XLA compilation cache)."""
    return os.environ.get("CCN_JAX_CACHE_DIR") or os.path.abspath(".jax_cache")
