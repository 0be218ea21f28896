"""Task streams, by name: `make` (host form, `take(n)` chunks) and `make_device_stream` (device form).

    from environments import make
    stream = make("trace_patterning", variant="paper", seed=0)
    chunk = stream.take(100_000)   # StreamStep of numpy arrays: observation [n, d], cumulant [n], ...
    chunk = stream.take(100_000)   # the next 100,000 steps of the same stream

Every task kind lives in one registry (`register_task`, `task_kind`), and the orchestrator asks it
for everything: the parameters a spec may set, their checks and defaults, the observation size, the
streams and the error measures (docs/environments.md). The animal-learning tasks are pure JAX and have
both forms; "atari" (environments/atari.py) and "gym" (environments/gym_adapter.py) are host-only and
are imported only when asked for, so importing `environments` never imports ale_py or gymnasium. A spec
may also name an external task by module path (`task_kind("my_package.my_task")`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from environments.animal import (
    ANIMAL_BUILDERS,
    ConditioningStream,
    make_animal_stream,
    split_run_seed,
)
from environments.animal import (
    DEFAULT_VARIANT as ANIMAL_DEFAULT_VARIANT,
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
    "TaskKind",
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
    "task_kind",
    "windowed_msre_reducer",
]


WINDOW_PARAM = "window"  # a task parameter of the error measure (msre_window's length), not of the stream
ANIMAL_METRICS = ("msre_window", "msre_interval")
EPISODIC_METRICS = ("msre_window", "msre_interval", "msre_episode")


@dataclass(frozen=True)
class TaskKind:
    """A task kind: how to build its streams and check its parameters, and how it is measured.

    make_host(**params) -> HostStream and/or make_device(**params) -> DeviceStream (a task with a
    device form is generated inside the learners' scan; a host-only task, e.g. Atari or gym, is
    driven from the host, its chunks shared by every run of a batch).
    episodic: measured per episode too (msre_episode) with the long default window; else the
    animal-learning measure. named_by: parameters that join its default name ("gym-CartPole-v1-random").
    prepare(params, spec_dir) -> (params, identity): validates a spec's parameters before anything
    runs and fills in defaults (writing a default or leaving it out names the same runs); identity is
    what names the task in run keys (default: the params). Raises ValueError / TypeError /
    FileNotFoundError with a message for people.
    parameters(params) -> the names a spec may set (or a problem text); default: make_host's or
    make_device's keyword parameters. observation_size(params) -> d (default: build a stream).
    recording_frames(params) -> how many steps its recording holds (None: unbounded).
    spec_stream(params) -> its host stream from a spec's parameters when they are not make_host's keywords.
    """

    name: str
    make_host: Callable[..., HostStream] | None = None
    make_device: Callable[..., DeviceStream] | None = None
    episodic: bool = False
    named_by: tuple[str, ...] = ()
    prepare: Callable[[dict[str, Any], Path | None], tuple[dict[str, Any], dict[str, Any]]] | None = None
    parameters: Callable[[dict[str, Any]], tuple[str, ...] | str] | None = None
    observation_size: Callable[[dict[str, Any]], int] | None = None
    recording_frames: Callable[[dict[str, Any]], int | None] | None = None
    spec_stream: Callable[[dict[str, Any]], HostStream] | None = None  # host stream from a spec's params

    # -- what the orchestrator asks -------------------------------------------------------
    @property
    def device(self) -> bool:
        """Generated on the device inside the scan (else driven from the host)."""
        return self.make_device is not None

    @property
    def metrics(self) -> tuple[str, ...]:
        return EPISODIC_METRICS if self.episodic else ANIMAL_METRICS

    primary_metric = "msre_window"

    def default_name(self, params: dict[str, Any]) -> str:
        return "-".join([self.name, *(str(params[key]) for key in self.named_by if key in params)])

    def allowed_params(self, params: dict[str, Any]) -> tuple[str, ...] | str:
        """The parameter names a spec may set (given the others, e.g. a variant), or a problem text."""
        if self.parameters is not None:
            allowed = self.parameters(params)
            return allowed if isinstance(allowed, str) else (*allowed, WINDOW_PARAM)
        factory = self.make_device or self.make_host
        parameters = inspect.signature(factory).parameters
        return (*(n for n, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)),
                WINDOW_PARAM)

    def check(self, params: dict[str, Any], spec_dir: Path | None = None) -> tuple[dict, dict, int, int | None]:
        """A spec's parameters checked: (params, identity, observation size d, recording frames or None)."""
        window = params.get(WINDOW_PARAM)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"{WINDOW_PARAM} must be a positive number of steps, got {window!r}")
        params, identity = self.prepare(dict(params), spec_dir) if self.prepare else (dict(params), dict(params))
        if self.observation_size is not None:
            size = int(self.observation_size(params))
        elif self.device:
            size = int(self.device_stream(params).observation_size)
        else:
            size = int(self.host_stream(params).observation_size)
        frames = self.recording_frames(params) if self.recording_frames is not None else None
        return params, identity, size, frames

    def device_stream(self, params: dict[str, Any]) -> DeviceStream:
        if self.make_device is None:
            raise ValueError(f"task {self.name!r} has no device form (it is generated on the host)")
        return self.make_device(**stream_params(params))

    def host_stream(self, params: dict[str, Any]) -> HostStream:
        """The host stream of the task (a host-only task's; fresh, at its first step)."""
        if self.spec_stream is not None:
            return self.spec_stream(stream_params(params))
        if self.make_host is None:
            raise ValueError(f"task {self.name!r} has no host form")
        return self.make_host(**stream_params(params))

    def reducer(self, window: int | None, log_every: int, block_length: int | None = None) -> Reducer:
        """The on-device error measures (names: `metrics`); window defaults per kind (docs/environments.md)."""
        from environments import metrics as measures

        if self.episodic:
            return measures.atari_msre_reducer(measures.ATARI_WINDOW if window is None else window, log_every,
                                               block_length=block_length)
        return measures.paper_msre_reducer(measures.PAPER_WINDOW if window is None else window, log_every,
                                           block_length=block_length)


