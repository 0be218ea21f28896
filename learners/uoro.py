"""UORO (Tallec and Ollivier 2018) on the dense LSTM of T-BPTT, with TD(lambda): `uoro`.

ALGORITHMS.md section 9. The network, init and head are T-BPTT's (section 6: `tbptt.Params`,
`tbptt.cell`; V = w . h without bias, no normalisation). UORO keeps a rank-one estimate
A B^T of the RTRL influence matrix J_t = ds_t/dtheta of the state s = (h, c) [2H], unbiased
over its random signs nu [2H] (a key carried in the state, so a vmapped batch draws its own):

    nu     ~ uniform {-1, +1}^(2H)
    DA     = (dF/ds) A                      one JVP of the cell (jax.jvp of tbptt.cell)
    nuI    = nu^T (dF/dtheta)               one VJP: da = tbptt.cell_backward(nu), nuI = da (x)
                                            [x | h_prev | 1], |nuI| = |da| |[x | h_prev | 1]|
    rho0   = sqrt(|B| / (|DA| + eps)) + eps,   rho1 = sqrt(|nuI| / (|nu| + eps)) + eps
    A     <- rho0 DA + rho1 nu,   B <- B / rho0 + nuI / rho1

and the gradient of V(S_t) = w . h_t is estimated by (w . A_h) B (the head's, h, is exact).
E[A B^T] = J_t whatever the rhos (the cross terms are odd in nu); the rhos balance the
variance of the two factors (the paper's norm-equalising choice).

Shapes (d = n_inputs, H = hidden):
    params, eligibility, rms.nu: tbptt.Params (W [4H, d], U [4H, H], b [4H], w [H])
    A: a_h, a_c [H]   B: Influence (W [4H, d], U [4H, H], b [4H])   key: a PRNG key
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learners import common, snap1, tbptt
from learners.compute import Cost

EPS = 1e-7  # the paper's epsilon in rho0 and rho1


@dataclasses.dataclass(frozen=True)
class Config(snap1.HiddenConfig):
    """Static shape of a UORO learner: H hidden units (shape string "H")."""

    KIND: ClassVar[str] = "uoro"


# --------------------------------------------------------------------------- the learner protocol (learners.registry)
TITLE = "UORO"
Hyper = snap1.Hyper
check_hyper = snap1.check_hyper
candidate_shapes = snap1.candidate_shapes


class Influence(NamedTuple):
    """B (theta tilde): the parameter factor of the rank-one influence estimate."""

    W: jax.Array  # [4H, d]
    U: jax.Array  # [4H, H]
    b: jax.Array  # [4H]


class State(NamedTuple):
    t: jax.Array  # [] int32 steps taken
    params: tbptt.Params
    eligibility: tbptt.Params
    rms: optax.ScaleByRmsState  # nu: Params-shaped
    a_h: jax.Array  # [H] A (s tilde), the state factor, h part
    a_c: jax.Array  # [H] c part
    influence: Influence  # B
    key: jax.Array  # PRNG key of the random signs
    h: jax.Array  # [H] state after the last forward pass
    c: jax.Array  # [H]
    prediction: jax.Array  # [] V of the last forward pass ("old")


def init(cfg: Config, hyper: Hyper, key: jax.Array) -> State:
    """T-BPTT's init (W, U, b ~ U(-1/sqrt(H), 1/sqrt(H)), head 0) from one half of `key`; A = B = 0."""
    del hyper
    param_key, noise_key = jax.random.split(key)
    state = tbptt.init(tbptt.Config(cfg.n_inputs, 1, cfg.hidden, dtype=cfg.dtype), None, param_key)
    params = state.params
    zero_h = jnp.zeros_like(params.w)
    return State(
        t=jnp.zeros((), jnp.int32),
        params=params,
        eligibility=state.eligibility,
        rms=state.rms,
        a_h=zero_h,
        a_c=zero_h,
        influence=Influence(*(jnp.zeros_like(p) for p in params[:3])),
        key=noise_key,
        h=zero_h,
        c=zero_h,
        prediction=state.prediction,
    )


def _norm(*arrays: jax.Array) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(a * a) for a in arrays))


