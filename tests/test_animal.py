"""Animal-learning streams: the paper task's statistics, the reference variants' structure, the
online true return against a backward recomputation, determinism, and the `make` registry."""

from __future__ import annotations

import functools
import subprocess
import sys
from math import comb

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import environments
from environments import make, make_device_stream, split_run_seed
from environments.animal import (
    ConditioningStream,
    distractor_probabilities,
    paper_trace_patterning,
    rafiee_noisy_patterning,
    rafiee_trace_conditioning,
    rafiee_trace_patterning,
)

PAPER_SEEDS = (0, 1, 2)
PAPER_STEPS = 60_000  # per seed: ~410 trials each, ~1,200 together


@functools.cache
def generate(stream: ConditioningStream, seeds: tuple[int, ...], num_steps: int):
    """Streams of `seeds`, vmapped on the device: StreamStep of numpy [seeds, steps, ...]."""
    env_keys = jax.vmap(lambda seed: split_run_seed(seed)[0])(jnp.asarray(seeds))

    def one(key):
        return jax.lax.scan(lambda state, _: stream.step(state), stream.init(key), None, length=num_steps)[1]

    return jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(env_keys))


def trials_of(observation: np.ndarray, cs_columns: slice, us_column: int, cs_steps: int, isi_max: int):
    """Per visible trial: (onset, CS pattern, US onset within isi_max of it or -1), and the onsets.

    A trial whose random pattern is all zeros (reference patterning) shows no CS: its US, if any,
    comes more than isi_max after the previous visible onset and is not attributed.
    """
    cs_on = observation[:, cs_columns].any(axis=1)
    onsets = np.flatnonzero(cs_on & ~np.concatenate([[False], cs_on[:-1]]))
    us = observation[:, us_column] > 0
    us_onsets = np.flatnonzero(us & ~np.concatenate([[False], us[:-1]]))
    bounds = np.append(onsets, len(observation))
    result = []
    for onset, next_onset in zip(bounds[:-1], bounds[1:], strict=True):
        inside = us_onsets[(us_onsets >= onset) & (us_onsets < min(next_onset, onset + isi_max + 1))]
        assert len(inside) <= 1, "at most one US per trial"
        result.append((onset, tuple(observation[onset, cs_columns]), inside[0] if len(inside) else -1))
    # Every onset shows the pattern for exactly cs_steps steps.
    for onset, pattern, _ in result[:-1]:
        np.testing.assert_array_equal(observation[onset : onset + cs_steps, cs_columns], [pattern] * cs_steps)
    return result, onsets


def backward_returns(cumulant: np.ndarray, gamma: np.ndarray, include_current: bool) -> np.ndarray:
    """float64 G_t = c_{t+1} + gamma G_{t+1} (or c_t + gamma G_{t+1}), G after the end taken as 0."""
    returns = np.zeros(len(cumulant))
    following = 0.0
    for t in range(len(cumulant) - 1, -1, -1):
        if include_current:
            following = cumulant[t] + gamma[t] * following
            returns[t] = following
        else:
            returns[t] = following
            following = cumulant[t] + gamma[t] * following
    return returns


# ---- the paper's trace patterning ---------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_stream():
    return case_stream("paper_trace_patterning")[1]


def test_paper_trace_patterning_isi_and_iti_ranges_are_exactly_covered(paper_stream):
    isis, itis, lengths = [], [], []
    for run in range(len(PAPER_SEEDS)):
        trials, onsets = trials_of(paper_stream.observation[run], slice(0, 6), 6, cs_steps=1, isi_max=36)
        lengths += list(np.diff(onsets))
        for (onset, _, us_onset), next_onset in zip(trials[:-1], onsets[1:], strict=True):
            if us_onset >= 0:
                isis.append(us_onset - onset)
                itis.append(next_onset - us_onset - 1)  # a trial lasts ISI + ITI + 1 steps
    assert set(isis) == set(range(24, 37))
    assert set(itis) == set(range(80, 121))
    assert min(lengths) >= 24 + 80 + 1 and max(lengths) <= 36 + 120 + 1


