"""SnAp-1 (Menick et al. 2021) on the dense LSTM of T-BPTT, with TD(lambda): `snap1`.

ALGORITHMS.md section 9. The network is T-BPTT's (section 6): a fully connected LSTM with H
units on the raw input (no normalisation), init U(-1/sqrt(H), 1/sqrt(H)), a linear head
V = w . h without bias starting at 0. SnAp-1 keeps, for every LSTM parameter, only its
influence on the unit it feeds: the influence matrix J_t = D_t J_{t-1} + I_t restricted,
every step, to the sparsity pattern of the one-step Jacobian I_t (parameter of unit u ->
(h_u, c_u)). That is exactly the one-unit-column RTRL of the CCN family (section 1) with the
other units' h_{t-1} treated as inputs, so the learner runs the CCN's own column pieces
(`ccn.column_forward`, `ccn.rtrl_update`) on H columns that each read every unit.

The column view: unit u reads z_u = [x | h_{u+1}, ..., h_{u+H-1}, h_u | 1] (the previous
hidden states rotated so that its own is second to last, the CCN packing), and its
parameters are packed per gate q in (i, f, g, o) as `weights[u, q] = [W | U (rotated) | b]`.
`to_dense` maps any weights-shaped array back to T-BPTT's (W [4H, d], U [4H, H], b [4H]).

Shapes (d = n_inputs, H = hidden, P = d + H + 1 packed inputs per unit):
    weights, trace_h, trace_c, eligibility.weights, rms.nu.weights [H, 4, P]   w, h, c [H]
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learners import ccn, common, registry, tbptt
from learners.compute import Cost


@dataclasses.dataclass(frozen=True)
class HiddenConfig:
    """The fields and parsing shared by the dense-LSTM learners' configs (SnAp-1, UORO): H hidden
    units (shape string "H"). Each subclasses it as its Config and sets KIND (the module in errors)."""

    n_inputs: int
    hidden: int
    dtype: str = "float32"

    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = ("hidden",)
    KIND: ClassVar[str] = "snap1"

    def __post_init__(self):
        check_fields(self.KIND, self)

    @classmethod
    def from_shape(cls, shape: str, n_inputs: int, **static):
        """Parse "H" (hidden units), e.g. "8"; `static` holds the other fields (dtype)."""
        return cls(n_inputs, parse_hidden(cls.KIND, shape), **static_fields(cls, cls.KIND, static))

    @property
    def shape(self) -> str:
        return str(self.hidden)


@dataclasses.dataclass(frozen=True)
class Config(HiddenConfig):
    """Static shape of a SnAp-1 learner: H hidden units (shape string "H")."""

    KIND: ClassVar[str] = "snap1"

    @property
    def packed(self) -> int:
        """P: packed inputs per unit and gate: d input weights, H recurrent weights, 1 bias."""
        return self.n_inputs + self.hidden + 1


def check_fields(kind: str, cfg) -> None:
    """Validation of a dense-LSTM learner's Config (shared with uoro)."""
    for name in ("n_inputs", "hidden"):
        value = getattr(cfg, name)
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{kind}.Config.{name} must be a positive integer, got {value!r}")
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"{kind}.Config.dtype must be 'float32' or 'float64', got {cfg.dtype!r}")


def parse_hidden(kind: str, shape: str) -> int:
    """The shape string "H" (hidden units), e.g. "8" -> 8 (shared with uoro)."""
    return registry.parse_shape(shape, ("hidden",), "8", notation=f"{kind} hidden units")["hidden"]


