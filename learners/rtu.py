"""Recurrent trace units (RTU) with exact RTRL and TD(lambda).

Elelimy, White, Bowling, White (NeurIPS 2024, arXiv 2409.01449); ALGORITHMS.md section 9.
n complex-diagonal units, kept in real arithmetic as pairs (c1, c2). Per unit k:

    r = exp(-exp(nu_log)),  theta = exp(theta_log),  g = r cos theta,  phi = r sin theta,
    eta = sqrt(1 - r^2)
    c1 = g c1_prev - phi c2_prev + eta (W1 x_hat)
    c2 = g c2_prev + phi c1_prev + eta (W2 x_hat)
    features [f(c1), f(c2)]   f = identity (linear RTU) or relu / tanh (non-linear RTU; the
                              recurrence stays linear, f acts on the output only)

and the head of the CCN family, V = w . feature_hat + b. The recurrence is diagonal, so RTRL is
exact at O(n d): each parameter feeds one unit only and keeps one pair of sensitivities
(dc1/dtheta, dc2/dtheta), rotated by the same (g, phi) every step plus its direct term. The
sensitivity of W2[k, j] is i times that of W1[k, j] (read as complex numbers c1 + i c2), so
one pair per (unit, input) serves both input weights.

Shapes (d = n_inputs, n = units; axis "2" is the pair (c1, c2), or (W1, W2)):
    nu_log, theta_log [n]   input_weights [2, n, d]   head_w [2, n]   head_b []
    c, trace_nu, trace_theta [2, n]   trace_w [2, n, d] = (Re, Im) of d(c1 + i c2)/dW1
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learners import common, registry
from learners.compute import Cost

ACTIVATIONS = ("linear", "relu", "tanh")
INIT_EPS = 1e-6  # the uniform draws of r^2 and theta start at INIT_EPS (log(0) would be -inf)


def build_config(cls, kind: str, shape, n_inputs: int, static: dict):
    """cls(n_inputs, units, **static) from the shape "n" (units), naming unknown static settings in the error."""
    units = registry.parse_shape(shape, ("units",), "32", notation=f"{kind} units")["units"]
    known = {f.name for f in dataclasses.fields(cls)} - {"n_inputs", "units"}
    unknown = sorted(set(static) - known)
    if unknown:
        raise ValueError(
            f"{kind}: unknown setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
        )
    return cls(n_inputs, units, **static)


def check_common_fields(kind: str, cfg) -> None:
    """Validation shared by the RTU and LRU configs."""
    for name in ("n_inputs", "units"):
        value = getattr(cfg, name)
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{kind}.Config.{name} must be a positive integer, got {value!r}")
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"{kind}.Config.activation must be one of {ACTIVATIONS}, got {cfg.activation!r}")
    if not 0.0 <= cfg.r_min < cfg.r_max <= 1.0:
        raise ValueError(f"{kind}.Config: need 0 <= r_min < r_max <= 1, got r_min={cfg.r_min!r}, r_max={cfg.r_max!r}")
    if not cfg.max_phase > 0:
        raise ValueError(f"{kind}.Config.max_phase must be > 0, got {cfg.max_phase!r}")
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"{kind}.Config.dtype must be 'float32' or 'float64', got {cfg.dtype!r}")


@dataclasses.dataclass(frozen=True)
class UnitsConfig:
    """The fields and parsing shared by the RTU and LRU configs; each subclasses it as its Config
    and sets KIND ("rtu", "lru": the module named in errors)."""

    n_inputs: int
    units: int
    activation: str = "linear"
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 6.28
    dtype: str = "float32"

    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = ("units",)
    KIND: ClassVar[str] = "rtu"

    def __post_init__(self):
        check_common_fields(self.KIND, self)

    @classmethod
    def from_shape(cls, shape: str, n_inputs: int, **static):
        """Parse the shape "n" (number of units), e.g. "32"; static settings as keywords."""
        return build_config(cls, cls.KIND.upper(), shape, n_inputs, static)

    @property
    def shape(self) -> str:
        return str(self.units)


@dataclasses.dataclass(frozen=True)
class Config(UnitsConfig):
    """Static shape of an RTU learner (hashable: it selects the compiled program).

    activation "linear" is the linear RTU; "relu" or "tanh" the non-linear RTU. r_min, r_max
    and max_phase set the initial eigenvalues: |lambda| uniform on the ring [r_min, r_max] of
    the complex plane, phase uniform in [0, max_phase] (the authors' defaults).
    """

    KIND: ClassVar[str] = "rtu"


class Hyper(NamedTuple):
    """Traced hyperparameters of the RTU and the LRU (Python floats or JAX scalars; arrays [B] under vmap).

    step_size: alpha of the recurrent parameters (the head uses alpha / 2n); lam: TD(lambda) trace
    decay; normalization_rate: EMA decay of the input and head normalisers; std_cap: floor on their variance.
    """

    step_size: float = 1e-3
    lam: float = 0.99
    normalization_rate: float = 0.99999
    std_cap: float = 0.01


# --------------------------------------------------------------------------- the learner protocol (learners.registry)
TITLE = "RTU"
HYPER_CHECKS = {
    "step_size": registry.positive,
    "lam": registry.unit_interval,
    "normalization_rate": registry.rate,
    "std_cap": registry.non_negative,
}
check_hyper = registry.checks(HYPER_CHECKS)


def candidate_shapes(n_inputs: int, max_units: int = 256, **static) -> list[str]:
    """Shapes to search when matching another learner's compute: 1..max_units units."""
    return [str(n) for n in range(1, max_units + 1)]


class Params(NamedTuple):
    nu_log: jax.Array  # [n] r = exp(-exp(nu_log))
    theta_log: jax.Array  # [n] theta = exp(theta_log)
    input_weights: jax.Array  # [2, n, d] (W1, W2)
    head_w: jax.Array  # [2, n] over the features (f(c1), f(c2))
    head_b: jax.Array  # []


class State(NamedTuple):
    t: jax.Array  # [] int32 steps taken
    params: Params
    c: jax.Array  # [2, n] (c1, c2) after the last forward pass
    trace_nu: jax.Array  # [2, n] d(c1, c2)/d nu_log
    trace_theta: jax.Array  # [2, n] d(c1, c2)/d theta_log
    trace_w: jax.Array  # [2, n, d] (Re, Im) of d(c1 + i c2)/d W1; that of W2 is i times it
    eligibility: Params
    rms: optax.ScaleByRmsState  # nu: Params-shaped
    input_mean: jax.Array  # [d] input statistics (shared by every unit)
    input_var: jax.Array  # [d]
    feature_mean: jax.Array  # [2, n] head feature statistics
    feature_var: jax.Array  # [2, n]
    features: jax.Array  # [2, n] normalised features of the last forward pass
    prediction: jax.Array  # [] V of the last forward pass ("old")


# --------------------------------------------------------------------------- shared with learners.lru
def activation(name: str, c: jax.Array) -> jax.Array:
    """The output non-linearity f (identity for "linear")."""
    if name == "relu":
        return jnp.maximum(c, 0.0)
    if name == "tanh":
        return jnp.tanh(c)
    return c


def activation_slope(name: str, c: jax.Array, out: jax.Array) -> jax.Array | None:
    """f'(c) given out = f(c); None for "linear" (slope 1, nothing to multiply)."""
    if name == "relu":
        return (c > 0).astype(c.dtype)
    if name == "tanh":
        return 1.0 - out * out
    return None


def init_eigenvalues(key: jax.Array, units: int, r_min: float, r_max: float, max_phase: float, dtype):
    """(nu_log, theta_log) [n]: |lambda| uniform on the ring [r_min, r_max], phase uniform in (0, max_phase)."""
    k_r, k_theta = jax.random.split(key)
    u = jax.random.uniform(k_r, (units,), dtype, minval=INIT_EPS, maxval=1.0)
    nu = -0.5 * jnp.log(u * (r_max**2 - r_min**2) + r_min**2)
    theta = max_phase * jax.random.uniform(k_theta, (units,), dtype, minval=INIT_EPS, maxval=1.0)
    return jnp.log(nu), jnp.log(theta)


class Rotation(NamedTuple):
    """lambda = r e^{i theta} = g + i phi per unit, with nu = exp(nu_log), theta = exp(theta_log)."""

    nu: jax.Array  # [n]
    theta: jax.Array  # [n]
    r: jax.Array  # [n]
    g: jax.Array  # [n]
    phi: jax.Array  # [n]


def rotation(nu_log: jax.Array, theta_log: jax.Array) -> Rotation:
    nu, theta = jnp.exp(nu_log), jnp.exp(theta_log)
    r = jnp.exp(-nu)
    return Rotation(nu, theta, r, r * jnp.cos(theta), r * jnp.sin(theta))


def signed(value: jax.Array) -> jax.Array:
    """(-value, value) [2, ...]: the signs of i * (p1 + i p2) = (-p2, p1), for per-unit factors."""
    return jnp.stack([-value, value])


def add_to_first(pair: jax.Array, value: jax.Array) -> jax.Array:
    """(p1 + value, p2) for pair = (p1, p2) [2, ...]: value padded with a zero second half."""
    return pair + jax.lax.pad(value[None], jnp.zeros((), value.dtype), [(0, 1, 0)] + [(0, 0, 0)] * value.ndim)


def rotate(rot: Rotation, pair: jax.Array) -> jax.Array:
    """lambda * (p1 + i p2) for pair = (p1, p2) [2, n, ...]: (g p1 - phi p2, g p2 + phi p1).

    Computed as g (p1, p2) + (-phi, phi) (p2, p1), a reversal of the pair axis, not as a stack
    of the two halves: stacking the halves of a batched [B, 2, n, d] trace made XLA:CPU carry
    the pair axis outermost and copy and transpose the largest arrays every step (docs/learners.md).
    """
    extra = (1,) * (pair.ndim - 2)
    g, phi = rot.g.reshape(rot.g.shape + extra), signed(rot.phi).reshape((2,) + rot.phi.shape + extra)
    return g * pair + phi * jnp.flip(pair, 0)


def input_weight_init(key: jax.Array, shape, n_inputs: int, dtype) -> jax.Array:
    """LeCun normal: truncated at 2 standard deviations, standard deviation 1/sqrt(n_inputs)."""
    stddev = 1.0 / np.sqrt(n_inputs) / 0.87962566103423978  # std of a unit normal truncated at +-2
    return stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)