def stream_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters handed to a stream's builder (the measure's `window` removed)."""
    return {key: value for key, value in params.items() if key != WINDOW_PARAM}


_REGISTRY: dict[str, TaskKind] = {}


def register_task(
    name: str,
    make_host: Callable[..., HostStream] | None = None,
    make_device: Callable[..., DeviceStream] | None = None,
    **kind: Any,
) -> TaskKind:
    """Register a task by name; `make_host(**params)` must return an object with `take(n)`; further
    keywords are TaskKind's (episodic, named_by, prepare, parameters, observation_size, ...)."""
    _REGISTRY[name] = TaskKind(name, make_host, make_device, **kind)
    return _REGISTRY[name]


def available_tasks() -> tuple[str, ...]:
    """Registered task names (a registered task may still fail to load its optional dependency)."""
    return tuple(sorted(_REGISTRY))


def task_kind(kind: str) -> TaskKind:
    """The TaskKind of a registered name or of an importable module path ('my_package.my_task').

    An external task module defines `TASK` (a TaskKind), or `make_device_stream(**params)` and/or
    `make_host_stream(**params)` (plus optional EPISODIC and NAMED_BY). LookupError for an unknown
    name, ValueError for a module that does not import or defines neither.
    """
    if kind in _REGISTRY:
        return _REGISTRY[kind]
    if not isinstance(kind, str) or "." not in kind:
        raise LookupError(f"unknown task kind {kind!r}")
    try:
        module = importlib.import_module(kind)
    except ImportError as error:
        raise ValueError(f"task {kind!r}: cannot import {kind} ({error})") from None
    task = getattr(module, "TASK", None)
    if isinstance(task, TaskKind):
        return dataclasses.replace(task, name=kind)
    make_device = getattr(module, "make_device_stream", None)
    make_host = getattr(module, "make_host_stream", None)
    if not callable(make_device) and not callable(make_host):
        raise ValueError(
            f"task {kind!r}: {kind} defines neither TASK (an environments.TaskKind) nor "
            "make_device_stream(**params) / make_host_stream(**params)"
        )
    return TaskKind(kind, make_host if callable(make_host) else None, make_device if callable(make_device) else None,
                    episodic=bool(getattr(module, "EPISODIC", False)),
                    named_by=tuple(getattr(module, "NAMED_BY", ())))


def make(name: str, **params: Any) -> HostStream:
    """The host stream of task `name`; ValueError for an unknown task or parameter."""
    entry = _entry(name)
    if entry.make_host is None:
        raise ValueError(f"task {name!r} has no host form; use make_device_stream({name!r}, ...)")
    return entry.make_host(**params)


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


def _entry(name: str) -> TaskKind:
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


def _animal_kind(task: str) -> TaskKind:
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

    def parameters(params: dict[str, Any]) -> tuple[str, ...] | str:
        variant = params.get("variant", ANIMAL_DEFAULT_VARIANT[task])
        builder = ANIMAL_BUILDERS.get((task, variant))
        if builder is None:
            variants = sorted(v for t, v in ANIMAL_BUILDERS if t == task)
            return f"unknown variant {variant!r} of {task} (allowed: {', '.join(variants)})"
        return ("variant", *inspect.signature(builder).parameters)

    def prepare(params: dict[str, Any], spec_dir: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The builder's defaults filled in (a default written or left out names the same runs)."""
        variant = params.get("variant", ANIMAL_DEFAULT_VARIANT[task])
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(ANIMAL_BUILDERS[(task, variant)]).parameters.items()
            if parameter.default is not inspect.Parameter.empty and parameter.default is not None
        }
        params = {"variant": variant, **defaults, **params}
        return params, dict(params)

    return TaskKind(task, make_host, make_device, named_by=("variant",), prepare=prepare, parameters=parameters)


def _lazy_host_factory(task: str, module: str, function: str) -> Callable[..., HostStream]:
    """A factory that imports `module.function` only when the task is made."""

    def make_host(**params: Any) -> HostStream:
        factory = _lazy_function(task, module, function)
        _check_keywords(task, factory, params)
        return factory(**params)

    return make_host


