"""Runs and their identity.

A Run is one learner with its hyperparameters on one task with one seed for a number of steps.
Its `run_key` is the SHA-256 of its canonical JSON: sorted keys, floats as their shortest
round-trip text, the package version included, and the learner's `REVISION` when its module
defines one (a learner whose results change bumps it, so its earlier results are not taken for
the new code's, while other learners keep their keys). It never depends on a grid position, on the
process, or on other entries of the spec, so a grid can grow and a retry maps to the same key.
Labels (the learner's and the task's display names) are not part of it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from importlib import metadata
from typing import Any

PACKAGE = "ccn-sweeps"


@functools.cache
def package_version() -> str:
    """The installed ccn-sweeps version (part of every run_key)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "0+unknown"


@functools.cache
def learner_revision(kind: str) -> int | None:
    """The learner module's `REVISION` (an int bumped whenever its results change), None without one."""
    from learners import registry

    try:
        module = registry.resolve(kind)
    except (LookupError, ValueError):  # not a learner this process can import: nothing to add
        return None
    revision = getattr(module, "REVISION", None)
    if revision is not None and (isinstance(revision, bool) or not isinstance(revision, int)):
        raise ValueError(f"learner {kind!r}: REVISION must be an int, got {revision!r}")
    return revision


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: its display name (a path component), kind and parameters.

    params: what the stream is built from (sorted (key, value) pairs).
    identity: what identifies it in run keys (params, with a policy file replaced by its hash).
    n_inputs: the observation size d.
    """

    name: str
    kind: str
    n_inputs: int
    params: tuple[tuple[str, Any], ...]
    identity: tuple[tuple[str, Any], ...]

    @property
    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep. config: static learner settings; hyper: traced hyperparameters."""

    learner: str
    learner_name: str
    config: tuple[tuple[str, Any], ...]
    hyper: tuple[tuple[str, Any], ...]
    task: TaskSpec
    seed: int
    steps: int
    log_every: int

    @property
    def config_dict(self) -> dict[str, Any]:
        return dict(self.config)

    @property
    def hyper_dict(self) -> dict[str, Any]:
        return dict(self.hyper)

    def canonical(self) -> dict[str, Any]:
        """What identifies the run (labels excluded)."""
        learner = {"kind": self.learner, "config": dict(self.config), "hyper": dict(self.hyper)}
        revision = learner_revision(self.learner)
        if revision is not None:
            learner["revision"] = revision
        return {
            "learner": learner,
            "task": {"kind": self.task.kind, "params": dict(self.task.identity)},
            "seed": self.seed,
            "steps": self.steps,
            "log_every": self.log_every,
            "version": package_version(),
        }

    @functools.cached_property
    def run_key(self) -> str:
        """64 hex digits: sha256 of canonical_json(self.canonical())."""
        return hashlib.sha256(canonical_json(self.canonical()).encode()).hexdigest()


def _normalise(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a run's identity cannot hold the non-finite number {value!r}")
        return 0.0 if value == 0 else float(value)  # -0.0 and 0.0 are one value
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _normalise(value.item())
    raise TypeError(f"cannot put {type(value).__name__} into a run's identity")


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, floats as Python's shortest round-trip repr (1e-3 == 0.001)."""
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), allow_nan=False)
