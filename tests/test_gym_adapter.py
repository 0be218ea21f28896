"""Gymnasium adapter: any environment plus a policy as a (observation, cumulant, gamma) stream."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

from environments.core import StreamStep
from environments.gym_adapter import GymStream, make_gym_stream


def _simulate_cartpole(steps: int, seed: int, **make_kwargs: object) -> dict[str, np.ndarray]:
    """The same random CartPole run driven by hand: observations, rewards, episode-end flags."""
    env = gymnasium.make("CartPole-v1", **make_kwargs)
    env.action_space.seed(seed)
    observation, _ = env.reset(seed=seed)
    observations, rewards, starts = [observation], [0.0], [True]
    while len(rewards) < steps:
        observation, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        observations.append(observation)
        rewards.append(float(reward))
        starts.append(False)
        if (terminated or truncated) and len(rewards) < steps:
            observation, _ = env.reset()
            observations.append(observation)
            rewards.append(0.0)
            starts.append(True)
    return {"observation": np.array(observations[:steps], dtype=np.float32),
            "reward": np.array(rewards[:steps], dtype=np.float32), "start": np.array(starts[:steps])}


def _backward_returns_per_episode(cumulant: np.ndarray, gamma: float, starts: np.ndarray) -> np.ndarray:
    """G_t = c_{t+1} + gamma G_{t+1} inside each episode, 0 at its last step; NaN for the last episode."""
    returns = np.full(len(cumulant), np.nan)
    bounds = [*np.flatnonzero(starts).tolist()]
    for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
        following = 0.0
        for t in range(end - 1, begin - 1, -1):
            returns[t] = following
            following = cumulant[t] + gamma * following
    return returns


def test_cartpole_random_shapes_gamma_zero_after_termination_and_true_returns() -> None:
    stream = make_gym_stream("CartPole-v1", seed=3, gamma=0.9)
    chunk = stream.take(600)
    assert isinstance(chunk, StreamStep) and stream.observation_size == 4
    assert chunk.observation.shape == (600, 4) and chunk.observation.dtype == np.float32
    assert all(field.shape == (600,) and field.dtype == np.float32 for field in chunk[1:])

    expected = _simulate_cartpole(800, seed=3)
    np.testing.assert_array_equal(chunk.observation, expected["observation"][:600])
    np.testing.assert_array_equal(chunk.cumulant, expected["reward"][:600])
    np.testing.assert_array_equal(chunk.gamma, np.where(expected["start"][:600], 0, np.float32(0.9)))
    assert expected["start"][:600].sum() > 10  # many episodes ended inside the chunk

    # Every delivered step has its true return (the stream ran ahead to finish the last episode):
    assert not np.isnan(chunk.true_return).any()
    recomputed = _backward_returns_per_episode(expected["reward"], 0.9, expected["start"])
    np.testing.assert_allclose(chunk.true_return, recomputed[:600], rtol=1e-5)


def test_takes_continue_the_same_stream() -> None:
    whole = make_gym_stream("CartPole-v1", seed=5).take(300)
    stream = make_gym_stream("CartPole-v1", seed=5)
    parts = [stream.take(n) for n in (1, 99, 0, 200)]
    for field, *pieces in zip(whole, *parts, strict=True):
        np.testing.assert_array_equal(np.concatenate(pieces), field)
    assert stream.steps_taken == 300


def test_truncation_also_starts_an_episode_with_gamma_zero() -> None:
    def push_right_then_left(observation: np.ndarray, rng: np.random.Generator) -> int:
        return int(3 * observation[2] + observation[3] > 0)  # push towards the lean: balances

    stream = make_gym_stream("CartPole-v1", push_right_then_left, seed=0, max_episode_steps=25)
    chunk = stream.take(260)
    np.testing.assert_array_equal(np.flatnonzero(chunk.gamma == 0), np.arange(0, 260, 26))
    np.testing.assert_allclose(chunk.true_return[24:26], [1.0, 0.0])  # truncated: the cut is at 25 steps


def test_callable_policy_gets_the_observation_and_a_seeded_rng() -> None:
    seen: list[tuple[tuple[int, ...], float]] = []

    def policy(observation: np.ndarray, rng: np.random.Generator) -> int:
        seen.append((observation.shape, rng.random()))
        return 1

    make_gym_stream("CartPole-v1", policy, seed=11).take(50)
    first = list(seen)
    seen.clear()
    make_gym_stream("CartPole-v1", policy, seed=11).take(50)
    assert first == seen and first[0][0] == (4,)


def test_episodes_longer_than_the_buffer_are_delivered_with_nan_returns() -> None:
    env = gymnasium.make("CartPole-v1")
    balance = lambda observation, rng: int(3 * observation[2] + observation[3] > 0)
    stream = GymStream(env, balance, max_buffered_steps=40)
    chunk = stream.take(120)
    assert np.isnan(chunk.true_return[:40]).all()


def test_discrete_observations_are_flattened_one_hot() -> None:
    chunk = make_gym_stream("FrozenLake-v1", seed=0).take(20)
    assert chunk.observation.shape == (20, 16)
    np.testing.assert_array_equal(chunk.observation.sum(axis=1), np.ones(20))


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="policy"):
        make_gym_stream("CartPole-v1", policy="greedy")
    with pytest.raises(ValueError, match="non-negative"):
        make_gym_stream("CartPole-v1").take(-1)
