"""The one interface every task stream speaks, on the device and on the host.

A stream is a sequence of `StreamStep`s. At step t the learner receives
`(observation_t, cumulant_t, gamma_t)` and predicts V_t; the error of that prediction is
scored against `true_return_t` (never shown to the learner).

Two forms of the same stream exist:

* device form (gymnax-style, pure functions, vmappable over keys, runs inside `lax.scan`):
      env_state = stream.init(key)
      env_state, step = stream.step(env_state)        # step: StreamStep of scalars / [d]
* array form (recorded or host-generated): a `StreamStep` whose fields carry a leading
  time axis [T, ...]; the learners' runner scans over it (Atari replay, gymnasium).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax


class StreamStep(NamedTuple):
    """One step of a task stream (or, in array form, T steps with a leading time axis).

    observation: [d] float32   what the learner sees
    cumulant:    []  float32   the signal whose discounted sum is predicted
    gamma:       []  float32   discount for this step (0 on an episode's first step)
    true_return: []  float32   the return V_t is scored against (NaN where unknown, e.g. an
                               unfinished final episode of a recorded stream)
    """

    observation: jax.Array
    cumulant: jax.Array
    gamma: jax.Array
    true_return: jax.Array


class DeviceStream(Protocol):
    """A stream generated on the device: pure functions, jit/vmap/scan friendly.

    `observation_size` is static; `init` takes a PRNG key (vmapped over runs) and returns
    the stream's state pytree; `step` advances it by one step.
    """

    observation_size: int

    def init(self, key: jax.Array) -> Any: ...

    def step(self, state: Any) -> tuple[Any, StreamStep]: ...


class HostStream(Protocol):
    """A stream driven from the host (array form): each `take(n)` returns the next n steps.

    `take(n)` -> StreamStep of numpy arrays: observation [n, d] float32, cumulant, gamma,
    true_return [n] float32. Successive calls continue the same stream.
    """

    observation_size: int

    def take(self, num_steps: int) -> StreamStep: ...


class Reducer(NamedTuple):
    """An on-device error accumulator used inside the learners' scan (all pure, vmappable).

    init()                               -> R      (per run; a few numbers, never a per-step buffer)
    update(R, prediction [], StreamStep) -> R      (called once per step, inside scan)
    read(R)                              -> dict[str, jax.Array]   (scalars per run; host side,
                                                                     after a chunk)
    `read` does not change R: a reducer that reports per-interval numbers counts its own steps and
    rolls its interval over every `log_every` steps (environments/metrics.py).
    `update` may take a keyword `keep` ([] bool): when False the step leaves R exactly as it was
    (the orchestrator's divergence guard passes it; a reducer without it is wrapped in a select over R).
    """

    init: Callable[[], Any]
    update: Callable[[Any, jax.Array, StreamStep], Any]
    read: Callable[[Any], dict]