def head_scale(head_w: jax.Array, feature_var: jax.Array, activation_name: str, c: jax.Array, features_raw):
    """dV/dc [2, n] of the last forward pass: (w / sqrt(v)) * f'(c), w and v held constant."""
    scale = head_w / jnp.sqrt(feature_var)
    slope = activation_slope(activation_name, c, features_raw)
    return scale if slope is None else scale * slope


def pair_gradient(scale: jax.Array, pair: jax.Array) -> jax.Array:
    """Re(conj(a + i b) (p1 + i p2)) = a p1 + b p2, for scale = (a, b) [2, n] and pair [2, n, ...]."""
    extra = (1,) * (pair.ndim - 2)
    a, b = scale[0].reshape(scale.shape[1:] + extra), scale[1].reshape(scale.shape[1:] + extra)
    return a * pair[0] + b * pair[1]


def input_weight_gradient(scale: jax.Array, trace: jax.Array) -> jax.Array:
    """[2, n, d] gradient of (W1, W2) (or (B_re, B_im)) from z = d(c1 + i c2)/dW1 = trace [2, n, d].

    dV/dW1 = Re(conj(delta) z) = a zr + b zi;  dV/dW2 = Re(conj(delta) i z) = b zr - a zi.
    """
    # as (a, -a) (zr, zi) + b (zi, zr): no stack of the [2, n, d] halves (see `rotate`)
    a, b = scale[0][:, None], scale[1][:, None]
    return signed(-a) * trace + b * jnp.flip(trace, 0)


