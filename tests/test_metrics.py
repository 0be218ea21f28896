"""On-device MSRE reducers against direct numpy computations, under vmap and inside lax.scan."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from environments.core import StreamStep
from environments.metrics import (
    atari_msre_reducer,
    interval_msre_reducer,
    make_reducer,
    paper_msre_reducer,
    windowed_msre_reducer,
)


def run_in_chunks(reducer, predictions, true_returns, gammas, chunk: int):
    """Advance a batch of reducers [batch, T] `chunk` steps per jitted scan; read after each chunk.

    Returns a list (one per chunk) of dicts of numpy [batch] arrays.
    """

    def one_run(state, prediction, true_return, gamma):
        def body(carry, step_inputs):
            p, r, g = step_inputs
            step = StreamStep(jnp.zeros((1,), jnp.float32), jnp.float32(0.0), g, r)
            return reducer.update(carry, p, step), None

        return jax.lax.scan(body, state, (prediction, true_return, gamma))[0]

    @jax.jit
    def advance(state, prediction, true_return, gamma):
        state = jax.vmap(one_run)(state, prediction, true_return, gamma)
        return state, jax.vmap(reducer.read)(state)

    batch, num_steps = predictions.shape
    state = jax.vmap(lambda _: reducer.init())(jnp.arange(batch))
    reads = []
    for start in range(0, num_steps, chunk):
        part = slice(start, start + chunk)
        state, metrics = advance(state, predictions[:, part], true_returns[:, part], gammas[:, part])
        reads.append(jax.tree.map(np.asarray, metrics))
    return reads


def random_data(batch: int, num_steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    predictions = rng.normal(0.5, 1.0, (batch, num_steps)).astype(np.float32)
    true_returns = rng.uniform(0.0, 1.0, (batch, num_steps)).astype(np.float32)
    gammas = np.full((batch, num_steps), 0.9, np.float32)
    return predictions, true_returns, gammas


@pytest.mark.parametrize(("window", "log_every", "block_length"), [(60, 20, None), (60, 30, 10), (50, 50, None)])
def test_window_msre_equals_numpy_over_last_window_steps_under_vmap(window, log_every, block_length):
    predictions, true_returns, gammas = random_data(batch=3, num_steps=8 * log_every)
    reducer = windowed_msre_reducer(window, log_every, block_length=block_length)
    reads = run_in_chunks(reducer, predictions, true_returns, gammas, log_every)
    squared = (predictions.astype(np.float64) - true_returns) ** 2
    for index, metrics in enumerate(reads):
        steps_taken = (index + 1) * log_every
        # Before the window has filled, the window averages over the steps seen so far.
        expected_window = squared[:, max(0, steps_taken - window) : steps_taken].mean(axis=1)
        expected_interval = squared[:, steps_taken - log_every : steps_taken].mean(axis=1)
        np.testing.assert_allclose(metrics["msre_window"], expected_window, rtol=2e-6)
        np.testing.assert_allclose(metrics["msre_interval"], expected_interval, rtol=2e-6)


def test_window_read_mid_block_covers_the_partial_block_and_the_newest_complete_blocks():
    predictions, true_returns, gammas = random_data(batch=2, num_steps=95)
    reducer = windowed_msre_reducer(40, 20, block_length=10)
    (metrics,) = run_in_chunks(reducer, predictions, true_returns, gammas, 95)
    squared = (predictions.astype(np.float64) - true_returns) ** 2
    np.testing.assert_allclose(metrics["msre_window"], squared[:, 60:95].mean(axis=1), rtol=2e-6)


def atari_like_data(batch: int, num_steps: int, seed: int = 1):
    """Episodes of 3..25 steps (gamma 0 on each first step); the last episode has NaN returns."""
    rng = np.random.default_rng(seed)
    predictions, true_returns, gammas = random_data(batch, num_steps, seed)
    starts = []
    for run in range(batch):
        run_starts = np.cumsum(rng.integers(3, 26, num_steps))
        run_starts = np.concatenate([[0], run_starts[run_starts < num_steps]])
        gammas[run, run_starts] = 0.0
        true_returns[run, run_starts[-1] :] = np.nan  # unfinished final episode
        starts.append(run_starts)
    return predictions, true_returns, gammas, starts


def test_atari_reducer_ignores_nan_returns_and_averages_per_episode_msre():
    window, log_every = 60, 30
    predictions, true_returns, gammas, starts = atari_like_data(batch=3, num_steps=10 * log_every)
    reads = run_in_chunks(atari_msre_reducer(window, log_every), predictions, true_returns, gammas, log_every)
    squared = (predictions.astype(np.float64) - true_returns) ** 2  # NaN where unscored
    for index, metrics in enumerate(reads):
        steps_taken = (index + 1) * log_every
        for run in range(3):
            in_window = squared[run, max(0, steps_taken - window) : steps_taken]
            in_interval = squared[run, steps_taken - log_every : steps_taken]
            expect_window = np.nanmean(in_window) if np.isfinite(in_window).any() else np.nan
            expect_interval = np.nanmean(in_interval) if np.isfinite(in_interval).any() else np.nan
            np.testing.assert_allclose(metrics["msre_window"][run], expect_window, rtol=2e-6)
            np.testing.assert_allclose(metrics["msre_interval"][run], expect_interval, rtol=2e-6)
            # An episode counts once the next one has started (its first step seen).
            bounds = starts[run]
            finished = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b < steps_taken]
            expect_episode = np.mean([squared[run, a:b].mean() for a, b in finished]) if finished else np.nan
            np.testing.assert_allclose(metrics["msre_episode"][run], expect_episode, rtol=2e-6)
    assert np.isnan(true_returns).any() and not any(np.isnan(m["msre_window"]).any() for m in reads[1:])


def test_interval_reducer_reports_the_last_completed_interval_and_nan_before_the_first():
    predictions, true_returns, gammas = random_data(batch=2, num_steps=25)
    reads = run_in_chunks(interval_msre_reducer(10), predictions, true_returns, gammas, 5)
    squared = (predictions.astype(np.float64) - true_returns) ** 2
    assert set(reads[0]) == {"msre_interval"} and np.isnan(reads[0]["msre_interval"]).all()
    np.testing.assert_allclose(reads[1]["msre_interval"], squared[:, :10].mean(axis=1), rtol=2e-6)
    np.testing.assert_allclose(reads[2]["msre_interval"], squared[:, :10].mean(axis=1), rtol=2e-6)
    np.testing.assert_allclose(reads[3]["msre_interval"], squared[:, 10:20].mean(axis=1), rtol=2e-6)


def test_msre_keeps_float32_precision_over_100000_steps():
    """A plain float32 running sum of 100,000 squared errors drifts by ~1e-5 relative here."""
    rng = np.random.default_rng(3)
    predictions = (rng.normal(0.0, 1.0, (1, 100_000)) * 3 + 1).astype(np.float32)
    true_returns = rng.uniform(0.0, 1.0, (1, 100_000)).astype(np.float32)
    gammas = np.full_like(predictions, 0.9)
    reducer = windowed_msre_reducer(100_000, 100_000, block_length=50_000)
    (metrics,) = run_in_chunks(reducer, predictions, true_returns, gammas, 100_000)
    squared = (predictions - true_returns) ** 2  # float32 per step, as on the device
    exact = math.fsum(squared[0].astype(np.float64)) / squared.size
    naive = np.cumsum(squared[0], dtype=np.float32)[-1] / squared.size
    assert abs(naive - exact) / exact > 1e-6  # the test would catch an uncompensated sum
    assert abs(metrics["msre_window"][0] - exact) / exact < 3e-7
    assert abs(metrics["msre_interval"][0] - exact) / exact < 3e-7


def test_reducer_state_is_a_few_numbers_per_window_block():
    def numbers_per_run(reducer):
        shapes = jax.eval_shape(reducer.init)
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))

    paper = numbers_per_run(paper_msre_reducer())  # 100,000 / 50,000 -> 2 blocks
    atari = numbers_per_run(atari_msre_reducer())  # 500,000 / 50,000 -> 10 blocks
    assert paper <= 2 * 2 + 16 and atari <= 2 * 10 + 24
    assert numbers_per_run(paper_msre_reducer(window=1_000_000, log_every=500_000)) == paper
    assert numbers_per_run(interval_msre_reducer(50_000)) <= 8


def test_nan_prediction_shows_as_nan_msre():
    predictions, true_returns, gammas = random_data(batch=1, num_steps=20)
    predictions[0, 3] = np.nan
    (metrics,) = run_in_chunks(paper_msre_reducer(20, 20), predictions, true_returns, gammas, 20)
    assert np.isnan(metrics["msre_window"]).all() and np.isnan(metrics["msre_interval"]).all()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: windowed_msre_reducer(100, 30, block_length=20), "multiples of block_length"),
        (lambda: windowed_msre_reducer(100_000, 30_001), "blocks exceeds"),
        (lambda: windowed_msre_reducer(0, 10), "'window'"),
        (lambda: interval_msre_reducer(2.5), "'log_every'"),
        (lambda: make_reducer("pong"), "unknown task 'pong'"),
    ],
)
def test_invalid_reducer_parameters_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_make_reducer_names_each_task_measures():
    def names(reducer):
        return set(jax.eval_shape(reducer.read, reducer.init()))

    assert names(make_reducer("trace_patterning", log_every=50_000)) == {"msre_window", "msre_interval"}
    assert names(make_reducer("noisy_patterning", window=1_000, log_every=500)) == {"msre_window", "msre_interval"}
    assert names(make_reducer("atari")) == {"msre_window", "msre_interval", "msre_episode"}


@pytest.mark.parametrize(
    ("build", "chunk"),
    [
        (lambda: windowed_msre_reducer(60, 20), 20),
        (lambda: windowed_msre_reducer(60, 30, block_length=10), 7),
        (lambda: windowed_msre_reducer(50, 50), 50),
        (lambda: atari_msre_reducer(40, 20, block_length=5), 13),
        (lambda: interval_msre_reducer(10), 10),
    ],
)
def test_update_with_keep_is_bitwise_the_select_of_update_and_old_state(build, chunk):
    """update(state, ..., keep) equals where(keep, update(state, ...), state) leaf by leaf (a guard
    freezing diverged runs), state and reads, with NaN true returns, episode starts and runs that
    stop being kept for good (divergence) or for single steps."""
    reducer = build()
    batch, num_steps = 4, 210
    predictions, true_returns, gammas = random_data(batch, num_steps, seed=3)
    rng = np.random.default_rng(4)
    true_returns[rng.random(true_returns.shape) < 0.3] = np.nan
    gammas[rng.random(gammas.shape) < 0.05] = 0.0
    keeps = rng.random((batch, num_steps)) > 0.1
    keeps[0] = True
    keeps[1] = np.arange(num_steps) < 99  # run 1 diverges at step 99: frozen one step before a block completes

    def make_advance(with_keep: bool):
        def one_run(state, prediction, true_return, gamma, keep):
            def body(carry, step_inputs):
                p, r, g, k = step_inputs
                step = StreamStep(jnp.zeros((1,), jnp.float32), jnp.float32(0.0), g, r)
                if with_keep:
                    return reducer.update(carry, p, step, keep=k), None
                updated = reducer.update(carry, p, step)
                return jax.tree.map(lambda new, old: jnp.where(k, new, old), updated, carry), None

            return jax.lax.scan(body, state, (prediction, true_return, gamma, keep))[0]

        @jax.jit
        def advance(state, *inputs):
            state = jax.vmap(one_run)(state, *inputs)
            return state, jax.vmap(reducer.read)(state)

        return advance

    states = {}
    reads = {True: [], False: []}
    for with_keep in (True, False):
        advance = make_advance(with_keep)
        state = jax.vmap(lambda _: reducer.init())(jnp.arange(batch))
        for start in range(0, num_steps, chunk):
            part = slice(start, start + chunk)
            state, metrics = advance(state, predictions[:, part], true_returns[:, part], gammas[:, part],
                                     keeps[:, part])
            reads[with_keep].append(jax.tree.map(np.asarray, metrics))
        states[with_keep] = jax.tree.map(np.asarray, state)
    assert jax.tree.structure(states[True]) == jax.tree.structure(states[False])
    for got, want in zip(jax.tree.leaves(states[True]), jax.tree.leaves(states[False]), strict=True):
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    assert len(reads[True]) == len(reads[False]) > 1
    for got, want in zip(reads[True], reads[False], strict=True):
        assert got.keys() == want.keys()
        for name in got:
            np.testing.assert_array_equal(got[name].view(np.uint8), want[name].view(np.uint8), err_msg=name)
    assert np.isfinite(reads[True][-1]["msre_interval"]).all()