def test_paper_trace_patterning_us_follows_exactly_ten_valid_half_on_patterns(paper_stream):
    reinforced_fraction = []
    for run in range(len(PAPER_SEEDS)):
        trials, _ = trials_of(paper_stream.observation[run], slice(0, 6), 6, cs_steps=1, isi_max=36)
        trials = trials[:-1]  # the last one may be cut before its US
        shown = {pattern for _, pattern, _ in trials}
        followed = {pattern for _, pattern, us_onset in trials if us_onset >= 0}
        unfollowed = {pattern for _, pattern, us_onset in trials if us_onset < 0}
        assert len(shown) == comb(6, 3) and all(sum(pattern) == 3 for pattern in shown)
        assert len(followed) == 10 and not followed & unfollowed
        reinforced_fraction.append(np.mean([us_onset >= 0 for _, _, us_onset in trials]))
    assert abs(np.mean(reinforced_fraction) - 0.5) < 0.04
    # The valid set is drawn per seed.
    per_seed = [
        frozenset(p for _, p, u in trials_of(paper_stream.observation[r], slice(0, 6), 6, 1, 36)[0][:-1] if u >= 0)
        for r in range(2)
    ]
    assert per_seed[0] != per_seed[1]


def test_paper_trace_patterning_distractor_k_fires_with_probability_one_over_ten_k(paper_stream):
    rates = paper_stream.observation[:, :, 7:12].reshape(-1, 5).mean(axis=0)
    np.testing.assert_allclose(rates, 1.0 / (10.0 * np.arange(1, 6)), rtol=0.06)
    np.testing.assert_allclose(distractor_probabilities(5), [0.1, 0.05, 1 / 30, 0.025, 0.02], rtol=1e-6)


def test_paper_trace_patterning_step_layout_is_float32_cs_us_distractors(paper_stream):
    assert paper_trace_patterning().observation_size == 12
    for field in paper_stream:
        assert field.dtype == np.float32
    assert paper_stream.observation.shape == (len(PAPER_SEEDS), PAPER_STEPS, 12)
    np.testing.assert_array_equal(paper_stream.cumulant, paper_stream.observation[..., 6])
    np.testing.assert_array_equal(paper_stream.gamma, np.float32(0.9))


def test_paper_true_return_is_gamma_power_while_the_valid_us_is_ahead(paper_stream):
    """BENCHMARKS 1a: gamma^(m-1) while a valid trial's US is m steps ahead. From a valid trial's
    onset to its US the next trial's US is >= 24 + 80 + 1 steps away (<= gamma^104 ~ 1.7e-5)."""
    observation, cumulant = paper_stream.observation[0], paper_stream.cumulant[0]
    true_return = paper_stream.true_return[0]
    onsets = np.flatnonzero(observation[:, :6].any(axis=1))
    for us_step in np.flatnonzero(cumulant):
        onset = onsets[onsets < us_step].max()  # the onset of this US's trial
        expected = 0.9 ** (us_step - np.arange(onset, us_step + 1) - 1.0)
        expected[-1] = 0.0  # the US step itself
        np.testing.assert_allclose(true_return[onset : us_step + 1], expected, rtol=2e-6, atol=1.01 * 0.9**104)
        assert abs(true_return[us_step - 1] - 1.0) < 2e-5


def test_lookahead_covers_the_return_tail_to_float32_resolution():
    assert paper_trace_patterning().lookahead_trials == 2
    assert paper_trace_patterning(lookahead_trials=0).lookahead_trials == 0
    assert rafiee_trace_conditioning(isi=80).lookahead_trials >= 10  # gamma 0.9875
    with pytest.raises(ValueError, match="lookahead_trials"):
        paper_trace_patterning(isi_range=(20, 20), iti_range=(1, 1), gamma=0.999)


# ---- online true return == backward recomputation, every task and variant ----------------------

# Each case is also the stream of a structure test below (one compilation each).
RETURN_CASES = {
    "paper_trace_patterning": (paper_trace_patterning(), PAPER_SEEDS, PAPER_STEPS),
    "paper_trace_patterning_isi80_gamma098": (paper_trace_patterning(isi_range=(80, 80), gamma=0.98), (11,), 30_000),
    "rafiee_trace_conditioning_isi10": (rafiee_trace_conditioning(isi=10), (11,), 20_000),
    "rafiee_trace_conditioning_isi80_current_cumulant": (
        rafiee_trace_conditioning(isi=80, return_includes_current_cumulant=True), (11,), 30_000,
    ),
    "rafiee_trace_patterning_isi30": (rafiee_trace_patterning(isi=30, num_distractors=4), (11,), 100_000),
    "rafiee_noisy_patterning": (rafiee_noisy_patterning(noise=0.1), (11,), 120_000),
}


def case_stream(case: str):
    stream, seeds, num_steps = RETURN_CASES[case]
    return stream, generate(stream, seeds, num_steps)


