"""Truncated backprop through time (T-BPTT) on a dense LSTM with TD(lambda): the baseline.

ALGORITHMS.md section 6. A fully connected LSTM with H units reads the raw input
(no normalisation); a linear head without bias predicts V = w . h. Every step, the gradient
of the current prediction, backpropagated k steps, enters the same TD(lambda) eligibility
traces and RMSProp update as the CCN family (learners.common).

Two variants of "backpropagated k steps":
  recompute (default)  keep x_{t-k+1..t} and the state s_{t-k}; rerun the window with the
                       current parameters and backpropagate through it (exactly jax.grad of the
                       windowed prediction; a test checks it). Until k inputs have been seen the
                       window starts from the zero state, so k >= history is exact full BPTT.
                       When x_{t-k+1} leaves the window, s_{t-k+1} is the rerun's state after it
                       (current parameters), so the learner runs one LSTM trajectory (not the
                       state stored when x_{t-k+1} was consumed: that makes k + 1 interleaved
                       chains, h_{t+1} = F^{k+1}(h_{t-k}); docs/learners.md, T-BPTT).
  stale                backpropagate through the activations stored when each input was
                       consumed (computed with older parameters), using the current U and w
                       for the backward products, as the authors' code does, but with a correct
                       window of k records plus the state before the oldest (the authors' ring
                       buffer wraps the oldest step's previous state onto the newest one).

Shapes (d = n_inputs, H = hidden, k = truncation):
    W [4H, d]  U [4H, H]  b [4H]  w [H]   gate blocks of H rows in order (i, f, g, o)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from learners import common, registry
from learners.compute import Cost

VARIANTS = ("recompute", "stale")


@dataclasses.dataclass(frozen=True)
class Config:
    """Static shape of a T-BPTT learner: truncation k and hidden size H ("k:H")."""

    n_inputs: int
    truncation: int
    hidden: int
    variant: str = "recompute"
    dtype: str = "float32"
    unroll_window: bool = False  # unroll the window loops (bigger program; XLA's cost analysis counts every slot)

    def __post_init__(self):
        for name in ("n_inputs", "truncation", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"tbptt.Config.{name} must be a positive integer, got {value!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"tbptt.Config.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"tbptt.Config.dtype must be 'float32' or 'float64', got {self.dtype!r}")

    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = ("truncation", "hidden")
    NOT_IN_SPEC: ClassVar[tuple[str, ...]] = ("unroll_window",)  # a benchmark switch, not a setting of a run

    @classmethod
    def from_shape(cls, shape: str, n_inputs: int, variant: str = "recompute", dtype: str = "float32") -> Config:
        """Parse the paper's "k:H" notation, e.g. "10:5" (truncation 10, 5 hidden units)."""
        return cls(n_inputs, **registry.parse_shape(shape, cls.SHAPE_FIELDS, "10:5"), variant=variant, dtype=dtype)

    @property
    def shape(self) -> str:
        return f"{self.truncation}:{self.hidden}"


class Hyper(NamedTuple):
    """Traced hyperparameters (Python floats or JAX scalars; arrays [B] under vmap): alpha and lambda."""

    step_size: float
    lam: float = 0.99


# --------------------------------------------------------------------------- the learner protocol (learners.registry)
TITLE = "T-BPTT"
# Part of every T-BPTT run's key (orchestrator.runs): 2 since the `recompute` window's start state moves
# along the rerun trajectory (docs/learners.md); results of revision 1 are not reused.
REVISION = 2
SHAPE_EXAMPLE = "10:5"
check_hyper = registry.checks({"step_size": registry.positive, "lam": registry.unit_interval})


def candidate_shapes(n_inputs: int, variant: str = "recompute", max_truncation: int = 64, max_hidden: int = 64,
                     **static) -> list[str]:
    """Shapes to search when matching another learner's compute: every k:H up to 64:64."""
    return [f"{k}:{h}" for k in range(1, max_truncation + 1) for h in range(1, max_hidden + 1)]


class Params(NamedTuple):
    W: jax.Array  # [4H, d] input weights
    U: jax.Array  # [4H, H] recurrent weights
    b: jax.Array  # [4H] one bias per gate and unit
    w: jax.Array  # [H] head (no bias)


