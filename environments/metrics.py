"""Error measures as on-device reducers (environments.core.Reducer), for the learners' scan.

A step is scored when its true_return is not NaN; its squared return error is
(prediction - true_return)^2. Every reducer reports per logging interval:

    msre_interval   mean over the scored steps of the last COMPLETED interval of `log_every` steps
                    (the reducer counts steps and rolls the interval over itself, so `read` is pure:
                    a caller that advances exactly `log_every` steps per chunk and reads after each
                    chunk gets each interval once; NaN before the first interval completes)

and, for the windowed reducers,

    msre_window     mean over the scored steps among the last `window` steps; exact whenever the
                    steps taken are a multiple of `block_length` (every log point); before the
                    window has filled it averages over the steps seen so far; read mid-block it
                    covers between window - block_length + 1 and window steps
    msre_episode    (per_episode) running mean, over finished episodes, of each episode's MSRE; an
                    episode starts at a step with gamma == 0 and counts once the next one starts

Memory per run is a few numbers plus two per block of the window (window / block_length blocks);
never a per-step buffer. Sums are float32 with Kahan compensation (per step into the block, the
interval and the episode; across blocks when read), so a sum of n squared errors carries a
relative error of a few float32 ulps (~1e-7), independent of n. NaN predictions make the sums NaN
(divergence shows); NaN true returns are skipped.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from environments.core import Reducer, StreamStep

MAX_WINDOW_BLOCKS = 4096
PAPER_WINDOW, PAPER_LOG_EVERY = 100_000, 50_000
ATARI_WINDOW, ATARI_LOG_EVERY = 500_000, 50_000


class RunningSum(NamedTuple):
    """A Kahan-compensated float32 sum of `count` terms: total [] f32, compensation [] f32, count [] i32."""

    total: jax.Array
    compensation: jax.Array
    count: jax.Array


class WindowState(NamedTuple):
    """Sliding window as a ring of completed blocks plus the block in progress.

    block:          RunningSum of the block in progress
    block_position: [] i32    steps into the block in progress
    block_totals:   [blocks] f32  sums of the completed blocks (ring)
    block_counts:   [blocks] i32  scored steps of the completed blocks (ring)
    oldest_slot:    [] i32    ring slot of the oldest completed block (overwritten next)
    """

    block: RunningSum
    block_position: jax.Array
    block_totals: jax.Array
    block_counts: jax.Array
    oldest_slot: jax.Array


class EpisodeState(NamedTuple):
    """episode: scored steps of the episode in progress; episode_msre: sum of finished episodes'
    MSREs (count = episodes finished)."""

    episode: RunningSum
    episode_msre: RunningSum


class MsreState(NamedTuple):
    """A reducer's state per run; `window` / `episodes` are None when not measured."""

    interval_position: jax.Array
    interval: RunningSum
    last_interval: RunningSum
    window: WindowState | None
    episodes: EpisodeState | None


def empty_sum() -> RunningSum:
    return RunningSum(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))


def add_to_sum(running: RunningSum, value: jax.Array, counted: jax.Array) -> RunningSum:
    """Kahan-add `value` ([] f32, 0 when not counted) and count it if `counted` ([] bool)."""
    corrected = value - running.compensation
    total = running.total + corrected
    compensation = (total - running.total) - corrected
    return RunningSum(total, compensation, running.count + counted.astype(jnp.int32))


def compensated_total(values: jax.Array) -> jax.Array:
    """Kahan sum of a 1-D float32 array: [] f32."""
    def body(carry, value):
        return add_to_sum(carry, value, jnp.bool_(False)), None

    return jax.lax.scan(body, empty_sum(), values)[0].total


def _select(condition: jax.Array, if_true, if_false):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), if_true, if_false)


def _mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, NaN when count is 0: [] f32."""
    return jnp.where(count > 0, total / jnp.maximum(count, 1).astype(jnp.float32), jnp.nan).astype(jnp.float32)


def windowed_msre_reducer(
    window: int, log_every: int, *, block_length: int | None = None, per_episode: bool = False
) -> Reducer:
    """msre_window over the last `window` steps + msre_interval (+ msre_episode if `per_episode`).

    window and log_every must be multiples of block_length (default: their gcd); memory per run is
    2 * window / block_length numbers plus a few (at most MAX_WINDOW_BLOCKS blocks).
    """
    window = _check_positive("window", window)
    log_every = _check_positive("log_every", log_every)
    block_length = math.gcd(window, log_every) if block_length is None else _check_positive(
        "block_length", block_length
    )
    if window % block_length or log_every % block_length:
        raise ValueError(
            f"window ({window}) and log_every ({log_every}) must both be multiples of block_length "
            f"({block_length}); use a block_length that divides both, e.g. their gcd "
            f"{math.gcd(window, log_every)}"
        )
    num_blocks = window // block_length
    if num_blocks > MAX_WINDOW_BLOCKS:
        raise ValueError(
            f"window ({window}) / block_length ({block_length}) = {num_blocks} blocks exceeds "
            f"{MAX_WINDOW_BLOCKS}; choose log_every (or block_length) so that fewer, longer blocks "
            f"tile the window (block_length defaults to gcd(window, log_every))"
        )
    return _msre_reducer(log_every, num_blocks, block_length, per_episode)


def interval_msre_reducer(log_every: int) -> Reducer:
    """Only msre_interval: the plain MSRE of each logging interval of `log_every` steps."""
    return _msre_reducer(_check_positive("log_every", log_every), 0, 0, False)


def paper_msre_reducer(
    window: int = PAPER_WINDOW, log_every: int = PAPER_LOG_EVERY, *, block_length: int | None = None
) -> Reducer:
    """The paper task's measure: MSRE over the last 100,000 steps, logged every 50,000."""
    return windowed_msre_reducer(window, log_every, block_length=block_length)