def _lazy_function(task: str, module: str, function: str) -> Callable[..., Any]:
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as error:  # the module, or a dependency of it, is missing
        raise ValueError(f"task {task!r} is not available: cannot import {module} ({error})") from error
    except AttributeError as error:
        raise ValueError(f"task {task!r} is not available: {module} has no {function}()") from error


def _check_keywords(task: str, factory: Callable[..., Any], params: dict[str, Any]) -> None:
    """ValueError for a parameter `factory` does not take (unless it takes **kwargs)."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    allowed = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for name in params:
        if name not in allowed:
            raise ValueError(f"task {task!r}: unknown parameter {name!r}; allowed: {allowed}")


# ---- Atari (a spec's parameters: game, policy, policy_dir, policy_seed, frames, wrap) --------------
def _atari_prepare(params: dict[str, Any], spec_dir: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate an Atari task without running the emulator; returns (params, identity).

    policy_dir is resolved against the spec's folder; identity holds the policy file's sha256
    instead of its path, so run keys do not depend on where the file lives.
    """
    from environments import atari

    if "game" not in params:
        raise ValueError("missing parameter 'game' (an ALE game such as 'Pong')")
    frames = params.get("frames")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"frames must be a positive number of stream steps, got {frames!r}")
    if not isinstance(params.get("wrap", False), bool):
        raise ValueError(f"wrap must be true or false, got {params['wrap']!r}")
    seed = params.get("policy_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"policy_seed must be a non-negative integer, got {seed!r}")
    game = atari.resolve_game(str(params["game"]))
    params = {"policy": atari.FILE_POLICY, **params}
    policy = params["policy"]
    if policy != atari.FILE_POLICY and policy not in atari.BUILTIN_POLICIES:
        raise ValueError(
            f"unknown policy {policy!r}: use {atari.FILE_POLICY!r} (a policy file) or one of "
            f"{', '.join(map(repr, atari.BUILTIN_POLICIES))}"
        )
    identity = {key: value for key, value in params.items() if key != "policy_dir"}
    if policy == atari.FILE_POLICY:
        if params.get("policy_dir"):
            folder = Path(params["policy_dir"]).expanduser()
            if not folder.is_absolute() and spec_dir is not None:
                folder = (spec_dir / folder).resolve()
            params["policy_dir"] = str(folder)
        path = atari.find_policy_file(game, params.get("policy_dir"))
        content = path.read_bytes()
        identity["policy_sha256"] = hashlib.sha256(content).hexdigest()
        held = _policy_file_steps(content)
        if frames is not None and frames > held:
            raise ValueError(f"frames = {frames:,}, but the policy file {path} holds {held:,} steps")
    return params, identity


def _policy_file_steps(content: bytes) -> int:
    """Steps a policy file drives (its first character is skipped, as the emulator's replay does)."""
    return max(0, len(content.rstrip(b"\r\n")) - 1)


def _atari_recording_frames(params: dict[str, Any]) -> int | None:
    """Steps the recording of a checked Atari task holds (None when it wraps), without recording it."""
    from environments import atari

    if params.get("wrap"):
        return None
    if params.get("frames") is not None:
        return int(params["frames"])
    if params.get("policy", atari.FILE_POLICY) != atari.FILE_POLICY:
        return atari.BUILTIN_DEFAULT_FRAMES
    return _policy_file_steps(atari.find_policy_file(str(params["game"]), params.get("policy_dir")).read_bytes())


def _atari_spec_stream(params: dict[str, Any]) -> HostStream:
    """The recorded stream of a checked Atari task (recorded on first use; cached on disk)."""
    from environments import atari

    return atari.make_atari_stream(
        params["game"], params.get("policy", atari.FILE_POLICY), params.get("policy_dir"),
        seed=int(params.get("policy_seed", 0)), frames=params.get("frames"), wrap=bool(params.get("wrap", False)),
        progress=False,
    )


def _atari_observation_size(params: dict[str, Any]) -> int:
    from environments.recording import OBSERVATION_SIZE

    return OBSERVATION_SIZE


def _gym(function: str) -> Callable[..., Any]:
    return lambda *args: _lazy_function("gym", "environments.gym_adapter", function)(*args)


for _task in ANIMAL_DEFAULT_VARIANT:
    _REGISTRY[_task] = _animal_kind(_task)
register_task(
    "atari", _lazy_host_factory("atari", "environments.atari", "make_atari_stream"), episodic=True,
    named_by=("game", "policy"), prepare=_atari_prepare,
    parameters=lambda params: ("game", "policy", "policy_dir", "policy_seed", "frames", "wrap"),
    observation_size=_atari_observation_size, recording_frames=_atari_recording_frames, spec_stream=_atari_spec_stream,
)
register_task(
    "gym", _lazy_host_factory("gym", "environments.gym_adapter", "make_gym_stream"), episodic=True,
    named_by=("env_id", "policy"), prepare=_gym("prepare_spec_params"),
    parameters=lambda params: ("env_id", "policy", "gamma", "seed"),
    observation_size=_gym("observation_size"), spec_stream=_gym("spec_stream"),
)