class RecomputeWindow(NamedTuple):
    inputs: jax.Array  # [k, d] x_{t-k+1..t}, oldest first (valid: the last min(t, k) rows)
    start_h: jax.Array  # [H] s_{t-k}: the state before the oldest input (0 until k inputs seen)
    start_c: jax.Array  # [H]


class Activations(NamedTuple):
    """What backpropagation through k cell steps needs, one row per slot, oldest first.

    `stale` stores these when each input is consumed (its window); `recompute` rebuilds them
    every step by rerunning its window with the current parameters.
    """

    inputs: jax.Array  # [k, d] x_j
    h_prev: jax.Array  # [k, H] state before consuming x_j
    c_prev: jax.Array  # [k, H]
    gates: jax.Array  # [k, 4, H] (i, f, g, o)
    c: jax.Array  # [k, H] cell state after x_j


StaleWindow = Activations


class State(NamedTuple):
    t: jax.Array  # [] int32 steps taken
    params: Params
    eligibility: Params
    rms: optax.ScaleByRmsState  # nu: Params-shaped
    window: RecomputeWindow | StaleWindow
    h: jax.Array  # [H] state after the last forward pass
    c: jax.Array  # [H]
    prediction: jax.Array  # [] V of the last forward pass ("old")


# --------------------------------------------------------------------------- the cell
def cell(params: Params, x: jax.Array, h: jax.Array, c: jax.Array):
    """One dense LSTM step. x [d], h, c [H] -> (h, c, gates [4, H])."""
    hidden = h.shape[-1]
    a = (params.W @ x + params.U @ h + params.b).reshape(4, hidden)
    i, f, o = jax.nn.sigmoid(a[0]), jax.nn.sigmoid(a[1]), jax.nn.sigmoid(a[3])
    g = jnp.tanh(a[2])
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return h, c, jnp.stack([i, f, g, o])