class Scalars(NamedTuple):
    """A step's hyperparameters and discount as scalars of the learner's dtype."""

    alpha: jax.Array
    gamma: jax.Array
    gamma_lambda: jax.Array
    rate: jax.Array
    std_cap: jax.Array


def step_scalars(hyper: Hyper, gamma, dtype) -> Scalars:
    """Cast the step's hyperparameters and discount to `dtype`; gamma_lambda = gamma * lam."""
    alpha = jnp.asarray(hyper.step_size, dtype)
    gamma = jnp.asarray(gamma, dtype)
    gamma_lambda = gamma * jnp.asarray(hyper.lam, dtype)
    return Scalars(alpha, gamma, gamma_lambda, jnp.asarray(hyper.normalization_rate, dtype),
                   jnp.asarray(hyper.std_cap, dtype))


class Readout(NamedTuple):
    """Statistics and head output of one forward pass: the last six fields of an RTU or LRU State."""

    input_mean: jax.Array  # [d]
    input_var: jax.Array  # [d]
    feature_mean: jax.Array  # [2, n]
    feature_var: jax.Array  # [2, n]
    features: jax.Array  # [2, n]
    prediction: jax.Array  # []


def initial_readout(units: int, n_inputs: int, dtype) -> Readout:
    """Statistics (0, 1), features and prediction 0: those of a fresh learner."""
    zeros_pair = jnp.zeros((2, units), dtype)
    return Readout(
        input_mean=jnp.zeros((n_inputs,), dtype),
        input_var=jnp.ones((n_inputs,), dtype),
        feature_mean=zeros_pair,
        feature_var=jnp.ones((2, units), dtype),
        features=zeros_pair,
        prediction=jnp.zeros((), dtype),
    )