@pytest.mark.parametrize("case", sorted(RETURN_CASES))
def test_online_true_return_equals_backward_recomputation(case):
    stream, steps = case_stream(case)
    cumulant, gamma, true_return = steps.cumulant[0], steps.gamma[0], steps.true_return[0]
    assert cumulant.sum() > 20
    expected = backward_returns(cumulant.astype(np.float64), gamma.astype(np.float64),
                                stream.return_includes_current_cumulant)
    # Far enough from the end that returns beyond it are below float32 resolution.
    horizon = int(np.ceil(np.log(1e-9) / np.log(stream.gamma)))
    np.testing.assert_allclose(true_return[:-horizon], expected[:-horizon], rtol=3e-6, atol=2e-7)


# ---- the reference (rafiee) variants ------------------------------------------------------------


def test_rafiee_trace_conditioning_cs_4_steps_us_2_steps_isi_in_reference_range():
    _, steps = case_stream("rafiee_trace_conditioning_isi10")
    observation = steps.observation[0]
    assert observation.shape[1] == 12  # [US, CS, 10 distractors]
    np.testing.assert_array_equal(observation[:, 0], steps.cumulant[0])
    trials, onsets = trials_of(observation, slice(1, 2), 0, cs_steps=4, isi_max=13)
    isis = [us_onset - onset for onset, _, us_onset in trials[:-1]]
    assert set(isis) == set(range(7, 14))  # 10 -+ floor(10 / 3)
    us = observation[:, 0]
    for onset, _, us_onset in trials[:-1]:
        np.testing.assert_array_equal(us[us_onset : us_onset + 3], [1, 1, 0])
        assert not observation[onset + 4, 1]
    itis = np.diff(onsets) - np.array(isis)
    assert itis.min() >= 80 and itis.max() <= 120


def test_rafiee_trace_conditioning_distractors_run_4_steps_then_rest_at_reference_rates():
    observation = case_stream("rafiee_trace_conditioning_isi10")[1].observation[0]
    distractors = observation[:, 2:]
    starts_per_idle_step = []
    for column in range(10):
        bits = np.concatenate([[0], distractors[:, column], [0]])
        edges = np.diff(bits)
        run_starts, run_ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        runs = run_ends - run_starts
        assert np.all(runs[:-1] == 4)  # the last run may be cut
        assert np.all(run_starts[1:] - run_ends[:-1] >= 1)  # at least one step off between runs
        # An idle step (not the forced rest right after a run) starts a run with 1 / (10 (d + 1)).
        idle_steps = len(bits) - 2 - 5 * len(runs)
        starts_per_idle_step.append(len(runs) / idle_steps)
    np.testing.assert_allclose(starts_per_idle_step[:3], [0.1, 0.05, 1 / 30], rtol=0.15)


def test_rafiee_trace_patterning_us_follows_activation_patterns_only():
    _, steps = case_stream("rafiee_trace_patterning_isi30")
    observation = steps.observation[0]
    trials, _ = trials_of(observation, slice(1, 7), 0, cs_steps=4, isi_max=40)
    trials = trials[:-1]
    followed = {pattern for _, pattern, us_onset in trials if us_onset >= 0}
    unfollowed = {pattern for _, pattern, us_onset in trials if us_onset < 0}
    assert len(followed) == 10 and all(sum(p) == 3 for p in followed) and not followed & unfollowed
    assert abs(np.mean([us_onset >= 0 for _, _, us_onset in trials]) - 0.5) < 0.05
    assert {us_onset - onset for onset, _, us_onset in trials if us_onset >= 0} == set(range(20, 41))  # 30 -+ 10
    # Distractors: a random pattern started with the CS, each on for 4 steps.
    distractors = observation[:, 7:11]
    for onset, _, _ in trials:
        np.testing.assert_array_equal(distractors[onset : onset + 4], [distractors[onset]] * 4)
        assert not distractors[onset + 4 : onset + 80].any()
    assert 0.4 < distractors[[onset for onset, _, _ in trials]].mean() < 0.6


def test_rafiee_noisy_patterning_us_right_after_cs_and_flipped_with_noise_probability():
    _, steps = case_stream("rafiee_noisy_patterning")
    trials, _ = trials_of(steps.observation[0], slice(1, 7), 0, cs_steps=4, isi_max=4)
    trials = trials[:-1]
    assert {us_onset - onset for onset, _, us_onset in trials if us_onset >= 0} == {4}
    # Activation patterns: the half-on patterns followed by the US most of the time.
    by_pattern: dict[tuple, list[bool]] = {}
    for _, pattern, us_onset in trials:
        by_pattern.setdefault(pattern, []).append(us_onset >= 0)
    activation = {p for p, outcomes in by_pattern.items() if sum(p) == 3 and np.mean(outcomes) > 0.5}
    assert len(activation) == 10
    hit = np.concatenate([outcomes for p, outcomes in by_pattern.items() if p in activation])
    miss = np.concatenate([outcomes for p, outcomes in by_pattern.items() if p not in activation])
    assert abs(hit.mean() - 0.9) < 0.04 and abs(miss.mean() - 0.1) < 0.04