def static_fields(cls, kind: str, static: dict) -> dict:
    """The static Config settings passed to from_shape, or a clear error naming unknown ones."""
    known = sorted(f.name for f in dataclasses.fields(cls) if f.name not in ("n_inputs", "hidden"))
    unknown = sorted(set(static) - set(known))
    if unknown:
        raise ValueError(f"{kind}: unknown setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return static


class Hyper(NamedTuple):
    """Traced hyperparameters of SnAp-1 and UORO (Python floats or JAX scalars; arrays [B] under vmap)."""

    step_size: float = 1e-3
    lam: float = 0.99


# --------------------------------------------------------------------------- the learner protocol (learners.registry)
TITLE = "SnAp-1"
check_hyper = registry.checks({"step_size": registry.positive, "lam": registry.unit_interval})


def candidate_shapes(n_inputs: int, max_hidden: int = 64, **static) -> list[str]:
    """Shapes to search when matching another learner's compute: 1..max_hidden hidden units."""
    return [str(h) for h in range(1, max_hidden + 1)]


class Params(NamedTuple):
    weights: jax.Array  # [H, 4, P] packed LSTM parameters, one column per unit
    w: jax.Array  # [H] head (no bias)


class State(NamedTuple):
    t: jax.Array  # [] int32 steps taken
    params: Params
    trace_h: jax.Array  # [H, 4, P] SnAp-1 influence dh_u/dtheta of each parameter on its own unit
    trace_c: jax.Array  # [H, 4, P] dc_u/dtheta
    eligibility: Params
    rms: optax.ScaleByRmsState  # nu: Params-shaped
    h: jax.Array  # [H] state after the last forward pass
    c: jax.Array  # [H]
    prediction: jax.Array  # [] V of the last forward pass ("old")


# --------------------------------------------------------------------------- the column view
def _rotation(hidden: int) -> np.ndarray:
    """[H, H] int: slot j of unit u reads h_{(u + 1 + j) mod H} (its own h last)."""
    return (np.arange(hidden)[:, None] + 1 + np.arange(hidden)[None, :]) % hidden


def pack_inputs(x: jax.Array, h_prev: jax.Array) -> jax.Array:
    """z [H, P]: row u = [x | h_prev rotated for unit u | 1]."""
    hidden = h_prev.shape[-1]
    ones = jnp.ones((hidden, 1), h_prev.dtype)
    rotated = h_prev[_rotation(hidden)]
    return jnp.concatenate([jnp.broadcast_to(x, (hidden, x.shape[-1])), rotated, ones], axis=1)


def to_dense(cfg: Config, packed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A weights-shaped array [H, 4, P] -> T-BPTT's layout (W [4H, d], U [4H, H], b [4H])."""
    d, hidden = cfg.n_inputs, cfg.hidden
    gate_major = jnp.swapaxes(packed, 0, 1).reshape(4 * hidden, cfg.packed)  # row q * H + u
    unit = np.tile(np.arange(hidden), 4)[:, None]
    slot = (np.arange(hidden)[None, :] - unit - 1) % hidden  # where unit u keeps h_v
    recurrent = jnp.take_along_axis(gate_major[:, d:d + hidden], jnp.asarray(slot), axis=1)
    return gate_major[:, :d], recurrent, gate_major[:, -1]


# --------------------------------------------------------------------------- init and step
def init(cfg: Config, hyper: Hyper, key: jax.Array) -> State:
    """LSTM parameters U(-1/sqrt(H), 1/sqrt(H)) (T-BPTT's init); head, traces and states 0."""
    del hyper
    dtype = common.resolve_dtype(cfg.dtype)
    hidden = cfg.hidden
    bound = 1.0 / np.sqrt(hidden)
    params = Params(
        weights=common.uniform(key, (hidden, 4, cfg.packed), -bound, bound, dtype),
        w=jnp.zeros((hidden,), dtype),
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    return State(
        t=jnp.zeros((), jnp.int32),
        params=params,
        trace_h=zeros.weights,
        trace_c=zeros.weights,
        eligibility=zeros,
        rms=common.rmsprop_init(params),
        h=zeros.w,
        c=zeros.w,
        prediction=jnp.zeros((), dtype),
    )


def step(cfg: Config, hyper: Hyper, state: State, observation, cumulant, gamma):
    """Consume (x_{t+1}, cumulant, gamma), learn, and return (state, V(x_{t+1})).

    observation [d]; cumulant, gamma []. The order of T-BPTT and the CCN family: decay traces,
    add grad V(S_t) (w_u * dh_u/dtheta for the parameters of unit u, h for the head), forward
    x_{t+1} and update the SnAp-1 traces with the parameters of that forward pass, delta,
    RMSProp update.
    """
    dtype = state.prediction.dtype
    x = jnp.asarray(observation, dtype)
    gamma = jnp.asarray(gamma, dtype)
    gamma_lambda = gamma * jnp.asarray(hyper.lam, dtype)
    params = state.params

    gradient = Params(weights=params.w[:, None, None] * state.trace_h, w=state.h)
    eligibility = common.accumulate_traces(state.eligibility, gradient, gamma_lambda)

    z = pack_inputs(x, state.h)  # [H, P]
    h, c, gates = ccn.column_forward(params.weights, z, state.c)
    trace_h, trace_c = ccn.rtrl_update(params.weights, z, state.c, c, gates, state.trace_h, state.trace_c)

    prediction = jnp.dot(params.w, h)
    params, rms = common.td_learn(params, state.rms, eligibility, cumulant, gamma, prediction, state.prediction,
                                  hyper.step_size)
    new_state = State(
        t=state.t + 1,
        params=params,
        trace_h=trace_h,
        trace_c=trace_c,
        eligibility=eligibility,
        rms=rms,
        h=h,
        c=c,
        prediction=prediction,
    )
    return new_state, prediction


# --------------------------------------------------------------------------- compute accounting
def cost(cfg: Config) -> Cost:
    """Parameters and per-step compute (counting rule: docs/compute.md).

    flops_per_step: the dense forward (8 H P for the gate pre-activations, then the cell), the
    SnAp-1 traces (ccn.rtrl_update: 10 per LSTM parameter plus the per-unit coefficients),
    eligibility and RMSProp over every parameter, the head. paper_ops_per_step = P_T + 4 (P_T - H),
    the authors' RTRL rule (forward of every parameter, 4 per traced parameter) as for a
    columnar network: SnAp-1 keeps the same two traces per parameter as a column.
    """
    hidden = cfg.hidden
    n_params = tbptt.paper_params(cfg.n_inputs, hidden)
    lstm = n_params - hidden
    flops = (_PER_LSTM_PARAM * lstm + _PER_UNIT * hidden + _HEAD_PER_UNIT * hidden + _FIXED)
    return Cost(
        params=n_params,
        learning_params=n_params,
        flops_per_step=int(flops),
        paper_ops_per_step=int(n_params + 4 * lstm),
    )


# Per-element operation counts of the code above (derivation in docs/compute.md).
# per LSTM parameter: forward multiply-add 2, traces C 5 and H 5, gradient w_u * H 1,
# eligibility 2, RMSProp on delta * e 13 (as in T-BPTT's 13 per parameter, eligibility included: 11 here)
_PER_LSTM_PARAM = 2 + 10 + 1 + 2 + 11
# per unit: 3 sigmoids 12, tanh 1, cell 3, output tanh + mul 2; trace coefficients 24 (as ccn._LEARN_PER_COLUMN)
_PER_UNIT = 18 + 24
# head, per unit: prediction dot 2, eligibility 2, RMSProp 11
_HEAD_PER_UNIT = 15
_FIXED = 10  # delta, gamma * lambda, step counter

__all__ = ["Config", "Hyper", "Params", "State", "init", "step", "cost", "pack_inputs", "to_dense", "TITLE",
           "check_hyper", "candidate_shapes"]
