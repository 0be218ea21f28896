"""Any gymnasium environment plus a policy as a prediction stream (host side).

Step convention (the same as the Atari stream's):
  * the stream's first step, and the first step after every termination or truncation, is a
    reset step: observation = env.reset()'s, cumulant 0, gamma 0;
  * every other step is one env.step(action): observation = the observation it returned
    (the terminal one included), cumulant = its reward, gamma = the discount.
  * true_return G_t = c_{t+1} + gamma_{t+1} G_{t+1}: future cumulants only; the reset step's
    gamma 0 cuts the sum, so the last step of an episode has G = 0.

To give every step of `take(n)` its true return, the stream runs ahead of what it has delivered
until the episode covering the chunk's last step finishes, and buffers the steps it ran ahead.
An episode that runs on for `max_buffered_steps` steps without finishing is flushed with NaN
returns for those steps (this bounds memory for continuing or very long episodes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from environments.core import StreamStep
from environments.recording import checked_step_count, future_returns

Policy = Callable[[Any, np.random.Generator], Any]  # (observation as the env returns it, rng) -> action


class GymStream:
    """Host stream (environments.core.HostStream) over a gymnasium env: take(n) -> StreamStep.

    take(n): observation float32 [n, observation_size] (gymnasium.spaces.flatten of the env's
    observation), cumulant / gamma / true_return float32 [n].
    """

    def __init__(
        self,
        env: Any,
        policy: str | Policy = "random",
        *,
        seed: int = 0,
        gamma: float = 0.99,
        max_buffered_steps: int = 100_000,
    ) -> None:
        import gymnasium

        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        if max_buffered_steps <= 0:
            raise ValueError(f"max_buffered_steps must be positive, got {max_buffered_steps}")
        if isinstance(policy, str) and policy != "random":
            raise ValueError(f"Unknown gymnasium policy {policy!r}: use 'random' or a callable(obs, rng)")
        self.env = env
        self.gamma = float(gamma)
        self.max_buffered_steps = max_buffered_steps
        self.observation_size = int(gymnasium.spaces.flatdim(env.observation_space))
        self._flatten = lambda observation: gymnasium.spaces.flatten(env.observation_space, observation)
        self._rng = np.random.default_rng(seed)
        if policy == "random":
            env.action_space.seed(seed)
            self._policy: Policy = lambda observation, rng: env.action_space.sample()
        else:
            self._policy = policy
        self._seed = seed
        self._episode_over = True  # the next generated step is a reset step
        self._last_observation: Any = None
        # Steps of finished (or flushed) episodes, with returns, not yet delivered:
        self._ready: deque[StreamStep] = deque()
        self._ready_steps = 0
        # Steps of the episode in progress (no return known yet):
        self._open_observations: list[np.ndarray] = []
        self._open_cumulants: list[float] = []
        self._open_gammas: list[float] = []
        self.steps_taken = 0
        self.episodes_finished = 0

    # ---------------------------------------------------------------- generation

    def _generate_step(self) -> None:
        """Advance the environment by one stream step and file it in the open episode."""
        if self._episode_over:
            first_reset = self._last_observation is None
            observation, _info = self.env.reset(seed=self._seed) if first_reset else self.env.reset()
            cumulant, gamma = 0.0, 0.0
            self._episode_over = False
        else:
            action = self._policy(self._last_observation, self._rng)
            observation, reward, terminated, truncated, _info = self.env.step(action)
            cumulant, gamma = float(reward), self.gamma
            self._episode_over = bool(terminated or truncated)
        self._last_observation = observation
        self._open_observations.append(np.asarray(self._flatten(observation), dtype=np.float32))
        self._open_cumulants.append(cumulant)
        self._open_gammas.append(gamma)
        if self._episode_over:
            self._close_episode(finished=True)
        elif len(self._open_cumulants) >= self.max_buffered_steps:
            self._close_episode(finished=False)

    def _close_episode(self, *, finished: bool) -> None:
        """Move the open steps to the ready buffer, with returns (finished) or NaN (flushed)."""
        cumulant = np.asarray(self._open_cumulants, dtype=np.float32)
        gamma = np.asarray(self._open_gammas, dtype=np.float32)
        if finished:
            # Append the next episode's reset step (cumulant 0, gamma 0) so the sum stops there.
            returns = future_returns(np.append(cumulant, 0.0), np.append(gamma, 0.0))[:-1]
            self.episodes_finished += 1
        else:
            returns = np.full(len(cumulant), np.nan, dtype=np.float32)
        self._ready.append(StreamStep(np.stack(self._open_observations), cumulant, gamma, returns))
        self._ready_steps += len(cumulant)
        self._open_observations, self._open_cumulants, self._open_gammas = [], [], []

    # ---------------------------------------------------------------- delivery

    def take(self, num_steps: int) -> StreamStep:
        """The next num_steps steps, each with its true return (see the module docstring for NaN)."""
        n = checked_step_count(num_steps)
        while self._ready_steps < n:
            self._generate_step()
        parts: list[StreamStep] = []
        still_needed = n
        while still_needed > 0:
            piece = self._ready[0]
            if len(piece.cumulant) <= still_needed:
                parts.append(self._ready.popleft())
                still_needed -= len(piece.cumulant)
            else:
                parts.append(StreamStep(*(field[:still_needed] for field in piece)))
                self._ready[0] = StreamStep(*(field[still_needed:] for field in piece))
                still_needed = 0
        self._ready_steps -= n
        self.steps_taken += n
        if not parts:
            empty = np.zeros(0, np.float32)
            return StreamStep(np.zeros((0, self.observation_size), np.float32), empty, empty.copy(),
                              empty.copy())
        return StreamStep(*(np.concatenate(fields) for fields in zip(*parts, strict=True)))

    def close(self) -> None:
        self.env.close()


def make_gym_stream(
    env_id: str,
    policy: str | Policy = "random",
    seed: int = 0,
    gamma: float = 0.99,
    *,
    max_buffered_steps: int = 100_000,
    **make_kwargs: Any,
) -> GymStream:
    """gymnasium.make(env_id, **make_kwargs) + a policy -> GymStream (see the module docstring).

    policy: 'random' (the action space's sample(), seeded with `seed`) or a callable
    (observation, rng: np.random.Generator) -> action; `seed` seeds the first reset and the rng.
    """
    import gymnasium

    return GymStream(gymnasium.make(env_id, **make_kwargs), policy, seed=seed, gamma=gamma,
                     max_buffered_steps=max_buffered_steps)


# ---- a gymnasium task in a sweep spec: kind = "gym", env_id, policy, gamma, seed ------------------
SPEC_DEFAULTS = {"policy": "random", "gamma": 0.99, "seed": 0}


def prepare_spec_params(params: dict[str, Any], spec_dir: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A spec's gym task checked and its defaults filled in: (params, identity). ValueError for people.

    env_id must be a registered gymnasium id; policy "random" (a spec cannot hold a callable); gamma in
    [0, 1]; seed (the first reset's and the policy's) a non-negative integer. Every run of a batch
    sees the same stream (like a recorded Atari stream): the run's seed seeds the learner only.
    """
    import gymnasium

    params = {**SPEC_DEFAULTS, **params}
    env_id = params.get("env_id")
    if not isinstance(env_id, str) or not env_id:
        raise ValueError("missing parameter 'env_id' (a gymnasium environment id such as 'CartPole-v1')")
    try:
        gymnasium.spec(env_id)
    except gymnasium.error.Error as error:
        raise ValueError(f"env_id {env_id!r} is not a registered gymnasium environment ({error})") from None
    if params["policy"] != "random":
        raise ValueError(f"policy must be 'random' in a spec (a callable policy needs make_gym_stream), "
                         f"got {params['policy']!r}")
    gamma = params["gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    params["gamma"] = float(gamma)
    seed = params["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return params, dict(params)


def observation_size(params: dict[str, Any]) -> int:
    """d of a checked gym task: the flattened size of its observation space (the env is made and closed)."""
    import gymnasium

    env = gymnasium.make(params["env_id"])
    try:
        return int(gymnasium.spaces.flatdim(env.observation_space))
    finally:
        env.close()


def spec_stream(params: dict[str, Any]) -> GymStream:
    """The stream of a checked gym task (its steps are generated as the learners consume them)."""
    return make_gym_stream(params["env_id"], params.get("policy", "random"), seed=int(params.get("seed", 0)),
                           gamma=float(params.get("gamma", 0.99)))
