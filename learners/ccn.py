"""Columnar, constructive and columnar-constructive networks (CCN) with exact RTRL and TD(lambda).

One implementation, three shapes (ALGORITHMS.md sections 1-4, 8b), configured by
`total_columns : columns_per_stage : steps_per_stage`:

    columnar      N:N:inf   Config(n, N, N, None)      one stage, every column learns forever
    constructive  N:1:S     Config(n, N, 1, S)         one new column every S steps
    CCN           N:k:S     Config(n, N, k, S)         k independent columns per stage

A column is a one-unit LSTM. Its parameters are packed per gate q in (i, f, g, o) as
`weights[column, q, :] = [W_q (over its inputs) | u_q (self-recurrence) | b_q]`, and it sees
the packed direct input `z = [x_hat | h_prev | 1]`, so a_q = weights[q] . z. Every column
of every stage is allocated up front; a column of stage L reads the raw observation and the
one-step-delayed hidden states of the columns of stages < L (a static mask over the padded
input vector). The k columns of the learning stage live in a `LearningBlock` of their own
(parameters, input statistics, RTRL traces, eligibility and RMSProp state, [k, ...]), so
trace work is O(k * inputs) and the element-wise loops never slice the full arrays. Each step
first writes the block into its rows of the full arrays (in place, O(k)), so one forward pass
over the full arrays serves every column, the learning ones included; when a stage starts,
the finished block is thereby already written back (frozen) and the next one is loaded.

Shapes (d = n_inputs, N = total_columns, k = columns_per_stage, m = d + N - k inputs per
column padded so that P = m + 2 packed parameters per gate is a multiple of PACK_WIDTH):
    weights [N, 4, P]   h, c [N]   input_mean, input_var [N, m]
    trace_h, trace_c, eligibility, rms.nu [k, 4, P]
    head_w, head feature stats, head eligibility [N]
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import custom_batching, lax

from learners import common, registry
from learners.compute import Cost

GATES = ("i", "f", "g", "o")
INIT_RANGE = 0.01  # every column parameter starts U(-0.01, 0.01)
# P (packed parameters per gate) is padded to a multiple of 8: the element-wise loops over [k, 4, P]
# (RTRL traces, eligibility, RMSProp) then vectorise 8 float32 lanes wide (AVX2) with no remainder.
# CCN 20:4 (P 30 -> 32): 1.21x learner-steps per CPU-second (docs/benchmarks.md).
PACK_WIDTH = 8
# Bumped whenever this learner's results change (it is part of every run's key). 1: P padded to
# PACK_WIDTH; XLA then sums the forward dot in another order for some widths (7:7, 12:4: 1e-9 after
# ~200 steps; 20:4 at d = 12 stays bitwise equal for 2,000 steps, yet not over 5M: docs/results.md).
REVISION = 1


@dataclasses.dataclass(frozen=True)
class Config:
    """Static shape of a CCN-family learner (hashable: it selects the compiled program).

    steps_per_stage=None means "inf": the first stage learns forever (columnar N:N:inf).
    """

    n_inputs: int
    total_columns: int
    columns_per_stage: int
    steps_per_stage: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("n_inputs", "total_columns", "columns_per_stage"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"ccn.Config.{name} must be a positive integer, got {value!r}")
        if self.total_columns % self.columns_per_stage:
            raise ValueError(
                f"ccn.Config: total_columns ({self.total_columns}) must be a multiple of "
                f"columns_per_stage ({self.columns_per_stage})"
            )
        if self.steps_per_stage is not None and (
            not isinstance(self.steps_per_stage, int | np.integer) or self.steps_per_stage < 1
        ):
            raise ValueError(
                f"ccn.Config.steps_per_stage must be a positive integer or None (inf), "
                f"got {self.steps_per_stage!r}"
            )
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"ccn.Config.dtype must be 'float32' or 'float64', got {self.dtype!r}")

    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = ("total_columns", "columns_per_stage", "steps_per_stage")

    @classmethod
    def from_shape(cls, shape: str, n_inputs: int, dtype: str = "float32") -> Config:
        """Parse the paper's "N:k:S" notation ("inf" allowed for S), e.g. "20:4:10000000"."""
        fields = registry.parse_shape(shape, cls.SHAPE_FIELDS, "20:4:50000", infinite=("steps_per_stage",),
                                      notation="total:per_stage:steps")
        if fields["total_columns"] % fields["columns_per_stage"]:
            raise ValueError(
                f"{shape!r}: total_columns ({fields['total_columns']}) must be a multiple of "
                f"columns_per_stage ({fields['columns_per_stage']})"
            )
        return cls(n_inputs, **fields, dtype=dtype)

    @property
    def shape(self) -> str:
        steps = "inf" if self.steps_per_stage is None else str(self.steps_per_stage)
        return f"{self.total_columns}:{self.columns_per_stage}:{steps}"

    @property
    def n_stages(self) -> int:
        return self.total_columns // self.columns_per_stage

    @property
    def real_column_inputs(self) -> int:
        """Incoming signals of a column of the last stage: raw inputs + every lower column."""
        return self.n_inputs + self.total_columns - self.columns_per_stage

    @property
    def column_inputs(self) -> int:
        """m: padded number of incoming signals per column: the real ones, then zero slots so that P
        is a multiple of PACK_WIDTH (no input, weight 0, never learned)."""
        return -(-(self.real_column_inputs + 2) // PACK_WIDTH) * PACK_WIDTH - 2

    @property
    def packed(self) -> int:
        """P: packed parameters per gate: m input weights, 1 self-recurrent weight, 1 bias."""
        return self.column_inputs + 2

    def stage_inputs(self, stage: int) -> int:
        """Real number of incoming signals of a column of `stage`."""
        return self.n_inputs + stage * self.columns_per_stage


class Hyper(NamedTuple):
    """Traced hyperparameters (Python floats or JAX scalars; arrays [B] under vmap).

    step_size: alpha of the columns (the head uses alpha / active columns); lam: TD(lambda) trace
    decay; normalization_rate: EMA decay of the normalisers; std_cap: floor on their variance.
    """

    step_size: float
    lam: float = 0.99
    normalization_rate: float = 0.99999
    std_cap: float = 0.01


# --------------------------------------------------------------------------- the learner protocol (learners.registry)
TITLE = "CCN"
SHAPE_EXAMPLE = "20:4:50000"
check_hyper = registry.checks(
    {
        "step_size": registry.positive,
        "lam": registry.unit_interval,
        "normalization_rate": registry.rate,
        "std_cap": registry.non_negative,
    }
)


def family(cfg: Config) -> str:
    """The display name of a shape: columnar (N:N), constructive (N:1) or ccn."""
    if cfg.columns_per_stage == cfg.total_columns:
        return "columnar"
    if cfg.columns_per_stage == 1:
        return "constructive"
    return "ccn"


def candidate_shapes(n_inputs: int, max_columns: int = 128, **static) -> list[str]:
    """Shapes to search when matching another learner's compute: columnar N:N:inf, N = 1..max_columns
    (a stage length does not change the cost per step, so constructive shapes need one written)."""
    return [f"{n}:{n}:inf" for n in range(1, max_columns + 1)]


class LearningBlock(NamedTuple):
    """The k columns of the learning stage, in buffers of their own (no per-step slicing)."""

    weights: jax.Array  # [k, 4, P] packed parameters of the learning columns
    input_mean: jax.Array  # [k, m] their input statistics
    input_var: jax.Array  # [k, m]
    trace_h: jax.Array  # [k, 4, P] dh/dtheta (RTRL)
    trace_c: jax.Array  # [k, 4, P] dc/dtheta
    eligibility: jax.Array  # [k, 4, P] TD(lambda) traces
    rms: optax.ScaleByRmsState  # nu [k, 4, P]


class State(NamedTuple):
    t: jax.Array  # [] int32, steps taken so far
    weights: jax.Array  # [N, 4, P] every column; the learning stage's rows live in `learning` (see column_weights)
    input_mean: jax.Array  # [N, m] per-column input statistics (learning rows: see `learning`)
    input_var: jax.Array  # [N, m]
    learning: LearningBlock  # the learning stage
    h: jax.Array  # [N] hidden states after the last forward pass
    c: jax.Array  # [N] cell states
    head_w: jax.Array  # [N]
    head_b: jax.Array  # []
    feature_mean: jax.Array  # [N] head feature statistics
    feature_var: jax.Array  # [N]
    features: jax.Array  # [N] normalised features of the last forward pass
    head_eligibility: tuple  # (e_w [N], e_b [])
    head_rms: optax.ScaleByRmsState  # nu: (s_w [N], s_b [])
    prediction: jax.Array  # [] V of the last forward pass ("old")


# --------------------------------------------------------------------------- structure
def input_mask(cfg: Config) -> np.ndarray:
    """[N, m] bool: which padded incoming signals each column really reads."""
    n, k, d = cfg.total_columns, cfg.columns_per_stage, cfg.n_inputs
    stage_of_column = np.arange(n) // k
    lower = np.arange(cfg.column_inputs - d)  # slot j: column j's delayed hidden state (j >= n - k: padding)
    mask = np.ones((n, cfg.column_inputs), dtype=bool)
    mask[:, d:] = lower[None, :] < (stage_of_column[:, None] * k)
    return mask


def real_slots(cfg: Config) -> np.ndarray:
    """Indices into the packed axis P of the real slots: the real inputs, u and b (padding left out)."""
    return np.r_[np.arange(cfg.real_column_inputs), cfg.packed - 2, cfg.packed - 1]


def unpadded(cfg: Config, array):
    """The real part of a padded last axis, for inspection and references: [..., P] -> [..., d + N - k
    + 2] (parameters, traces), or [..., m] -> [..., d + N - k] (input statistics)."""
    if array.shape[-1] == cfg.packed:
        return array[..., real_slots(cfg)]
    if array.shape[-1] == cfg.column_inputs:
        return array[..., : cfg.real_column_inputs]
    raise ValueError(f"unpadded: last axis {array.shape[-1]} is neither P = {cfg.packed} nor m = {cfg.column_inputs}")


def stage_at(cfg: Config, t: jax.Array) -> jax.Array:
    """Stage learning at step t (0-based): it advances when t % S == S - 1, capped at the last."""
    if cfg.steps_per_stage is None or cfg.n_stages == 1:
        return jnp.zeros_like(t)
    # t >= 0, so truncating division is floor division (and cheaper: no sign fix-ups that XLA
    # would otherwise repeat inside every fused element-wise loop that depends on the stage)
    return jnp.minimum(lax.div(t + 1, jnp.asarray(cfg.steps_per_stage, t.dtype)), cfg.n_stages - 1)


def _rows(cfg: Config, array: jax.Array, start: jax.Array) -> jax.Array:
    """Rows [start, start + k) of an [N, ...] array."""
    if cfg.n_stages == 1:
        return array
    return lax.dynamic_slice_in_dim(array, start, cfg.columns_per_stage, axis=0)


@custom_batching.custom_vmap
def _update_rows(array: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    return lax.dynamic_update_slice_in_dim(array, rows, start, axis=0)


@_update_rows.def_vmap
def _update_rows_vmap(axis_size, in_batched, array, rows, start):
    """Under vmap with one start for the whole batch (the learner's `t` is unbatched), a plain
    dynamic-update-slice of the batched array, not the clipped scatter (a select against the old
    rows in every element) that vmap of dynamic_update_slice is."""
    array_batched, rows_batched, start_batched = in_batched
    if start_batched:
        update = jax.vmap(lambda a, r, s: lax.dynamic_update_slice_in_dim(a, r, s, axis=0),
                          in_axes=(0 if array_batched else None, 0 if rows_batched else None, 0))
        return update(array, rows, start), True
    if not array_batched:
        array = jnp.broadcast_to(array, (axis_size, *array.shape))
    if not rows_batched:
        rows = jnp.broadcast_to(rows, (axis_size, *rows.shape))
    return lax.dynamic_update_slice_in_dim(array, rows, start, axis=1), True


def _put_rows(cfg: Config, array: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    if cfg.n_stages == 1:
        return rows
    return _update_rows(array, rows, start)


def _fresh_block(cfg: Config, weights, input_mean, input_var, start) -> LearningBlock:
    """A stage starting to learn: its columns' parameters and statistics, fresh traces (8b)."""
    zeros = jnp.zeros((cfg.columns_per_stage, 4, cfg.packed), weights.dtype)
    return LearningBlock(
        weights=_rows(cfg, weights, start),
        input_mean=_rows(cfg, input_mean, start),
        input_var=_rows(cfg, input_var, start),
        trace_h=zeros,
        trace_c=zeros,
        eligibility=zeros,
        rms=common.rmsprop_init(zeros),
    )


def column_weights(cfg: Config, state: State) -> jax.Array:
    """[N, 4, P] packed parameters of every column, the learning stage's included."""
    start = stage_at(cfg, jnp.maximum(state.t - 1, 0)) * cfg.columns_per_stage
    return _put_rows(cfg, state.weights, state.learning.weights, start)


def column_input_stats(cfg: Config, state: State) -> tuple[jax.Array, jax.Array]:
    """([N, m], [N, m]) input means and variances of every column, the learning stage's included."""
    start = stage_at(cfg, jnp.maximum(state.t - 1, 0)) * cfg.columns_per_stage
    return (_put_rows(cfg, state.input_mean, state.learning.input_mean, start),
            _put_rows(cfg, state.input_var, state.learning.input_var, start))


# --------------------------------------------------------------------------- init
def init(cfg: Config, hyper: Hyper, key: jax.Array) -> State:
    """Fresh learner: column parameters U(-0.01, 0.01), head 0, statistics (0, 1), traces 0."""
    del hyper  # the initial state does not depend on hyperparameters
    dtype = common.resolve_dtype(cfg.dtype)
    n, m, p = cfg.total_columns, cfg.column_inputs, cfg.packed
    zeros_n = jnp.zeros((n,), dtype)
    zero = jnp.zeros((), dtype)
    real = cfg.real_column_inputs  # the draws of the unpadded layout; the padding slots' weights are 0
    drawn = common.uniform(key, (n, 4, real + 2), -INIT_RANGE, INIT_RANGE, dtype)
    weights = jnp.concatenate([drawn[..., :real], jnp.zeros((n, 4, p - real - 2), dtype), drawn[..., real:]], -1)
    input_mean, input_var = jnp.zeros((n, m), dtype), jnp.ones((n, m), dtype)
    return State(
        t=jnp.zeros((), jnp.int32),
        weights=weights,
        input_mean=input_mean,
        input_var=input_var,
        learning=_fresh_block(cfg, weights, input_mean, input_var, 0),
        h=zeros_n,
        c=zeros_n,
        head_w=zeros_n,
        head_b=zero,
        feature_mean=zeros_n,
        feature_var=jnp.ones((n,), dtype),
        features=zeros_n,
        head_eligibility=(zeros_n, zero),
        head_rms=common.rmsprop_init((zeros_n, zero)),
        prediction=zero,
    )


# --------------------------------------------------------------------------- the column
def column_forward(weights: jax.Array, z: jax.Array, c_prev: jax.Array):
    """One step of a batch of one-unit LSTM columns.

    weights [..., 4, P] packed (i, f, g, o); z [..., P] = [x_hat | h_prev | 1]; c_prev [...].
    Returns (h, c, gates) with gates = (i, f, g, o), each [...].
    """
    a = jnp.einsum("...qp,...p->...q", weights, z)
    i = jax.nn.sigmoid(a[..., 0])
    f = jax.nn.sigmoid(a[..., 1])
    g = jnp.tanh(a[..., 2])
    o = jax.nn.sigmoid(a[..., 3])
    c = f * c_prev + i * g
    h = o * jnp.tanh(c)
    return h, c, (i, f, g, o)


def rtrl_update(weights, z, c_prev, c, gates, trace_h, trace_c):
    """Exact RTRL traces of one-unit columns (ALGORITHMS.md section 1).

    For a parameter theta of gate block q with direct input z_theta:
        da_r/dtheta = [r == q] z_theta + u_r * H_prev
        C = f C_prev + c_prev f' da_f + i g' da_g + g i' da_i
        H = o (1 - tanh(c)^2) C + tanh(c) o' da_o
    which, collecting the u_r * H_prev terms, is
        C = f C_prev + A H_prev + Dc_q z_theta,   A = c_prev f' u_f + i g' u_g + g i' u_i
        H = B C + E H_prev + Dh_q z_theta,         B = o (1 - tanh(c)^2),  E = tanh(c) o' u_o
    with Dc = (g i', c_prev f', i g', 0) and Dh = (0, 0, 0, tanh(c) o') over q = (i, f, g, o).

    weights [k, 4, P], z [k, P], c_prev, c [k], gates 4 x [k], traces [k, 4, P].
    """
    i, f, g, o = gates
    d_i, d_f, d_g, d_o = i * (1 - i), f * (1 - f), 1 - g * g, o * (1 - o)
    u = weights[..., -2]  # [k, 4] self-recurrent weights (u_i, u_f, u_g, u_o)
    tanh_c = jnp.tanh(c)
    a_coef = c_prev * d_f * u[..., 1] + i * d_g * u[..., 2] + g * d_i * u[..., 0]
    b_coef = o * (1 - tanh_c * tanh_c)
    e_coef = tanh_c * d_o * u[..., 3]
    zero = jnp.zeros_like(c)
    direct_c = jnp.stack([g * d_i, c_prev * d_f, i * d_g, zero], axis=-1)  # [k, 4]
    direct_h = jnp.stack([zero, zero, zero, tanh_c * d_o], axis=-1)  # only o feeds H directly
    zq = z[..., None, :]  # [k, 1, P]
    new_c = f[:, None, None] * trace_c + a_coef[:, None, None] * trace_h + direct_c[..., None] * zq
    new_h = b_coef[:, None, None] * new_c + e_coef[:, None, None] * trace_h + direct_h[..., None] * zq
    return new_h, new_c


# --------------------------------------------------------------------------- one step
def step(cfg: Config, hyper: Hyper, state: State, observation, cumulant, gamma):
    """Consume (x_{t+1}, cumulant, gamma), learn, and return (state, V(x_{t+1})).

    observation [d]; cumulant, gamma []. Order (ALGORITHMS.md section 3): decay traces, add
    grad V of the last forward pass, forward, delta, update.
    """
    dtype = state.head_b.dtype
    n, k, d = cfg.total_columns, cfg.columns_per_stage, cfg.n_inputs
    t = state.t
    stage = stage_at(cfg, t)
    start = stage * k
    alpha = jnp.asarray(hyper.step_size, dtype)
    gamma = jnp.asarray(gamma, dtype)
    gamma_lambda = gamma * jnp.asarray(hyper.lam, dtype)
    rate = jnp.asarray(hyper.normalization_rate, dtype)
    std_cap = jnp.asarray(hyper.std_cap, dtype)

    # The full arrays' rows of the learning stage are brought up to date with its block (an
    # in-place row update; the rows of the stage that was learning until now, so a stage that
    # starts now finds the finished one written back, frozen). One forward pass over the full
    # arrays then serves every column, the learning ones included.
    block = state.learning
    staged = cfg.n_stages > 1 and cfg.steps_per_stage is not None
    block_start = stage_at(cfg, jnp.maximum(t - 1, 0)) * k if staged else start
    if cfg.n_stages > 1:
        state = state._replace(weights=_put_rows(cfg, state.weights, block.weights, block_start),
                               input_mean=_put_rows(cfg, state.input_mean, block.input_mean, block_start),
                               input_var=_put_rows(cfg, state.input_var, block.input_var, block_start))
    # A stage that starts now loads its block from those rows, with fresh traces, eligibility and
    # RMSProp (8b). The parameters and statistics are read back from the rows of the stage learning
    # now whether or not it starts (unchanged, those rows are the block just written: the same
    # values), so only the traces go through the `cond` (fewer loop-carried copies per step).
    if staged:
        starts = stage != stage_at(cfg, jnp.maximum(t - 1, 0))
        traces = (block.trace_h, block.trace_c, block.eligibility, block.rms)
        fresh = lambda _: _fresh_block(cfg, state.weights, state.input_mean, state.input_var, start)[3:]  # noqa: E731
        traces = lax.cond(starts, fresh, lambda unchanged: unchanged, traces)
        block = LearningBlock(_rows(cfg, state.weights, start), _rows(cfg, state.input_mean, start),
                              _rows(cfg, state.input_var, start), *traces)

    # 1-2. Decay the traces and add grad V(S_t) of the last forward pass. The column gradient
    # uses the current head weight and the head variance of that forward pass.
    head_scale = _rows(cfg, state.head_w / jnp.sqrt(state.feature_var), start)  # [k] dV/dh
    eligibility = common.accumulate_traces(block.eligibility, head_scale[:, None, None] * block.trace_h, gamma_lambda)
    head_eligibility = common.accumulate_traces(
        state.head_eligibility, (state.features, jnp.ones((), dtype)), gamma_lambda
    )

    # 3. Forward every column on x_{t+1} and the one-step-delayed lower hidden states: one pass
    # over the full arrays (whose learning rows now hold the block); the learning rows of z and of
    # the gates are sliced out for RTRL (no second forward of the learning stage).
    padding = jnp.zeros((cfg.column_inputs - cfg.real_column_inputs,), dtype)
    raw_inputs = jnp.concatenate([jnp.asarray(observation, dtype), state.h[: n - k], padding])  # [m]
    real = jnp.arange(cfg.column_inputs) < d + stage * k  # [m] inputs of the learning stage
    h_prev_l, c_prev_l = _rows(cfg, state.h, start), _rows(cfg, state.c, start)
    x_hat_l = jnp.where(real, common.normalize(block.input_mean, block.input_var, raw_inputs), 0.0)  # [k, m]
    z_l = jnp.concatenate([x_hat_l, h_prev_l[:, None], jnp.ones((k, 1), dtype)], axis=1)  # [k, P]
    if cfg.n_stages == 1:
        h, c, gates_l = column_forward(block.weights, z_l, c_prev_l)
        c_l = c
    else:  # the same z_l as the full forward's learning rows (same statistics, same formula)
        mask = jnp.asarray(input_mask(cfg))
        x_hat = jnp.where(mask, common.normalize(state.input_mean, state.input_var, raw_inputs), 0.0)  # [N, m]
        z = jnp.concatenate([x_hat, state.h[:, None], jnp.ones((n, 1), dtype)], axis=1)  # [N, P]
        h, c, gates = column_forward(state.weights, z, state.c)
        c_l = _rows(cfg, c, start)
        gates_l = tuple(_rows(cfg, gate, start) for gate in gates)

    # RTRL on the learning columns, with the same z their forward pass used.
    trace_h, trace_c = rtrl_update(block.weights, z_l, c_prev_l, c_l, gates_l, block.trace_h, block.trace_c)

    # Input statistics of the learning columns, updated after the forward pass that used them.
    mean_l, var_l = common.ema_update(block.input_mean, block.input_var, raw_inputs, rate, std_cap)
    input_mean_l = jnp.where(real, mean_l, block.input_mean)
    input_var_l = jnp.where(real, var_l, block.input_var)

    # Head feature statistics (every column, before the prediction), then V.
    feature_mean, feature_var = common.ema_update(state.feature_mean, state.feature_var, h, rate, std_cap)
    features = common.normalize(feature_mean, feature_var, h)
    prediction = jnp.dot(state.head_w, features) + state.head_b

    # 4-5. TD error and the RMSProp update of the learning columns and the active head.
    delta = common.td_error(jnp.asarray(cumulant, dtype), gamma, prediction, state.prediction)
    weights_l, rms = common.td_update(block.weights, block.rms, eligibility, delta, alpha)

    n_active = (stage + 1) * k
    head_alpha = alpha / n_active.astype(dtype)
    (head_w, head_b), head_rms = common.td_update(
        (state.head_w, state.head_b), state.head_rms, head_eligibility, delta, (head_alpha, head_alpha)
    )
    active = jnp.arange(n) < n_active
    head_w = jnp.where(active, head_w, state.head_w)
    head_rms = optax.ScaleByRmsState(nu=(jnp.where(active, head_rms.nu[0], state.head_rms.nu[0]), head_rms.nu[1]))

    new_state = state._replace(
        t=t + 1,
        learning=LearningBlock(weights_l, input_mean_l, input_var_l, trace_h, trace_c, eligibility, rms),
        h=h,
        c=c,
        head_w=head_w,
        head_b=head_b,
        feature_mean=feature_mean,
        feature_var=feature_var,
        features=features,
        head_eligibility=head_eligibility,
        head_rms=head_rms,
        prediction=prediction,
    )
    return new_state, prediction


# --------------------------------------------------------------------------- compute accounting
def column_params(n_column_inputs: int) -> int:
    """4 * n_in + 8: input weights, self-recurrent weight and bias per gate."""
    return 4 * n_column_inputs + 8


def cost(cfg: Config) -> Cost:
    """Parameters and per-step compute of the most expensive (last) stage, on the real sizes.

    flops_per_step counts one floating-point operation per scalar add, subtract, multiply,
    divide, max, compare or select, one per transcendental (exp, tanh, sqrt; a sigmoid is
    1/(1+exp(-x)): 4), and 2*n per length-n dot product; see docs/compute.md. It counts
    the forward pass of all N columns on their real inputs, RTRL on the k learning columns,
    eligibility, RMSProp and input statistics of the learning columns, the head and its
    statistics. paper_ops_per_step is the authors' rule: P_all (forward) + 4 * P_learning
    (RTRL), which is 5 * P for a columnar network.
    """
    k, last = cfg.columns_per_stage, cfg.n_stages - 1
    inputs_per_column = [cfg.stage_inputs(col // k) for col in range(cfg.total_columns)]
    column_total = sum(column_params(n_in) for n_in in inputs_per_column)
    n_head = cfg.total_columns + 1
    learning_inputs = cfg.stage_inputs(last)
    learning_column = column_params(learning_inputs)
    n_active = cfg.n_stages * k  # in the last stage every column feeds the head
    learning = k * learning_column + n_active + 1

    flops = 0
    for n_in in inputs_per_column:  # forward of every column
        flops += _FORWARD_PER_INPUT * n_in + _FORWARD_PER_COLUMN
    flops += k * (_LEARN_PER_PARAM * learning_column + _STATS_PER_INPUT * learning_inputs + _LEARN_PER_COLUMN)
    flops += _HEAD_PER_COLUMN * cfg.total_columns + _HEAD_FIXED
    paper_ops = column_total + n_head + 4 * k * learning_column
    return Cost(
        params=column_total + n_head,
        learning_params=learning,
        flops_per_step=int(flops),
        paper_ops_per_step=int(paper_ops),
    )


# Per-element operation counts of the code above (see docs/compute.md for the derivation).
# forward, per real input: normalise (sub, sqrt, div) 3, mask select 1, 4 gate MACs 8
_FORWARD_PER_INPUT = 12
# forward, per column: self-recurrence and bias MACs 16, 3 sigmoids 12, tanh 1, c 3, tanh + mul 2
_FORWARD_PER_COLUMN = 34
# per learning parameter: C (3 mul, 2 add), H (3 mul, 2 add),
# eligibility (mul, mul, add), RMSProp (delta*e, square, 2 mul, add, sqrt, add, div, mul, add)
_LEARN_PER_PARAM = 23
# per learning input: EMA mean (3) and variance (sub, square, 2 mul, add, max) 6, 2 selects
_STATS_PER_INPUT = 11
# per learning column: gate derivatives and trace coefficients
_LEARN_PER_COLUMN = 24
# head, per column: feature stats 9, normalise 3, dot 2, eligibility 2, RMSProp 10, masking 3,
# gradient scale w / sqrt(v) 2
_HEAD_PER_COLUMN = 31
_HEAD_FIXED = 20


__all__ = ["Config", "Hyper", "State", "LearningBlock", "init", "step", "cost", "stage_at", "input_mask", "unpadded",
           "column_weights", "column_input_stats", "GATES"]
