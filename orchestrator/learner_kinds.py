"""The learner kinds a sweep can name: a generic view of any learner of the protocol (learners.registry).

No per-learner code lives here. For a kind (a registered name such as "ccn", or an importable
module path such as "my_package.my_learner") the learner module itself says everything: its shape
notation (`Config.from_shape`), its static settings (the other Config fields, with their defaults),
its traced hyperparameters (`Hyper`, with defaults and `check_hyper`), and its compute (`cost`, or
measured from XLA when it has none). This module turns that into what spec validation, run
identity, execution and the results table need.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from learners import registry

MISSING = registry.MISSING


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting of a learner, as a spec writes it.

    static fields select the compiled program (they join the batch signature); the others
    are traced hyperparameters, arrays [B] over a batch. `check` returns a problem or None.
    `type` is float, int, str or bool (object: any value; the learner's Config checks it).
    """

    name: str
    type: type
    default: Any = MISSING
    static: bool = False
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class LearnerKind:
    """How the orchestrator handles one learner kind, read from the learner module."""

    name: str  # the registered name or module path: the `learner` of runs and results
    module: Any

    # -- what the protocol implies --------------------------------------------------------
    @functools.cached_property
    def shape_fields(self) -> tuple[str, ...]:
        return registry.shape_fields(self.module)

    @functools.cached_property
    def static_defaults(self) -> dict[str, Any]:
        return registry.static_defaults(self.module)

    @functools.cached_property
    def fields(self) -> tuple[Field, ...]:
        """Every setting a spec may set besides the shape: hyperparameters, then static settings."""
        hyper = tuple(
            Field(name, float, default, check=functools.partial(registry.check_hyper, self.module, name))
            for name, default in registry.hyper_defaults(self.module).items()
        )
        static = tuple(
            Field(name, type(default) if type(default) in (str, int, float, bool) else object, default, static=True)
            for name, default in self.static_defaults.items()
        )
        return hyper + static

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    @property
    def static_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.static)

    @property
    def hyper_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if not f.static)

    @property
    def title(self) -> str:
        return registry.title(self.module, self.name)

    @functools.cached_property
    def shape_example(self) -> str:
        example = getattr(self.module, "SHAPE_EXAMPLE", None)
        if example is None:
            candidates = registry.candidate_shapes(self.module, 1, {})
            example = candidates[0] if candidates else "..."
        return example

    @property
    def cost_source(self) -> str:
        return registry.cost_source(self.module)

    # -- shapes and configs ------------------------------------------------------------------
    def parse_shape(self, text: str, n_inputs: int = 1, static: dict[str, Any] | None = None) -> dict[str, Any]:
        """'20:4:50000' -> {total_columns: 20, ...} (the shape fields); ValueError with a reason for people."""
        cfg = self.module.Config.from_shape(text, n_inputs, **{**self.static_defaults, **(static or {})})
        return {name: getattr(cfg, name) for name in self.shape_fields}

    def identity(self, cfg) -> dict[str, Any]:
        """A run's `config`: the shape fields and static settings of a Config."""
        return registry.identity(self.module, cfg)

    def format_shape(self, config: dict[str, Any], n_inputs: int = 1) -> str:
        return self.make_config(config, n_inputs).shape

    def family(self, config: dict[str, Any], n_inputs: int = 1) -> str:
        """A readable default name (a CCN N:N:inf is "columnar"); the kind unless the learner says."""
        try:
            cfg = self.make_config(config, n_inputs)
        except (TypeError, ValueError):
            return self.name
        return registry.family(self.module, self.name, cfg)

    def learners_module(self):
        return self.module

    def make_config(self, config: dict[str, Any], n_inputs: int):
        """The learner's static Config for a run's `config` dict (shape fields + static fields)."""
        return registry.make_config(self.module, config, n_inputs)

    def make_hyper(self, hyper: dict[str, Any]):
        """The learner's Hyper; values may be Python scalars or arrays [B]."""
        return self.module.Hyper(**hyper)

    def cost(self, config: dict[str, Any], n_inputs: int):
        """learners.compute.Cost of one learner of this shape on a task with `n_inputs`."""
        return registry.cost(self.module, self.make_config(config, n_inputs))


@functools.cache
def _kind(name: str, module_id: int) -> LearnerKind:
    return LearnerKind(name, registry.resolve(name))


def learner_kind(name: str) -> LearnerKind:
    """The LearnerKind of a registered name or importable module path.

    Raises LookupError (an unknown name) or ValueError (a path that does not import or does not
    follow the protocol), each with a message for people.
    """
    module = registry.resolve(name)
    return _kind(registry.canonical_name(name), id(module))


def unknown_kind_message(kind: Any) -> str:
    """'unknown kind ...; did you mean ...' for a learner kind that is neither registered nor a path."""
    known = list(registry.names())
    close = difflib.get_close_matches(str(kind), known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (expected one of: {', '.join(known)})"
    return f"unknown kind {kind!r}{hint} (or an importable module path such as 'my_package.my_learner')"


class _Kinds(Mapping):
    """The registered learner kinds by name (resolved on use: a later `registry.register` shows)."""

    def __getitem__(self, name: str) -> LearnerKind:
        if name not in registry.names():
            raise KeyError(name)
        return learner_kind(name)

    def __iter__(self) -> Iterator[str]:
        return iter(registry.names())

    def __len__(self) -> int:
        return len(registry.names())


LEARNER_KINDS: Mapping[str, LearnerKind] = _Kinds()


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
