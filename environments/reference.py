"""Reference levels of a task: the error of the two trivial predictors, from the task's own stream.

    from environments.reference import task_reference_levels
    levels = task_reference_levels("trace_patterning", variant="paper")
    levels.predict_zero    # mean squared return: the error of predicting 0 everywhere
    levels.predict_mean    # variance of the return: the error of predicting its mean everywhere

A learner whose squared return error (msre) is not below `predict_mean` has learned nothing a
constant could not. Animal-learning streams are generated on the device for `seeds` independent
run seeds (vmapped, `steps` each: the levels are the task's, not one run's); a recorded stream
(Atari) uses its whole recording; any other host stream its first `steps` steps. Steps whose true
return is unknown (NaN) are skipped, as the msre reducers skip them. Sums are float64 on the host.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_SEEDS = 16  # run seeds 0..15 of a device stream, vmapped
DEFAULT_STEPS = 100_000  # steps per seed (device streams) or in all (host streams)
CHUNK = 25_000  # device steps per jitted scan (a [CHUNK, seeds] float32 block comes back each time)
CACHE_VERSION = 1  # bump when the computation changes: older cache entries are then ignored


class ReferenceLevels(NamedTuple):
    """predict_zero: mean of G^2; predict_mean: mean of (G - mean G)^2; mean_return; samples: scored steps."""

    predict_zero: float
    predict_mean: float
    mean_return: float
    samples: int


def reference_levels(true_returns) -> ReferenceLevels:
    """The trivial predictors' msre over an array of true returns (any shape; NaN entries skipped)."""
    returns = np.asarray(true_returns, dtype=np.float64).ravel()
    returns = returns[~np.isnan(returns)]
    if returns.size == 0:
        raise ValueError("reference_levels: no step has a known true return (e.g. no episode of the stream finished)")
    mean = float(returns.mean())
    return ReferenceLevels(
        predict_zero=float(np.mean(returns**2)),
        predict_mean=float(np.mean((returns - mean) ** 2)),
        mean_return=mean,
        samples=int(returns.size),
    )


def _sums(levels_parts: list[tuple[float, float, int]]) -> ReferenceLevels:
    total = sum(p[0] for p in levels_parts)
    squares = sum(p[1] for p in levels_parts)
    count = sum(p[2] for p in levels_parts)
    if count == 0:
        raise ValueError("reference_levels: no step has a known true return (e.g. no episode of the stream finished)")
    mean = total / count
    return ReferenceLevels(squares / count, max(squares / count - mean * mean, 0.0), mean, count)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _advance(stream, state, steps: int):
    """`steps` vmapped steps of a device stream: (state, true_return [steps, seeds])."""

    def body(carry, _):
        carry, step = jax.vmap(stream.step)(carry)
        return carry, step.true_return

    return jax.lax.scan(body, state, None, length=steps)


def task_reference_levels(
    name: str, *, seeds: int = DEFAULT_SEEDS, steps: int = DEFAULT_STEPS, **params: Any
) -> ReferenceLevels:
    """The reference levels of task kind `name` (environments.task_kind) with a spec's parameters.

    A device stream: `seeds` run seeds (0..seeds-1) x `steps` steps, vmapped. A recorded host stream
    (Atari): its whole recording. Any other host stream: its first `steps` steps. ValueError (or the
    environment's own error) for an unknown task or a bad parameter.
    """
    import environments

    if seeds < 1 or steps < 1:
        raise ValueError(f"task_reference_levels: seeds and steps must be positive, got {seeds} and {steps}")
    params = {key: tuple(value) if isinstance(value, list) else value for key, value in params.items()}
    kind = environments.task_kind(name)
    if kind.device:
        stream = kind.device_stream(params)
        keys = jax.vmap(lambda seed: environments.split_run_seed(seed)[0])(jnp.arange(seeds))
        state = jax.vmap(stream.init)(keys)
        parts = []
        for start in range(0, steps, CHUNK):
            state, returns = _advance(stream, state, min(CHUNK, steps - start))
            returns = np.asarray(returns, dtype=np.float64)
            returns = returns[~np.isnan(returns)]
            parts.append((float(returns.sum()), float(np.sum(returns**2)), int(returns.size)))
        return _sums(parts)
    stream = kind.host_stream(params)
    recording = getattr(stream, "recording", None)
    if recording is not None:  # a recorded stream: every step of the recording
        return reference_levels(recording.true_return)
    return reference_levels(stream.take(steps).true_return)


def default_cache_dir() -> Path:
    """Where computed levels are kept: $CCN_CACHE_DIR/reference-levels, else ~/.cache/ccn-sweeps/reference-levels."""
    base = os.environ.get("CCN_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "ccn-sweeps") / "reference-levels"


def cached_task_reference_levels(
    name: str, *, seeds: int = DEFAULT_SEEDS, steps: int = DEFAULT_STEPS, cache_dir: str | os.PathLike | None = None,
    **params: Any,
) -> ReferenceLevels:
    """`task_reference_levels`, kept in a small JSON file per (task, parameters, seeds, steps).

    An unreadable cache entry is recomputed; a cache folder that cannot be written is skipped.
    """
    inputs = {"version": CACHE_VERSION, "task": name, "seeds": seeds, "steps": steps, "params": params}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"{name}-{key}.json"
    try:
        return ReferenceLevels(**json.loads(path.read_text())["levels"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    levels = task_reference_levels(name, seeds=seeds, steps=steps, **params)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps({"inputs": inputs, "levels": levels._asdict()}, default=str))
        temporary.replace(path)
    except OSError:
        pass
    return levels