def readout(activation_name: str, state, x: jax.Array, pair: jax.Array, head_w, head_b, s: Scalars) -> Readout:
    """Update the input statistics with x, then the head feature statistics of f(pair) (before the
    prediction), then V = w . feature_hat + b. `state` holds the statistics of the last step."""
    input_mean, input_var = common.ema_update(state.input_mean, state.input_var, x, s.rate, s.std_cap)
    out = activation(activation_name, pair)
    feature_mean, feature_var = common.ema_update(state.feature_mean, state.feature_var, out, s.rate, s.std_cap)
    features = common.normalize(feature_mean, feature_var, out)
    prediction = jnp.sum(head_w * features) + head_b
    return Readout(input_mean, input_var, feature_mean, feature_var, features, prediction)


def step_sizes(params, alpha: jax.Array, units: int):
    """alpha for every recurrent parameter, alpha / 2n (the number of features) for the head.

    `params` is a Params NamedTuple ending with (head_w, head_b), as the RTU's and the LRU's.
    """
    head_alpha = alpha / (2 * units)
    return type(params)(*(alpha,) * (len(params) - 2), head_alpha, head_alpha)


def recurrent_cost(cfg, params: int, recurrent: int, per_unit: int) -> Cost:
    """Cost of an RTU or LRU with `params` parameters, `recurrent` of them with traces, and
    `per_unit` operations per unit besides the activation (the rest is counted alike in both)."""
    n, d = cfg.units, cfg.n_inputs
    flops = (
        _PER_INPUT * d
        + _PER_UNIT_INPUT * n * d
        + (per_unit + _ACTIVATION_PER_UNIT[cfg.activation]) * n
        + _LEARN_PER_PARAM * params
        + _FIXED
    )
    return Cost(
        params=params,
        learning_params=params,
        flops_per_step=int(flops),
        paper_ops_per_step=int(params + 4 * recurrent),
    )


# --------------------------------------------------------------------------- init
def init(cfg: Config, hyper: Hyper, key: jax.Array) -> State:
    """Fresh learner: eigenvalues on the ring, W LeCun normal, head 0, statistics (0, 1), traces 0."""
    del hyper  # the initial state does not depend on hyperparameters
    dtype = common.resolve_dtype(cfg.dtype)
    n, d = cfg.units, cfg.n_inputs
    k_eig, k_w = jax.random.split(key)
    nu_log, theta_log = init_eigenvalues(k_eig, n, cfg.r_min, cfg.r_max, cfg.max_phase, dtype)
    params = Params(
        nu_log=nu_log,
        theta_log=theta_log,
        input_weights=input_weight_init(k_w, (2, n, d), d, dtype),
        head_w=jnp.zeros((2, n), dtype),
        head_b=jnp.zeros((), dtype),
    )
    zeros_pair = jnp.zeros((2, n), dtype)
    return State(
        t=jnp.zeros((), jnp.int32),
        params=params,
        c=zeros_pair,
        trace_nu=zeros_pair,
        trace_theta=zeros_pair,
        trace_w=jnp.zeros((2, n, d), dtype),
        eligibility=jax.tree.map(jnp.zeros_like, params),
        rms=common.rmsprop_init(params),
        **initial_readout(n, d, dtype)._asdict(),
    )


# --------------------------------------------------------------------------- grad V(S_t)
def value_gradient(cfg: Config, state: State) -> Params:
    """grad V of the last forward pass w.r.t. every parameter (exact RTRL; a Params pytree).

    The column-style convention of the CCN family (ALGORITHMS.md 8b): the current head weight,
    the head variance and f'(c) of the last forward pass; normalisation statistics are constants.
    """
    params = state.params
    scale = head_scale(params.head_w, state.feature_var, cfg.activation, state.c, activation(cfg.activation, state.c))
    return Params(
        nu_log=pair_gradient(scale, state.trace_nu),
        theta_log=pair_gradient(scale, state.trace_theta),
        input_weights=input_weight_gradient(scale, state.trace_w),
        head_w=state.features,
        head_b=jnp.ones((), state.features.dtype),
    )


