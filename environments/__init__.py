"""Task streams, by name: `make` (host form, `take(n)` chunks) and `make_device_stream` (device form).

    from environments import make
    stream = make("trace_patterning", variant="paper", seed=0)
    chunk = stream.take(100_000)   # StreamStep of numpy arrays: observation [n, d], cumulant [n], ...
    chunk = stream.take(100_000)   # the next 100,000 steps of the same stream

Tasks live in a registry (`register_task`). The animal-learning tasks are pure JAX and have both
forms; "atari" (environments/atari.py) and "gym" (environments/gym_adapter.py) are host-only and are
imported only when asked for, so importing `environments` never imports ale_py or gymnasium.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from environments.animal import (
    DEFAULT_VARIANT as ANIMAL_DEFAULT_VARIANT,
)
from environments.animal import (
    ConditioningStream,
    make_animal_stream,
    split_run_seed,
)
from environments.core import DeviceStream, HostStream, Reducer, StreamStep
from environments.metrics import (
    atari_msre_reducer,
    interval_msre_reducer,
    make_reducer,
    paper_msre_reducer,
    windowed_msre_reducer,
)

__all__ = [
    "ConditioningStream",
    "DeviceHostStream",
    "DeviceStream",
    "HostStream",
    "Reducer",
    "StreamStep",
    "atari_msre_reducer",
    "available_tasks",
    "interval_msre_reducer",
    "make",
    "make_device_stream",
    "make_reducer",
    "paper_msre_reducer",
    "register_task",
    "split_run_seed",
    "windowed_msre_reducer",
]


@dataclass(frozen=True)
class TaskEntry:
    """How to build a task: its host stream, and its device stream when it has one."""

    make_host: Callable[..., HostStream]
    make_device: Callable[..., DeviceStream] | None = None


_REGISTRY: dict[str, TaskEntry] = {}


def register_task(
    name: str,
    make_host: Callable[..., HostStream],
    make_device: Callable[..., DeviceStream] | None = None,
) -> None:
    """Register a task by name; `make_host(**params)` must return an object with `take(n)`."""
    _REGISTRY[name] = TaskEntry(make_host=make_host, make_device=make_device)


def available_tasks() -> tuple[str, ...]:
    """Registered task names (a registered task may still fail to load its optional dependency)."""
    return tuple(sorted(_REGISTRY))


def make(name: str, **params: Any) -> HostStream:
    """The host stream of task `name`; ValueError for an unknown task or parameter."""
    return _entry(name).make_host(**params)


def make_device_stream(name: str, **params: Any) -> DeviceStream:
    """The device stream (pure init/step, for the learners' scan) of task `name`; no seed here:
    pass the env key from `split_run_seed(seed)` to its `init`."""
    entry = _entry(name)
    if entry.make_device is None:
        raise ValueError(
            f"task {name!r} has no device form (it is generated on the host); use make({name!r}, ...) "
            f"and feed its chunks as arrays. Tasks with a device form: "
            f"{sorted(n for n, e in _REGISTRY.items() if e.make_device is not None)}"
        )
    return entry.make_device(**params)


def _entry(name: str) -> TaskEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; allowed: {list(available_tasks())}")
    return _REGISTRY[name]


# ---- device streams driven from the host -------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 2))
def _advance(stream: DeviceStream, state: Any, num_steps: int) -> tuple[Any, StreamStep]:
    return jax.lax.scan(lambda carry, _: stream.step(carry), state, None, length=num_steps)


class DeviceHostStream:
    """Host form of a device stream: `take(n)` runs n steps in one jitted scan, keeping the state.

    `device_stream` is the underlying DeviceStream; one compilation per distinct chunk length.
    """

    def __init__(self, device_stream: DeviceStream, env_key: jax.Array):
        self.device_stream = device_stream
        self.observation_size = device_stream.observation_size
        self._state = device_stream.init(env_key)

    def take(self, num_steps: int) -> StreamStep:
        """The next `num_steps` steps: StreamStep of numpy arrays, observation [n, d], others [n]."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 0:
            raise ValueError(f"take: num_steps must be a non-negative integer, got {num_steps!r}")
        self._state, chunk = _advance(self.device_stream, self._state, int(num_steps))
        return StreamStep(*(np.asarray(field) for field in chunk))


def _animal_entry(task: str) -> TaskEntry:
    def make_host(*, seed: int = 0, variant: str | None = None, **params: Any) -> HostStream:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"task {task!r}: parameter 'seed' must be an integer, got {seed!r}")
        env_key, _ = split_run_seed(int(seed))
        return DeviceHostStream(make_animal_stream(task, variant, **params), env_key)

    def make_device(*, variant: str | None = None, **params: Any) -> DeviceStream:
        if "seed" in params:
            raise ValueError(
                f"task {task!r}: make_device_stream takes no 'seed'; pass split_run_seed(seed)[0] "
                "to the stream's init(key)"
            )
        return make_animal_stream(task, variant, **params)

    return TaskEntry(make_host=make_host, make_device=make_device)


def _lazy_host_factory(task: str, module: str, function: str) -> Callable[..., HostStream]:
    """A factory that imports `module.function` only when the task is made."""

    def make_host(**params: Any) -> HostStream:
        try:
            factory = getattr(importlib.import_module(module), function)
        except ImportError as error:  # the module, or a dependency of it, is missing
            raise ValueError(f"task {task!r} is not available: cannot import {module} ({error})") from error
        except AttributeError as error:
            raise ValueError(f"task {task!r} is not available: {module} has no {function}()") from error
        _check_keywords(task, factory, params)
        return factory(**params)

    return make_host


def _check_keywords(task: str, factory: Callable[..., Any], params: dict[str, Any]) -> None:
    """ValueError for a parameter `factory` does not take (unless it takes **kwargs)."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    allowed = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for name in params:
        if name not in allowed:
            raise ValueError(f"task {task!r}: unknown parameter {name!r}; allowed: {allowed}")


for _task in ANIMAL_DEFAULT_VARIANT:
    _REGISTRY[_task] = _animal_entry(_task)
register_task("atari", _lazy_host_factory("atari", "environments.atari", "make_atari_stream"))
register_task("gym", _lazy_host_factory("gym", "environments.gym_adapter", "make_gym_stream"))