def step(cfg: Config, hyper: Hyper, state: State, observation, cumulant, gamma):
    """Consume (x_{t+1}, cumulant, gamma), learn, and return (state, V(x_{t+1})).

    observation [d]; cumulant, gamma []. The order of T-BPTT: decay traces, add the estimate of
    grad V(S_t), forward x_{t+1} (with the JVP of A) and update A, B with the parameters of
    that forward pass, delta, RMSProp update.
    """
    dtype = state.prediction.dtype
    x = jnp.asarray(observation, dtype)
    gamma = jnp.asarray(gamma, dtype)
    gamma_lambda = gamma * jnp.asarray(hyper.lam, dtype)
    params, influence = state.params, state.influence

    dv_ds = jnp.dot(params.w, state.a_h)  # dV/ds . A (V reads h only)
    gradient = tbptt.Params(*(dv_ds * b for b in influence), w=state.h)
    eligibility = common.accumulate_traces(state.eligibility, gradient, gamma_lambda)

    # Forward x_{t+1} and the JVP (dF/ds) A in one pass.
    (h, c, gates), (da_h, da_c, _) = jax.jvp(
        lambda h_prev, c_prev: tbptt.cell(params, x, h_prev, c_prev), (state.h, state.c), (state.a_h, state.a_c)
    )
    # The VJP nu^T (dF/dtheta): gate pre-activation cotangent da, then outer products with the inputs.
    key, sign_key = jax.random.split(state.key)
    nu_h, nu_c = jax.random.rademacher(sign_key, (2, cfg.hidden), dtype)
    da, _ = tbptt.cell_backward(gates, c, state.c, nu_h, nu_c)  # [4H]
    nu_norm = np.sqrt(2 * cfg.hidden)  # |nu| of 2H signs
    rho0 = jnp.sqrt(_norm(*influence) / (_norm(da_h, da_c) + EPS)) + EPS
    rho1 = jnp.sqrt(_norm(da) * _norm(x, state.h, jnp.ones((), dtype)) / (nu_norm + EPS)) + EPS
    a_h, a_c = rho0 * da_h + rho1 * nu_h, rho0 * da_c + rho1 * nu_c
    scaled = da / rho1
    influence = Influence(
        W=influence.W / rho0 + scaled[:, None] * x[None, :],
        U=influence.U / rho0 + scaled[:, None] * state.h[None, :],
        b=influence.b / rho0 + scaled,
    )

    prediction = jnp.dot(params.w, h)
    params, rms = common.td_learn(params, state.rms, eligibility, cumulant, gamma, prediction, state.prediction,
                                  hyper.step_size)
    new_state = State(
        t=state.t + 1,
        params=params,
        eligibility=eligibility,
        rms=rms,
        a_h=a_h,
        a_c=a_c,
        influence=influence,
        key=key,
        h=h,
        c=c,
        prediction=prediction,
    )
    return new_state, prediction


# --------------------------------------------------------------------------- compute accounting
def cost(cfg: Config) -> Cost:
    """Parameters and per-step compute (counting rule: docs/compute.md).

    flops_per_step: the dense forward with its JVP (8 H (d + H) + 8 H^2 for the recurrent
    tangent), the VJP and the update of B (per LSTM parameter: |B| 2, B / rho0 1, outer product
    and add 2), the gradient estimate, eligibility and RMSProp over every parameter, the head,
    the random signs. paper_ops_per_step = 3 P_T + 4 H^2: forward, one backward step (T-BPTT's
    rule at k = 1) and the rank-one update of B, one op per parameter each, plus the JVP through U.
    """
    d, hidden = cfg.n_inputs, cfg.hidden
    n_params = tbptt.paper_params(d, hidden)
    lstm = n_params - hidden
    flops = (_PER_LSTM_PARAM * lstm + 8 * hidden * hidden + _PER_UNIT * hidden + _HEAD_PER_UNIT * hidden
             + _PER_INPUT * d + _FIXED)
    return Cost(
        params=n_params,
        learning_params=n_params,
        flops_per_step=int(flops),
        paper_ops_per_step=int(3 * n_params + 4 * hidden * hidden),
    )


# Per-element operation counts of the code above (derivation in docs/compute.md).
# per LSTM parameter: forward multiply-add 2, gradient (w . A_h) B 1, eligibility 2, RMSProp 12,
# |B| 2, B / rho0 1, outer product 1, add 1
_PER_LSTM_PARAM = 2 + 1 + 2 + 12 + 2 + 1 + 1 + 1
# per unit: cell forward 34 (bias adds 8, sigmoids 12, tanh 2, cell and output 12), its tangent 56
# (gate derivatives 16, tangent chain 40), cell_backward 26, |da| and da / rho1 12, A 4 and |DA| 4
_PER_UNIT = 34 + 56 + 26 + 12 + 8
_HEAD_PER_UNIT = 2 + 2 + 2 + 12  # dV/ds . A 2, prediction dot 2, eligibility 2, RMSProp 12
_PER_INPUT = 2  # |[x | h | 1]|
_FIXED = 220 + 100  # the key split and the random signs (XLA: a fixed 220), delta, rhos, step counter

__all__ = ["Config", "Hyper", "Influence", "State", "init", "step", "cost", "EPS", "TITLE", "check_hyper",
           "candidate_shapes"]