# --------------------------------------------------------------------------- one step
def step(cfg: Config, hyper: Hyper, state: State, observation, cumulant, gamma):
    """Consume (x_{t+1}, cumulant, gamma), learn, and return (state, V(x_{t+1})).

    observation [d]; cumulant, gamma []. The CCN family's order (ALGORITHMS.md section 3):
    decay traces, add grad V of the last forward pass, forward, delta, RMSProp update.
    """
    dtype = state.prediction.dtype
    params = state.params
    s = step_scalars(hyper, gamma, dtype)

    # 1-2. Decay the eligibility traces and add grad V(S_t) of the last forward pass.
    eligibility = common.accumulate_traces(state.eligibility, value_gradient(cfg, state), s.gamma_lambda)

    # 3. Forward on the normalised input, and the RTRL sensitivities of that same pass.
    x = jnp.asarray(observation, dtype)
    x_hat = common.normalize(state.input_mean, state.input_var, x)  # [d]
    rot = rotation(params.nu_log, params.theta_log)
    eta = jnp.sqrt(-jnp.expm1(-2.0 * rot.nu))  # sqrt(1 - r^2), accurate as r -> 1
    drive = params.input_weights @ x_hat  # [2, n] (W1 x_hat, W2 x_hat)
    recurrent = rotate(rot, state.c)  # [2, n] lambda * c_prev
    c = recurrent + eta * drive
    # nu_log: dg = -nu g, dphi = -nu phi, deta = nu r^2 / eta;  theta_log: dlambda = i theta lambda
    trace_nu = rotate(rot, state.trace_nu) - rot.nu * recurrent + (rot.nu * rot.r * rot.r / eta) * drive
    trace_theta = rotate(rot, state.trace_theta) + signed(rot.theta) * jnp.flip(recurrent, 0)
    trace_w = add_to_first(rotate(rot, state.trace_w), eta[:, None] * x_hat[None, :])
    # Input and head feature statistics (before the prediction), then V.
    out = readout(cfg.activation, state, x, c, params.head_w, params.head_b, s)

    # 4-5. TD error and RMSProp; the head's step size is alpha / (number of features).
    params, rms = common.td_learn(params, state.rms, eligibility, cumulant, s.gamma, out.prediction, state.prediction,
                                  step_sizes(params, s.alpha, cfg.units))
    new_state = State(
        t=state.t + 1,
        params=params,
        c=c,
        trace_nu=trace_nu,
        trace_theta=trace_theta,
        trace_w=trace_w,
        eligibility=eligibility,
        rms=rms,
        **out._asdict(),
    )
    return new_state, out.prediction


# --------------------------------------------------------------------------- compute accounting
def n_params(cfg: Config) -> int:
    """2n (nu_log, theta_log) + 2nd (W1, W2) + 2n + 1 (head)."""
    n, d = cfg.units, cfg.n_inputs
    return 2 * n + 2 * n * d + 2 * n + 1


def cost(cfg: Config) -> Cost:
    """Parameters and per-step compute (counting rule: docs/compute.md, as ccn.cost).

    flops_per_step: input statistics and normalisation, the eigenvalues, the forward pass,
    the sensitivities, grad V, eligibility and RMSProp of every parameter, the head.
    paper_ops_per_step: the CCN authors' rule for an RTRL learner, P (forward) + 4 P_rtrl
    (the recurrent parameters, those with sensitivities).
    """
    n, d = cfg.units, cfg.n_inputs
    return recurrent_cost(cfg, n_params(cfg), 2 * n + 2 * n * d, _PER_UNIT)


# Per-element operation counts of the code above (derivation in docs/compute.md), the LRU's too
# but for _PER_UNIT (lru._PER_UNIT).
_PER_INPUT = 12  # input statistics (EMA mean 3, variance 5, max 1) and normalisation (sub, sqrt, div)
# per (unit, input), besides the per-parameter learning: drive W x_hat 4 (2 dots), the W1
# sensitivity pair rotated (6) plus its direct term (2), grad V of W1 and W2 (6)
_PER_UNIT_INPUT = 18
# per unit: eigenvalues (exp x3 and a negation, cos, sin, 2 mul, expm1 with its 2 scalings, sqrt) 13;
# forward (rotation 6, eta * drive 2, add 2) 10; nu sensitivities (rotation 6, nu * recurrent 2,
# sub 2, nu r^2 / eta 3, times drive 2, add 2) 17; theta sensitivities (rotation 6, negation 1,
# theta * 2, add 2) 11; their grad V 6; head scale w / sqrt(v) 4; head feature statistics (9),
# normalisation (3) and dot (2), twice 28
_PER_UNIT = 13 + 10 + 17 + 11 + 6 + 4 + 28
_ACTIVATION_PER_UNIT = {"linear": 0, "relu": 2 * 4, "tanh": 2 * 4}  # f(c), f'(c) and its product, twice, per unit
_LEARN_PER_PARAM = 13  # eligibility (2), delta * e (1), RMSProp statistics (4) and scaling (3), alpha * u + add (2)
_FIXED = 12  # delta, gamma * lambda, head step size, step counter

__all__ = ["Config", "Hyper", "Params", "State", "init", "step", "cost", "value_gradient", "ACTIVATIONS"]
