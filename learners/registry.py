"""The learner registry and the learner protocol (ALGORITHMS.md section 7, docs/learners.md).

A learner is a module (or any object with these attributes):

    Config                 frozen, hashable dataclass; its first field is n_inputs
    Config.from_shape(shape, n_inputs, **static) -> Config   parses the learner's shape string
    Config.shape           the shape string back ("20:4:50000")
    Hyper                  NamedTuple of the traced hyperparameters, with their defaults
    init(cfg, hyper, key) -> state
    step(cfg, hyper, state, observation, cumulant, gamma) -> (state, prediction)

and optionally:

    cost(cfg) -> learners.compute.Cost     analytic compute; without it the cost is measured
                                           from XLA's cost analysis of the jitted step
    candidate_shapes(n_inputs, **static)   shape strings to search when matching compute
    check_hyper(name, value) -> str | None a reason a hyperparameter value is invalid
    family(cfg) -> str                     a default display name ("columnar" for a CCN N:N:inf)
    TITLE, SHAPE_EXAMPLE                   the name and an example shape in messages ("T-BPTT", "10:5")
    Config.SHAPE_FIELDS                    the Config fields the shape string sets (default: the
                                           fields after n_inputs without a default)
    Config.NOT_IN_SPEC                     Config fields a spec may not set (not part of run identity)

Every other Config field is a static setting a spec may set (it selects the compiled program).
A run's identity holds the shape fields and the static settings (never n_inputs).

    learner = resolve("ccn")                    # a registered name ...
    learner = resolve("my_package.my_learner")  # ... or any importable module path

Registering a built-in learner is one line in BUILTIN below. Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

# name -> module path: the built-in learners (one line each)
BUILTIN: dict[str, str] = {
    "ccn": "learners.ccn",
    "tbptt": "learners.tbptt",
    "rtu": "learners.rtu",
    "lru": "learners.lru",
    "snap1": "learners.snap1",
    "uoro": "learners.uoro",
}

_REQUIRED = ("Config", "Hyper", "init", "step")


def register(name: str, module: str | ModuleType | Any) -> None:
    """Register a learner under `name` (a module path, a module, or an object with the protocol)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"a learner name must be a non-empty string without dots, got {name!r}")
    _REGISTERED[name] = module


_REGISTERED: dict[str, Any] = dict(BUILTIN)


def names() -> tuple[str, ...]:
    """The registered learner names (built-ins first)."""
    return tuple(_REGISTERED)


def canonical_name(kind: str) -> str:
    """The registered name of a kind written as a registered module's path ("learners.ccn" -> "ccn"),
    so that both spellings name the same runs; any other kind unchanged."""
    if kind in _REGISTERED:
        return kind
    return next((name for name, target in _REGISTERED.items() if target == kind), kind)


def resolve(kind: str) -> Any:
    """The learner module of a registered name or an importable dotted path; ValueError for people."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a learner kind must be a string, got {kind!r}")
    target = _REGISTERED.get(kind)
    if target is None and "." not in kind:
        raise LookupError(f"unknown learner kind {kind!r}")
    path = target if target is not None else kind
    if isinstance(path, str):
        try:
            module = importlib.import_module(path)
        except ImportError as error:
            raise ValueError(f"learner {kind!r}: cannot import {path} ({error})") from None
    else:
        module = path
    problems = protocol_problems(module)
    if problems:
        raise ValueError(f"learner {kind!r} does not follow the learner protocol: {'; '.join(problems)}")
    return module


def protocol_problems(learner: Any) -> list[str]:
    """What `learner` lacks of the protocol (empty: it follows it)."""
    problems = [f"no {name}" for name in _REQUIRED if not hasattr(learner, name)]
    if problems:
        return problems
    config = learner.Config
    if not dataclasses.is_dataclass(config):
        problems.append("Config is not a dataclass")
    elif not config.__dataclass_params__.frozen:
        problems.append("Config is not frozen (it must be hashable)")
    elif [f.name for f in dataclasses.fields(config)][:1] != ["n_inputs"]:
        problems.append("Config's first field must be n_inputs")
    if not callable(getattr(config, "from_shape", None)):
        problems.append("no Config.from_shape(shape, n_inputs, **static)")
    if not hasattr(learner.Hyper, "_fields"):
        problems.append("Hyper is not a NamedTuple")
    return problems


# --------------------------------------------------------------------------- what the protocol implies
def shape_fields(learner: Any) -> tuple[str, ...]:
    """The Config fields the shape string sets."""
    declared = getattr(learner.Config, "SHAPE_FIELDS", None)
    if declared is not None:
        return tuple(declared)
    return tuple(
        f.name
        for f in dataclasses.fields(learner.Config)
        if f.init and f.name != "n_inputs"
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )


def static_defaults(learner: Any) -> dict[str, Any]:
    """The static settings a spec may set, with their defaults (every other Config field)."""
    skip = {"n_inputs", *shape_fields(learner), *getattr(learner.Config, "NOT_IN_SPEC", ())}
    defaults = {}
    for f in dataclasses.fields(learner.Config):
        if not f.init or f.name in skip:
            continue
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
        else:
            raise ValueError(f"{learner.Config.__qualname__}.{f.name} has no default: declare Config.SHAPE_FIELDS")
    return defaults


def hyper_defaults(learner: Any) -> dict[str, Any]:
    """Hyper's fields -> default (MISSING where a spec must give it)."""
    return {name: learner.Hyper._field_defaults.get(name, MISSING) for name in learner.Hyper._fields}