def init(cfg: Config, hyper: Hyper, key: jax.Array) -> State:
    """W, U, b ~ U(-1/sqrt(H), 1/sqrt(H)); head, traces, states and window 0."""
    del hyper
    dtype = common.resolve_dtype(cfg.dtype)
    d, k, hidden = cfg.n_inputs, cfg.truncation, cfg.hidden
    bound = 1.0 / np.sqrt(hidden)
    kw, ku, kb = jax.random.split(key, 3)
    params = Params(
        W=common.uniform(kw, (4 * hidden, d), -bound, bound, dtype),
        U=common.uniform(ku, (4 * hidden, hidden), -bound, bound, dtype),
        b=common.uniform(kb, (4 * hidden,), -bound, bound, dtype),
        w=jnp.zeros((hidden,), dtype),
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    zk = jnp.zeros((k, hidden), dtype)
    if cfg.variant == "recompute":
        window = RecomputeWindow(jnp.zeros((k, d), dtype), zk[0], zk[0])
    else:
        window = StaleWindow(jnp.zeros((k, d), dtype), zk, zk, jnp.zeros((k, 4, hidden), dtype), zk)
    return State(
        t=jnp.zeros((), jnp.int32),
        params=params,
        eligibility=zeros,
        rms=common.rmsprop_init(params),
        window=window,
        h=zk[0],
        c=zk[0],
        prediction=jnp.zeros((), dtype),
    )


def _shift_in(buffer: jax.Array, newest: jax.Array) -> jax.Array:
    """Drop the oldest row of [k, ...], append `newest` [...] as the last row."""
    return jnp.concatenate([buffer[1:], newest[None]], axis=0)


# --------------------------------------------------------------------------- gradients of V(S_t)
def cell_backward(gates: jax.Array, c: jax.Array, c_prev: jax.Array, grad_h: jax.Array, grad_c: jax.Array):
    """Backward through one cell step: cotangents (grad_h, grad_c) of (h, c) -> (da [4H], dc [H]).

    gates [4, H] (i, f, g, o) and c, c_prev [H] of that step; da is the cotangent of the gate
    pre-activations (so dW = da x^T, dU = da h_prev^T, db = da, dh_prev = U^T da) and dc the
    total cotangent of c (dc_prev = dc * f):
        dc = grad_h * o * (1 - tanh(c)^2) + grad_c
        da = (dc * g * i', dc * c_prev * f', dc * i * g', grad_h * tanh(c) * o')
    """
    i, f, g, o = gates
    tanh_c = jnp.tanh(c)
    dc = grad_h * o * (1 - tanh_c * tanh_c) + grad_c
    da_i, da_f = dc * g * i * (1 - i), dc * c_prev * f * (1 - f)
    da_g, da_o = dc * i * (1 - g * g), grad_h * tanh_c * o * (1 - o)
    return jnp.concatenate([da_i, da_f, da_g, da_o]), dc


def rerun_window(params: Params, window: RecomputeWindow, n_valid: jax.Array, unroll: bool = False):
    """Rerun the window from s_{t-k} with `params` (a scan over the k slots).

    Slots before the last `n_valid` are skipped (the state passes through unchanged).
    Returns (Activations [k, ...], h_t [H], c_t [H]).
    """
    k = window.inputs.shape[0]

    def slot(carry, xs):
        h, c = carry
        x, valid = xs
        h_next, c_next, gates = cell(params, x, h, c)
        return (jnp.where(valid, h_next, h), jnp.where(valid, c_next, c)), (h, c, gates, c_next)

    valid = jnp.arange(k) >= k - n_valid
    (h, c), (h_prev, c_prev, gates, c_after) = lax.scan(
        slot, (window.start_h, window.start_c), (window.inputs, valid), unroll=k if unroll else 1
    )
    return Activations(window.inputs, h_prev, c_prev, gates, c_after), h, c


def backward(params: Params, acts: Activations, h_t: jax.Array, n_valid: jax.Array, unroll: bool = False) -> Params:
    """grad of V(S_t) = w . h_t, backpropagated through the k recorded slots.

    With the current U for the backward products and the recorded activations; for each slot
    j, newest first (slots before the last `n_valid` contribute nothing):
        dc  = dh * o * (1 - tanh(c)^2) + dc_next
        da  = (dc * g * i', dc * c_prev * f', dc * i * g', dh * tanh(c) * o')      [4H]
        dW += da x_j^T,  dU += da h_prev_j^T,  db += da,  dh = U^T da,  dc_next = dc * f
    (The sums are accumulated slot by slot, newest first, in that fixed order: a vmapped batch
    then rounds exactly like separate runs, which a matmul over the slots would not.)
    """
    k = acts.inputs.shape[0]

    def slot(carry, xs):
        grad_h, grad_c, grad_W, grad_U, grad_b = carry
        gates, c, c_prev, h_prev, x, valid = xs
        da, dc = cell_backward(gates, c, c_prev, grad_h, grad_c)
        da = jnp.where(valid, da, 0.0)
        f = gates[1]
        grad_W = grad_W + da[:, None] * x[None, :]
        grad_U = grad_U + da[:, None] * h_prev[None, :]
        return (params.U.T @ da, jnp.where(valid, dc * f, 0.0), grad_W, grad_U, grad_b + da), None

    valid = jnp.arange(k) >= k - n_valid
    zeros = (jnp.zeros_like(params.W), jnp.zeros_like(params.U), jnp.zeros_like(params.b))
    (_, _, grad_W, grad_U, grad_b), _ = lax.scan(
        slot, (params.w, jnp.zeros_like(h_t), *zeros),
        (acts.gates, acts.c, acts.c_prev, acts.h_prev, acts.inputs, valid),
        reverse=True, unroll=k if unroll else 1,
    )
    return Params(W=grad_W, U=grad_U, b=grad_b, w=h_t)


# --------------------------------------------------------------------------- one step
def step(cfg: Config, hyper: Hyper, state: State, observation, cumulant, gamma):
    """Consume (x_{t+1}, cumulant, gamma), learn, and return (state, V(x_{t+1})).

    observation [d]; cumulant, gamma []. Same order as the CCN family: decay traces, add
    grad V(S_t) (k-step truncated), forward x_{t+1}, delta, RMSProp update.
    """
    dtype = state.prediction.dtype
    k = cfg.truncation
    x = jnp.asarray(observation, dtype)
    gamma = jnp.asarray(gamma, dtype)
    gamma_lambda = gamma * jnp.asarray(hyper.lam, dtype)
    n_valid = jnp.minimum(state.t, k)
    params, window = state.params, state.window

    if cfg.variant == "recompute":
        acts, h_t, c_t = rerun_window(params, window, n_valid, cfg.unroll_window)
    else:
        acts, h_t, c_t = window, state.h, state.c
    gradient = backward(params, acts, h_t, n_valid, cfg.unroll_window)
    eligibility = common.accumulate_traces(state.eligibility, gradient, gamma_lambda)

    h, c, gates = cell(params, x, h_t, c_t)
    prediction = jnp.dot(params.w, h)
    delta = common.td_error(jnp.asarray(cumulant, dtype), gamma, prediction, state.prediction)
    alpha = jnp.asarray(hyper.step_size, dtype)
    params, rms = common.td_update(params, state.rms, eligibility, delta, Params(alpha, alpha, alpha, alpha))

    if cfg.variant == "recompute":
        # The oldest input leaves the window: the rerun's state after it (this step's parameters)
        # becomes s_{t-k}, so the start state, the rerun and the prediction stay on one trajectory.
        full = state.t >= k
        after_oldest_c = acts.c[0]
        after_oldest_h = acts.gates[0, 3] * jnp.tanh(after_oldest_c)
        window = RecomputeWindow(
            inputs=_shift_in(window.inputs, x),
            start_h=jnp.where(full, after_oldest_h, window.start_h),
            start_c=jnp.where(full, after_oldest_c, window.start_c),
        )
    else:
        window = Activations(
            inputs=_shift_in(window.inputs, x),
            h_prev=_shift_in(window.h_prev, h_t),
            c_prev=_shift_in(window.c_prev, c_t),
            gates=_shift_in(window.gates, gates),
            c=_shift_in(window.c, c),
        )
    new_state = State(
        t=state.t + 1,
        params=params,
        eligibility=eligibility,
        rms=rms,
        window=window,
        h=h,
        c=c,
        prediction=prediction,
    )
    return new_state, prediction


# --------------------------------------------------------------------------- compute accounting
def paper_params(n_inputs: int, hidden: int) -> int:
    """P_T = 4H(H + d) + 4H + H: weights, biases and head (the authors' count)."""
    return 4 * hidden * (hidden + n_inputs) + 4 * hidden + hidden


def cost(cfg: Config) -> Cost:
    """Parameters and per-step compute; see ccn.cost and docs/compute.md for the counting rule.

    flops_per_step: the cell forward passes (k for the `recompute` window rerun, plus the new
    step), k backward steps, eligibility and RMSProp over every parameter, the head.
    paper_ops_per_step = (1 + k) * P_T, the authors' rule.
    """
    d, k, hidden = cfg.n_inputs, cfg.truncation, cfg.hidden
    n_params = paper_params(d, hidden)
    forward = 2 * 4 * hidden * (d + hidden) + _CELL_PER_UNIT * hidden  # W x + U h (dots), then the cell
    backward_step = 2 * 4 * hidden * (d + hidden) + 2 * 4 * hidden * hidden + _BACKWARD_PER_UNIT * hidden
    window_forward = k * (forward + _MASK_PER_UNIT * hidden) if cfg.variant == "recompute" else 0
    head = 2 * hidden
    flops = window_forward + k * backward_step + forward + head + _LEARN_PER_PARAM * n_params + _FIXED
    return Cost(
        params=n_params,
        learning_params=n_params,
        flops_per_step=int(flops),
        paper_ops_per_step=int((1 + k) * n_params),
    )


# Per-element operation counts of the code above (derivation in docs/compute.md).
_CELL_PER_UNIT = 8 + 3 * 4 + 1 + 3 + 2  # two bias/sum adds per gate, 3 sigmoids, tanh, c, h
_MASK_PER_UNIT = 2  # selects of h and c per unit and slot
# backward, per unit and slot (besides the dW, dU outer products + adds and U^T da):
# tanh, dc 5, four gate derivatives 16, da select 4, dc_next select + mul 2, db add 4
_BACKWARD_PER_UNIT = 32
_LEARN_PER_PARAM = 13  # eligibility (2), delta * e (1), RMSProp statistics (4) and scaling (3), alpha * u + add (2)
_FIXED = 10  # delta, gamma * lambda, step counters

__all__ = ["Config", "Hyper", "Params", "State", "init", "step", "cost", "cell", "cell_backward", "VARIANTS"]
