"""Pieces every learner shares: the EMA normaliser, TD(lambda) traces and the RMSProp TD update.

ALGORITHMS.md sections 3-5. Each piece is a small pure function over arrays or pytrees, so
the CCN family and T-BPTT use the same code, and a change here changes every learner.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

RMS_DECAY = 0.9999
RMS_EPS = 1e-8


# --------------------------------------------------------------------------- normaliser
def ema_update(mean: jax.Array, var: jax.Array, x: jax.Array, rate, std_cap):
    """One step of the EMA normaliser's statistics (ALGORITHMS.md section 4).

        mean <- d * mean + (1 - d) * x
        var  <- max(d * var + (1 - d) * (x - mean_new)^2, std_cap)

    Arrays of any (matching) shape; `rate` (d) and `std_cap` are scalars. d = 1 keeps
    mean = 0 and var = 1 forever, i.e. no normalisation. `std_cap` floors the variance.
    """
    mean = rate * mean + (1.0 - rate) * x
    var = jnp.maximum(rate * var + (1.0 - rate) * jnp.square(x - mean), std_cap)
    return mean, var


def normalize(mean: jax.Array, var: jax.Array, x: jax.Array) -> jax.Array:
    """(x - mean) / sqrt(var): no epsilon (var is floored by std_cap when it is updated)."""
    return (x - mean) / jnp.sqrt(var)


# --------------------------------------------------------------------------- TD(lambda)
def accumulate_traces(traces: Any, gradient: Any, gamma_lambda) -> Any:
    """Eligibility traces: e <- gamma * lambda * e + grad V(S_t), leaf by leaf (any pytree)."""
    return jax.tree.map(lambda e, g: gamma_lambda * e + g, traces, gradient)


def td_error(cumulant, gamma, prediction, previous_prediction):
    """delta = cumulant + gamma * V(S_{t+1}) - V(S_t)."""
    return cumulant + gamma * prediction - previous_prediction


# --------------------------------------------------------------------------- RMSProp on delta * e
# s <- beta s + (1 - beta) (delta e)^2, s_0 = 1, no bias correction; update = delta e / (sqrt(s) + eps).
# eps_in_sqrt=False is essential: optax's default puts eps inside the square root.
rmsprop = optax.scale_by_rms(decay=RMS_DECAY, eps=RMS_EPS, initial_scale=1.0, eps_in_sqrt=False)


def rmsprop_init(params: Any) -> optax.ScaleByRmsState:
    """Fresh RMSProp state for `params` (s = 1 everywhere)."""
    return rmsprop.init(params)


def td_update(params: Any, rms_state, traces: Any, delta, step_sizes: Any):
    """theta <- theta + alpha * rmsprop(delta * e): the TD(lambda) update of every learner.

    `step_sizes` is a pytree matching `params` whose leaves are scalars (or arrays that
    broadcast against the leaf), e.g. a smaller step for the head. Returns (params, rms_state).
    """
    direction = jax.tree.map(lambda e: delta * e, traces)
    scaled, rms_state = rmsprop.update(direction, rms_state)
    params = jax.tree.map(lambda p, a, u: p + a * u, params, step_sizes, scaled)
    return params, rms_state


def td_learn(params: Any, rms_state, traces: Any, cumulant, gamma, prediction, previous_prediction, step_sizes):
    """Steps 4-5 of a learner's step: delta from the two predictions, then `td_update`.

    `step_sizes`: a pytree matching `params` (as in td_update), or one scalar step size for every
    parameter, cast like the cumulant to the prediction's dtype. Returns (params, rms_state).
    """
    dtype = prediction.dtype
    delta = td_error(jnp.asarray(cumulant, dtype), gamma, prediction, previous_prediction)
    if jax.tree.structure(step_sizes) != jax.tree.structure(params):
        alpha = jnp.asarray(step_sizes, dtype)
        step_sizes = jax.tree.map(lambda _: alpha, params)
    return td_update(params, rms_state, traces, delta, step_sizes)


def uniform(key: jax.Array, shape, low, high, dtype) -> jax.Array:
    """U(low, high) initialisation."""
    return jax.random.uniform(key, shape, dtype=dtype, minval=low, maxval=high)


def resolve_dtype(name: str):
    """'float32' or 'float64' -> the numpy dtype (float64 needs jax_enable_x64)."""
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {name!r}")
    if name == "float64" and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise ValueError("dtype='float64' needs 64-bit JAX: jax.config.update('jax_enable_x64', True) "
                         "or `with jax.enable_x64(True):`")
    return jnp.dtype(name)