def test_rafiee_gamma_follows_the_reference_isi_table():
    assert rafiee_trace_conditioning(isi=80).gamma == 0.9875
    assert rafiee_trace_patterning(isi=20).gamma == 0.95
    assert rafiee_trace_conditioning(isi=15, gamma=0.93).gamma == 0.93
    assert rafiee_noisy_patterning().isi_range == (4, 4)


# ---- determinism and chunking -------------------------------------------------------------------


def test_same_seed_same_stream_and_different_seed_different_stream():
    first = make("trace_patterning", variant="paper", seed=3).take(4_000)
    again = make("trace_patterning", variant="paper", seed=3).take(4_000)
    other = make("trace_patterning", variant="paper", seed=4).take(4_000)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.observation, other.observation)


def test_take_twice_equals_one_take_of_double_length():
    stream = make("trace_patterning", variant="paper", seed=7)
    halves = [stream.take(4_000), stream.take(4_000)]
    whole = make("trace_patterning", variant="paper", seed=7).take(8_000)
    for field, (first, second) in zip(whole, zip(*halves, strict=True), strict=True):
        np.testing.assert_array_equal(np.concatenate([first, second]), field)
    assert whole.observation.shape == (8_000, 12) and whole.true_return.shape == (8_000,)


def test_vmapped_streams_equal_separate_streams(paper_stream):
    for row, seed in enumerate(PAPER_SEEDS):
        alone = make("trace_patterning", variant="paper", seed=seed).take(4_000)
        for batched_field, alone_field in zip(paper_stream, alone, strict=True):
            np.testing.assert_array_equal(batched_field[row, :4_000], alone_field)


def test_split_run_seed_gives_distinct_deterministic_vmappable_keys():
    env_key, learner_key = split_run_seed(5)
    assert not np.array_equal(jax.random.key_data(env_key), jax.random.key_data(learner_key))
    np.testing.assert_array_equal(jax.random.key_data(split_run_seed(5)[0]), jax.random.key_data(env_key))
    env_keys, learner_keys = jax.vmap(split_run_seed)(jnp.arange(4, 7))
    np.testing.assert_array_equal(jax.random.key_data(env_keys[1]), jax.random.key_data(env_key))
    np.testing.assert_array_equal(jax.random.key_data(learner_keys[1]), jax.random.key_data(learner_key))


# ---- the registry -------------------------------------------------------------------------------


def test_device_stream_is_hashable_and_runs_inside_jit():
    stream = make_device_stream("trace_patterning", variant="rafiee", isi=20)
    assert stream == rafiee_trace_patterning(isi=20) and hash(stream) == hash(rafiee_trace_patterning(isi=20))
    assert stream.observation_size == 1 + 6 + 10


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: make("tracepatterning"), ["'tracepatterning'", "trace_patterning", "atari"]),
        (lambda: make("trace_patterning", variant="papr"), ["'papr'", "paper", "rafiee"]),
        (lambda: make("trace_patterning", variant="paper", isi=30), ["'isi'", "isi_range"]),
        (lambda: make("trace_patterning", isi_range=(30, 20)), ["isi_range", ">= 30"]),
        (lambda: make("trace_patterning", gamma=1.0), ["gamma", "[0, 1)"]),
        (lambda: make("trace_conditioning", isi=15), ["isi=15", "gamma"]),
        (lambda: make("trace_patterning", variant="rafiee", num_activation_patterns=21),
         ["num_activation_patterns", "[1, 20]"]),
        (lambda: make("noisy_patterning", noise=1.5), ["noise", "[0, 1]"]),
        (lambda: make("trace_patterning", seed="zero"), ["seed"]),
        (lambda: make_device_stream("trace_patterning", seed=0), ["seed", "split_run_seed"]),
    ],
)
def test_unknown_or_invalid_parameters_raise_value_error_naming_them(call, words):
    with pytest.raises(ValueError) as error:
        call()
    for word in words:
        assert word in str(error.value)


def test_host_only_tasks_are_lazy_and_unavailable_ones_fail_clearly():
    code = "import sys, environments; print('ale_py' in sys.modules, 'gymnasium' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
    assert {"atari", "gym", "trace_patterning"} <= set(environments.available_tasks())
    missing = environments._lazy_host_factory("ghost", "environments.no_such_module", "make_ghost")
    with pytest.raises(ValueError, match="task 'ghost' is not available"):
        missing()
    with pytest.raises(ValueError, match="no device form"):
        make_device_stream("atari")