def atari_msre_reducer(
    window: int = ATARI_WINDOW, log_every: int = ATARI_LOG_EVERY, *, block_length: int | None = None
) -> Reducer:
    """Atari's measure: scored steps of finished episodes in the last 500,000 steps, logged every
    50,000, plus the running per-episode mean of per-episode MSRE (msre_episode)."""
    return windowed_msre_reducer(window, log_every, block_length=block_length, per_episode=True)


def make_reducer(
    task: str, *, window: int | None = None, log_every: int = 50_000, block_length: int | None = None
) -> Reducer:
    """The error measures of a task kind, as the task registry says (environments.task_kind): animal
    tasks -> paper measure (window 100,000); episodic tasks ("atari", "gym") -> episodic measure
    (window 500,000). Metric names: msre_window, msre_interval and, for episodic tasks, msre_episode."""
    from environments import task_kind

    try:
        kind = task_kind(task)
    except LookupError:
        from environments import available_tasks

        raise ValueError(f"make_reducer: unknown task {task!r}; allowed: {list(available_tasks())}") from None
    return kind.reducer(window, log_every, block_length)


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"reducer parameter {name!r} must be a positive integer (steps), got {value!r}")
    return value


def _msre_reducer(log_every: int, num_blocks: int, block_length: int, per_episode: bool) -> Reducer:
    def init() -> MsreState:
        window = None
        if num_blocks:
            window = WindowState(
                block=empty_sum(),
                block_position=jnp.zeros((), jnp.int32),
                block_totals=jnp.zeros((num_blocks,), jnp.float32),
                block_counts=jnp.zeros((num_blocks,), jnp.int32),
                oldest_slot=jnp.zeros((), jnp.int32),
            )
        episodes = EpisodeState(empty_sum(), empty_sum()) if per_episode else None
        return MsreState(jnp.zeros((), jnp.int32), empty_sum(), empty_sum(), window, episodes)

    def update(state: MsreState, prediction: jax.Array, step: StreamStep, keep: jax.Array | None = None) -> MsreState:
        """One step. keep ([] bool, optional): False leaves the state as it was, bitwise equal to
        `where(keep, update(state, ...), state)` leaf by leaf, but touching one slot of the block
        ring instead of all of it (a guard that freezes diverged runs passes it: selecting the
        whole ring made XLA copy and select all window blocks every step, a cost that grows with
        window / block_length, i.e. with shorter logging intervals)."""
        scored = ~jnp.isnan(step.true_return)
        error = jnp.asarray(prediction, jnp.float32) - jnp.asarray(step.true_return, jnp.float32)
        squared = jnp.where(scored, error * error, 0.0)

        interval = add_to_sum(state.interval, squared, scored)
        interval_position = state.interval_position + 1
        interval_ends = interval_position >= log_every
        last_interval = _select(interval_ends, interval, state.last_interval)
        interval = _select(interval_ends, empty_sum(), interval)
        interval_position = jnp.where(interval_ends, 0, interval_position)

        window = state.window
        if window is not None:
            block = add_to_sum(window.block, squared, scored)
            position = window.block_position + 1
            complete = position >= block_length
            slot = window.oldest_slot
            written = complete if keep is None else complete & keep
            window = WindowState(
                block=_select(complete, empty_sum(), block),
                block_position=jnp.where(complete, 0, position),
                block_totals=window.block_totals.at[slot].set(
                    jnp.where(written, block.total, window.block_totals[slot])
                ),
                block_counts=window.block_counts.at[slot].set(
                    jnp.where(written, block.count, window.block_counts[slot])
                ),
                oldest_slot=jnp.where(complete, (slot + 1) % num_blocks, slot),
            )

        episodes = state.episodes
        if episodes is not None:
            starts = jnp.asarray(step.gamma) == 0
            finished = starts & (episodes.episode.count > 0)
            episode_mean = episodes.episode.total / jnp.maximum(episodes.episode.count, 1).astype(jnp.float32)
            episode_msre = _select(
                finished, add_to_sum(episodes.episode_msre, episode_mean, finished), episodes.episode_msre
            )
            episode = _select(starts, empty_sum(), episodes.episode)
            episodes = EpisodeState(add_to_sum(episode, squared, scored), episode_msre)

        updated = MsreState(interval_position, interval, last_interval, window, episodes)
        if keep is None:
            return updated
        if window is not None:  # the ring is already written only where kept; select the rest
            ring = (window.block_totals, window.block_counts)
            updated = updated._replace(window=window._replace(block_totals=None, block_counts=None))
            old = state._replace(window=state.window._replace(block_totals=None, block_counts=None))
            kept = _select(keep, updated, old)
            return kept._replace(window=kept.window._replace(block_totals=ring[0], block_counts=ring[1]))
        return _select(keep, updated, state)

    def read(state: MsreState) -> dict[str, jax.Array]:
        metrics = {"msre_interval": _mean(state.last_interval.total, state.last_interval.count)}
        window = state.window
        if window is not None:
            # Mid-block, the block in progress stands in for the oldest completed block.
            in_progress = window.block_position > 0
            keep = ~(in_progress & (jnp.arange(num_blocks) == window.oldest_slot))
            total = compensated_total(jnp.where(keep, window.block_totals, 0.0)) + window.block.total
            count = jnp.sum(jnp.where(keep, window.block_counts, 0)) + window.block.count
            metrics["msre_window"] = _mean(total, count)
        if state.episodes is not None:
            metrics["msre_episode"] = _mean(state.episodes.episode_msre.total, state.episodes.episode_msre.count)
        return metrics

    return Reducer(init=init, update=update, read=read)
