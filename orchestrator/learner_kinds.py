"""The learner kinds a sweep can name, and how the orchestrator builds and prices each one.

This is the orchestrator's adapter over `learners/`: it knows, per kind, the shape notation
("20:4:50000" for the CCN family, "10:5" for T-BPTT), the hyperparameters a spec may set (with
their types, defaults and valid ranges), and how to turn a run into the learner's static
`Config` (selects the compiled program) and traced `Hyper` (one value per run, vmapped).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

MISSING = object()


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting of a learner, as a spec writes it.

    static fields select the compiled program (they join the batch signature); the others
    are traced hyperparameters, arrays [B] over a batch. `check` returns a problem or None.
    """

    name: str
    type: type  # float, int or str
    default: Any = MISSING
    static: bool = False
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


def _positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def _unit_interval(value) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def _rate(value) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be in (0, 1] (1.0 means no normalisation)"


def _non_negative(value) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(map(repr, choices))}"


_DTYPE = Field("dtype", str, "float32", static=True, check=_one_of("float32", "float64"))


@dataclasses.dataclass(frozen=True)
class LearnerKind:
    """How the orchestrator handles one learner kind."""

    name: str
    shape_fields: tuple[str, ...]  # static integer fields written as the shape string
    shape_example: str
    fields: tuple[Field, ...]  # everything else a spec may set
    module: str  # the learners module: Config, Hyper, init, step, cost

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    @property
    def static_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.static)

    @property
    def hyper_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if not f.static)

    def parse_shape(self, text: str) -> dict[str, int | None]:
        """'20:4:50000' -> {total_columns: 20, ...}; raises ValueError with a reason for people."""
        parts = [part.strip().replace("_", "") for part in str(text).split(":")]
        if len(parts) != len(self.shape_fields):
            raise ValueError(
                f"{text!r} must have {len(self.shape_fields)} fields "
                f"({':'.join(self.shape_fields)}), e.g. {self.shape_example!r}"
            )
        values: dict[str, int | None] = {}
        for name, part in zip(self.shape_fields, parts, strict=True):
            if name == "steps_per_stage" and part.lower() in ("inf", "none"):
                values[name] = None
                continue
            if not part.isdigit() or int(part) < 1:
                raise ValueError(f"{text!r}: {name} must be a positive integer, got {part!r}")
            values[name] = int(part)
        if self.name == "ccn" and values["total_columns"] % values["columns_per_stage"]:
            raise ValueError(
                f"{text!r}: total_columns ({values['total_columns']}) must be a multiple of "
                f"columns_per_stage ({values['columns_per_stage']})"
            )
        return values

    def format_shape(self, config: dict[str, Any]) -> str:
        return ":".join("inf" if config[name] is None else str(config[name]) for name in self.shape_fields)

    def family(self, config: dict[str, Any]) -> str:
        """A readable default name: columnar / constructive / ccn / tbptt."""
        if self.name != "ccn":
            return self.name
        if config["columns_per_stage"] == config["total_columns"]:
            return "columnar"
        if config["columns_per_stage"] == 1:
            return "constructive"
        return "ccn"

    # -- building the learner (imports JAX lazily: parsing a spec stays cheap) ----------------
    def learners_module(self):
        import importlib

        return importlib.import_module(self.module)

    def make_config(self, config: dict[str, Any], n_inputs: int):
        """The learner's static Config for a run's `config` dict (shape fields + static fields)."""
        return self.learners_module().Config(n_inputs=n_inputs, **config)

    def make_hyper(self, hyper: dict[str, Any]):
        """The learner's Hyper; values may be Python scalars or arrays [B]."""
        return self.learners_module().Hyper(**hyper)

    def cost(self, config: dict[str, Any], n_inputs: int):
        """learners.compute.Cost of one learner of this shape on a task with `n_inputs`."""
        return self.learners_module().cost(self.make_config(config, n_inputs))


CCN = LearnerKind(
    name="ccn",
    shape_fields=("total_columns", "columns_per_stage", "steps_per_stage"),
    shape_example="20:4:50000",
    module="learners.ccn",
    fields=(
        Field(
            "step_size",
            float,
            check=_positive,
            doc="alpha of the columns; the head uses alpha / active columns",
        ),
        Field("lam", float, 0.99, check=_unit_interval, doc="TD(lambda) trace decay"),
        Field("normalization_rate", float, 0.99999, check=_rate, doc="EMA decay of the normalisers"),
        Field("std_cap", float, 0.01, check=_non_negative, doc="floor on the normalisers' variance"),
        _DTYPE,
    ),
)

TBPTT = LearnerKind(
    name="tbptt",
    shape_fields=("truncation", "hidden"),
    shape_example="10:5",
    module="learners.tbptt",
    fields=(
        Field("step_size", float, check=_positive, doc="alpha"),
        Field("lam", float, 0.99, check=_unit_interval, doc="TD(lambda) trace decay"),
        Field("variant", str, "recompute", static=True, check=_one_of("recompute", "stale")),
        _DTYPE,
    ),
)

LEARNER_KINDS: dict[str, LearnerKind] = {kind.name: kind for kind in (CCN, TBPTT)}


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
