"""The online linear recurrent unit (LRU) with its exact one-layer RTRL and TD(lambda).

Zucchet, Meier, Schug, Mujika, Sacramento, "Online learning of long-range dependencies"
(NeurIPS 2023, arXiv 2305.15947); ALGORITHMS.md section 9. n complex units with a diagonal
recurrence in the exponential parametrisation, kept in real arithmetic as (Re, Im) pairs:

    lambda = exp(-exp(nu_log) + i exp(theta_log)),   gamma = exp(gamma_log)   (learned, per unit)
    h = lambda (.) h_prev + gamma (.) (B x_hat),     B = B_re + i B_im        [n, d]
    features [f(Re h), f(Im h)]  (f = identity by default; relu / tanh a fixed output non-linearity)

and the head of the CCN family, V = w . feature_hat + b. The gradient is exact for one layer
with the paper's eligibility traces (complex, per unit; the recurrence is diagonal):

    e_lambda <- lambda e_lambda + h_prev         dh/dlambda
    e_gamma  <- lambda e_gamma + B x_hat          dh/dgamma
    e_B      <- lambda e_B + gamma x_hat^T       dh/dB_re [n, d]; dh/dB_im = i e_B

then, with delta = dV/dRe h + i dV/dIm h (through the head and f):
    dV/dB_re = Re(conj(delta) e_B),   dV/dB_im = -Im(conj(delta) e_B),
    dV/dgamma_log = gamma Re(conj(delta) e_gamma),
    dV/dnu_log = Re(conj(delta) e_lambda dlambda/dnu_log) with dlambda/dnu_log = -exp(nu_log) lambda,
    dV/dtheta_log likewise with dlambda/dtheta_log = i exp(theta_log) lambda.

Shapes (d = n_inputs, n = units; axis "2" is (Re, Im)):
    nu_log, theta_log, gamma_log [n]   input_weights [2, n, d] = (B_re, B_im)   head_w [2, n]
    h, trace_lambda, trace_gamma [2, n]   trace_b [2, n, d]
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
from learners.rtu import (
    HYPER_CHECKS,
    Hyper,
    UnitsConfig,
    activation,
    add_to_first,
    head_scale,
    init_eigenvalues,
    initial_readout,
    input_weight_gradient,
    pair_gradient,
    readout,
    recurrent_cost,
    rotate,
    rotation,
    step_scalars,
    step_sizes,
)


@dataclasses.dataclass(frozen=True)
class Config(UnitsConfig):
    """Static shape of an online LRU learner (hashable: it selects the compiled program).

    activation "linear" feeds (Re h, Im h) to the head; "relu" / "tanh" pass them through that
    fixed non-linearity first. r_min, r_max and max_phase set the initial eigenvalues (ring
    [r_min, r_max], phase in [0, max_phase]; the authors' defaults); gamma starts at
    sqrt(1 - |lambda|^2) and B at N(0, 1 / (2 d)) per real and imaginary part, as theirs.
    """

    KIND: ClassVar[str] = "lru"


# --------------------------------------------------------------------------- the learner protocol (learners.registry)
TITLE = "online LRU"
check_hyper = registry.checks(HYPER_CHECKS)


def candidate_shapes(n_inputs: int, max_units: int = 256, **static) -> list[str]:
    """Shapes to search when matching another learner's compute: 1..max_units complex units."""
    return [str(n) for n in range(1, max_units + 1)]


class Params(NamedTuple):
    nu_log: jax.Array  # [n] |lambda| = exp(-exp(nu_log))
    theta_log: jax.Array  # [n] arg lambda = exp(theta_log)
    gamma_log: jax.Array  # [n] input normalisation gamma = exp(gamma_log)
    input_weights: jax.Array  # [2, n, d] (B_re, B_im)
    head_w: jax.Array  # [2, n] over the features (f(Re h), f(Im h))
    head_b: jax.Array  # []


class State(NamedTuple):
    t: jax.Array  # [] int32 steps taken
    params: Params
    h: jax.Array  # [2, n] (Re h, Im h) after the last forward pass
    trace_lambda: jax.Array  # [2, n] e_lambda = dh/dlambda
    trace_gamma: jax.Array  # [2, n] e_gamma = dh/dgamma
    trace_b: jax.Array  # [2, n, d] e_B = dh/dB_re
    eligibility: Params
    rms: optax.ScaleByRmsState  # nu: Params-shaped
    input_mean: jax.Array  # [d] input statistics (shared by every unit)
    input_var: jax.Array  # [d]
    feature_mean: jax.Array  # [2, n] head feature statistics
    feature_var: jax.Array  # [2, n]
    features: jax.Array  # [2, n] normalised features of the last forward pass
    prediction: jax.Array  # [] V of the last forward pass ("old")


def init(cfg: Config, hyper: Hyper, key: jax.Array) -> State:
    """Fresh learner: eigenvalues on the ring, gamma = sqrt(1 - |lambda|^2), B normal, head 0, traces 0."""
    del hyper  # the initial state does not depend on hyperparameters
    dtype = common.resolve_dtype(cfg.dtype)
    n, d = cfg.units, cfg.n_inputs
    k_eig, k_b = jax.random.split(key)
    nu_log, theta_log = init_eigenvalues(k_eig, n, cfg.r_min, cfg.r_max, cfg.max_phase, dtype)
    params = Params(
        nu_log=nu_log,
        theta_log=theta_log,
        gamma_log=0.5 * jnp.log(-jnp.expm1(-2.0 * jnp.exp(nu_log))),
        input_weights=jax.random.normal(k_b, (2, n, d), dtype) * (1.0 / np.sqrt(2.0 * d)),
        head_w=jnp.zeros((2, n), dtype),
        head_b=jnp.zeros((), dtype),
    )
    zeros_pair = jnp.zeros((2, n), dtype)
    return State(
        t=jnp.zeros((), jnp.int32),
        params=params,
        h=zeros_pair,
        trace_lambda=zeros_pair,
        trace_gamma=zeros_pair,
        trace_b=jnp.zeros((2, n, d), dtype),
        eligibility=jax.tree.map(jnp.zeros_like, params),
        rms=common.rmsprop_init(params),
        **initial_readout(n, d, dtype)._asdict(),
    )


def value_gradient(cfg: Config, state: State, rot=None) -> Params:
    """grad V of the last forward pass w.r.t. every parameter (exact for one layer; a Params pytree).

    Conventions of the CCN family (ALGORITHMS.md 8b): the current parameters and head weight,
    the head variance and f' of the last forward pass; normalisation statistics are constants.
    `rot` is `rtu.rotation` of the current (nu_log, theta_log), if already computed.
    """
    params = state.params
    rot = rotation(params.nu_log, params.theta_log) if rot is None else rot
    scale = head_scale(params.head_w, state.feature_var, cfg.activation, state.h, activation(cfg.activation, state.h))
    lambda_trace = rotate(rot, state.trace_lambda)  # (m1, m2) = lambda e_lambda
    # Re(conj(a + ib) (-nu) (m1 + i m2)) = -nu (a m1 + b m2); Re(conj(a + ib) i theta (m1 + i m2)) = theta (b m1 - a m2)
    return Params(
        nu_log=-rot.nu * pair_gradient(scale, lambda_trace),
        theta_log=rot.theta * (scale[1] * lambda_trace[0] - scale[0] * lambda_trace[1]),
        gamma_log=jnp.exp(params.gamma_log) * pair_gradient(scale, state.trace_gamma),
        input_weights=input_weight_gradient(scale, state.trace_b),
        head_w=state.features,
        head_b=jnp.ones((), state.features.dtype),
    )


def step(cfg: Config, hyper: Hyper, state: State, observation, cumulant, gamma):
    """Consume (x_{t+1}, cumulant, gamma), learn, and return (state, V(x_{t+1})).

    observation [d]; cumulant, gamma []. The CCN family's order (ALGORITHMS.md section 3):
    decay traces, add grad V of the last forward pass, forward, delta, RMSProp update.
    """
    dtype = state.prediction.dtype
    params = state.params
    s = step_scalars(hyper, gamma, dtype)
    rot = rotation(params.nu_log, params.theta_log)  # the parameters of this step's gradient and forward

    # 1-2. Decay the eligibility traces and add grad V(S_t) of the last forward pass.
    eligibility = common.accumulate_traces(state.eligibility, value_gradient(cfg, state, rot), s.gamma_lambda)

    # 3. Forward on the normalised input, and the paper's traces for that same pass.
    x = jnp.asarray(observation, dtype)
    x_hat = common.normalize(state.input_mean, state.input_var, x)  # [d]
    input_scale = jnp.exp(params.gamma_log)  # [n]
    drive = params.input_weights @ x_hat  # [2, n] (Re, Im) of B x_hat
    h = rotate(rot, state.h) + input_scale * drive
    trace_lambda = rotate(rot, state.trace_lambda) + state.h
    trace_gamma = rotate(rot, state.trace_gamma) + drive
    trace_b = add_to_first(rotate(rot, state.trace_b), input_scale[:, None] * x_hat[None, :])
    # Input and head feature statistics (before the prediction), then V.
    out = readout(cfg.activation, state, x, h, params.head_w, params.head_b, s)

    # 4-5. TD error and RMSProp; the head's step size is alpha / (number of features).
    params, rms = common.td_learn(params, state.rms, eligibility, cumulant, s.gamma, out.prediction, state.prediction,
                                  step_sizes(params, s.alpha, cfg.units))
    new_state = State(
        t=state.t + 1,
        params=params,
        h=h,
        trace_lambda=trace_lambda,
        trace_gamma=trace_gamma,
        trace_b=trace_b,
        eligibility=eligibility,
        rms=rms,
        **out._asdict(),
    )
    return new_state, out.prediction


# --------------------------------------------------------------------------- compute accounting
def n_params(cfg: Config) -> int:
    """3n (nu_log, theta_log, gamma_log) + 2nd (B_re, B_im) + 2n + 1 (head)."""
    n, d = cfg.units, cfg.n_inputs
    return 3 * n + 2 * n * d + 2 * n + 1


def cost(cfg: Config) -> Cost:
    """Parameters and per-step compute (counting rule: docs/compute.md, as ccn.cost).

    flops_per_step: input statistics and normalisation, the eigenvalues, the forward pass,
    the traces, grad V, eligibility and RMSProp of every parameter, the head.
    paper_ops_per_step: the CCN authors' rule for an RTRL learner, P (forward) + 4 P_rtrl
    (the recurrent parameters, those with traces).
    """
    n, d = cfg.units, cfg.n_inputs
    return recurrent_cost(cfg, n_params(cfg), 3 * n + 2 * n * d, _PER_UNIT)


# Per-element operation counts of the code above (derivation in docs/compute.md). The per-input,
# per-parameter and fixed counts are the RTU's (rtu.recurrent_cost): per (unit, input), drive
# B x_hat 4 (2 dots), e_B rotated (6) plus its direct term (2), grad V of B_re and B_im (6), 18.
# per unit: eigenvalues (exp x3 and a negation, cos, sin, 2 mul) 8 and gamma (exp) 1; forward
# (rotation 6, gamma * drive 2, add 2) 10; e_lambda and e_gamma (rotation 6, add 2, twice) 16;
# lambda e_lambda 6 and the grad V of nu_log, theta_log, gamma_log 4 + 4 + 4; head scale
# w / sqrt(v) 4; head feature statistics (9), normalisation (3) and dot (2), twice 28
_PER_UNIT = 9 + 10 + 16 + 18 + 4 + 28

__all__ = ["Config", "Hyper", "Params", "State", "init", "step", "cost", "value_gradient"]