MISSING = object()


def identity(learner: Any, cfg: Any) -> dict[str, Any]:
    """The part of a Config that identifies a run: shape fields and static settings."""
    return {name: getattr(cfg, name) for name in (*shape_fields(learner), *static_defaults(learner))}


def make_config(learner: Any, config: dict[str, Any], n_inputs: int) -> Any:
    """Config(n_inputs=..., **config) from a run's identity dict (missing static fields: defaults)."""
    return learner.Config(n_inputs=n_inputs, **config)


def title(learner: Any, name: str) -> str:
    return getattr(learner, "TITLE", name)


def family(learner: Any, name: str, cfg: Any) -> str:
    """The learner's default display name for this config (its `family`, else its kind)."""
    function = getattr(learner, "family", None)
    return function(cfg) if callable(function) else name


# --------------------------------------------------------------------------- shape strings
def parse_shape(
    shape: Any, names: tuple[str, ...], example: str, *, infinite: tuple[str, ...] = (), notation: str | None = None
) -> dict[str, int | None]:
    """'20:4:50000' -> {names[0]: 20, ...}: positive integers ('_' allowed), 'inf' for the fields
    in `infinite` (None). Raises ValueError with a reason for people (naming `notation`, default the names)."""
    notation = notation or ":".join(names)
    parts = [part.strip().replace("_", "") for part in str(shape).split(":")]
    if len(parts) != len(names):
        raise ValueError(
            f"{shape!r} must have {len(names)} field{'s' if len(names) != 1 else ''} ({notation}), e.g. {example!r}"
        )
    values: dict[str, int | None] = {}
    for name, part in zip(names, parts, strict=True):
        if name in infinite and part.lower() in ("inf", "none"):
            values[name] = None
            continue
        if not part.isdigit() or int(part) < 1:
            allowed = " or 'inf'" if name in infinite else ""
            raise ValueError(
                f"{shape!r}: {name} must be a positive integer{allowed}, got {part!r} ({notation}, e.g. {example!r})"
            )
        values[name] = int(part)
    return values


# --------------------------------------------------------------------------- hyperparameter checks
def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def rate(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be in (0, 1] (1.0 means no normalisation)"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def checks(rules: dict[str, Callable[[float], str | None]]) -> Callable[[str, float], str | None]:
    """A `check_hyper(name, value)` from per-field rules."""
    return lambda name, value: rules[name](value) if name in rules else None


def check_hyper(learner: Any, name: str, value: Any) -> str | None:
    """The learner's reason `value` is invalid for hyperparameter `name` (finite always required)."""
    if not math.isfinite(value):
        return "must be finite"
    function = getattr(learner, "check_hyper", None)
    return function(name, value) if callable(function) else None


# --------------------------------------------------------------------------- compute
def has_analytic_cost(learner: Any) -> bool:
    return callable(getattr(learner, "cost", None))


def cost(learner: Any, cfg: Any):
    """learners.compute.Cost of one step: the learner's analytic `cost`, else measured (XLA)."""
    if has_analytic_cost(learner):
        return learner.cost(cfg)
    from learners.compute import measured_cost

    return measured_cost(learner, cfg)


def cost_source(learner: Any) -> str:
    """'analytic' (the learner's cost) or 'measured' (XLA's cost analysis of the jitted step)."""
    return "analytic" if has_analytic_cost(learner) else "measured"


def candidate_shapes(learner: Any, n_inputs: int, static: dict[str, Any]) -> list[str] | None:
    """The shapes to search when matching compute, or None when the learner gives none."""
    function = getattr(learner, "candidate_shapes", None)
    if not callable(function):
        return None
    accepted = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    return list(function(n_inputs, **{k: v for k, v in static.items() if takes_any or k in accepted}))
