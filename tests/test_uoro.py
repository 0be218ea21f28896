"""UORO on the dense LSTM against its specification (ALGORITHMS.md section 9).

Unbiasedness: with the parameters frozen (step size 0), the gradient estimate (w . A) B of
V(S_t), averaged over many draws of the random signs (a vmap over the state's key), converges
to the exact RTRL gradient, here jax.grad of the unrolled prediction (test_tbptt's reference
LSTM), at the Monte Carlo rate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_learners import xla_flops
from test_snap1 import check_batch_equals_separate_runs, check_from_shape, check_learns
from test_tbptt import reference_value

from learners import tbptt, uoro


def flat(params):
    return jnp.concatenate([params.W.ravel(), params.U.ravel(), params.b.ravel()])


def test_uoro_mean_over_noise_draws_converges_to_exact_rtrl_gradient(x64):
    cfg, hyper = uoro.Config(3, 3, "float64"), uoro.Hyper(step_size=0.0, lam=0.9)
    state = uoro.init(cfg, hyper, jax.random.PRNGKey(0))
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    params = tbptt.Params(*(jax.random.uniform(k, p.shape, p.dtype, -0.6, 0.6) for k, p in zip(keys, state.params,
                                                                                                  strict=True)))
    state = state._replace(params=params)
    rng = np.random.default_rng(0)
    steps = 12
    observations, cumulants = jnp.asarray(rng.normal(size=(steps, 3))), jnp.asarray(rng.normal(size=steps))
    gammas = jnp.full(steps, 0.9).at[-1].set(0.0)  # the last step's eligibility is exactly the estimate

    def estimate(key):  # one draw of the signs: the estimate of grad V(S_{T-1})
        def body(s, xs):
            return uoro.step(cfg, hyper, s, *xs)[0], None

        final, _ = jax.lax.scan(body, state._replace(key=key), (observations, cumulants, gammas))
        return flat(final.eligibility)

    exact = flat(jax.grad(reference_value)(params, observations[:-1], jnp.zeros(3), jnp.zeros(3)))
    draws = jax.jit(jax.vmap(estimate))
    total, count, errors = 0.0, 0, {}
    for chunk in range(8):
        batch = np.asarray(draws(jax.random.split(jax.random.PRNGKey(100 + chunk), 8192)))
        if chunk == 0:
            for n in (16, 256, 4096):
                errors[n] = np.linalg.norm(batch[:n].mean(axis=0) - exact) / np.linalg.norm(exact)
            single = np.linalg.norm(batch - exact, axis=1).mean() / np.linalg.norm(exact)
        total, count = total + batch.sum(axis=0), count + len(batch)
    errors[count] = np.linalg.norm(total / count - exact) / np.linalg.norm(exact)
    assert single > 1.0  # one draw is a noisy estimate (not an exact method in disguise)
    assert errors[16] > errors[256] > errors[4096] > errors[count], errors  # shrinking with the draws
    assert errors[count] < 0.03, errors  # ~1/sqrt(65536) of the per-draw spread
    assert np.abs(exact).max() > 1e-2  # gradients through the history are not vacuous


def test_uoro_head_gradient_is_exact_and_state_follows_the_tbptt_cell(x64):
    cfg, hyper = uoro.Config(3, 4, "float64"), uoro.Hyper(step_size=0.0, lam=0.9)
    state = uoro.init(cfg, hyper, jax.random.PRNGKey(3))
    rng = np.random.default_rng(1)
    observations = rng.normal(size=(6, 3))
    step = jax.jit(lambda s, x: uoro.step(cfg, hyper, s, x, 0.0, 0.0))
    h = c = jnp.zeros(4)
    for x in observations:
        state, _ = step(state, x)
        h, c, _ = tbptt.cell(state.params, jnp.asarray(x), h, c)
    np.testing.assert_allclose(state.h, h, rtol=1e-13)
    state, _ = step(state, observations[0])
    np.testing.assert_allclose(state.eligibility.w, h, rtol=1e-13)  # gamma = 0: e_w = h of the last pass


def test_uoro_vmapped_batch_of_8_equals_8_separate_runs():
    check_batch_equals_separate_runs(uoro, uoro.Config(6, 4), lambda a: uoro.Hyper(a, 0.9))


@pytest.mark.parametrize("n_inputs,hidden", [(12, 9), (40, 3)])
def test_uoro_analytic_flops_within_15_percent_of_xla_cost_analysis(n_inputs, hidden):
    cfg = uoro.Config(n_inputs, hidden)
    analytic, measured = uoro.cost(cfg).flops_per_step, xla_flops(uoro, cfg, uoro.Hyper())
    assert abs(analytic - measured) <= 0.15 * measured, (analytic, measured)


def test_uoro_cost_counts_and_paper_ops():
    cost = uoro.cost(uoro.Config(12, 9))
    assert cost.params == cost.learning_params == tbptt.paper_params(12, 9)
    assert cost.paper_ops_per_step == 3 * cost.params + 4 * 81
    assert abs(cost.flops_per_step - 18_500) <= 0.1 * 18_500  # the benchmark's shape sits near the budget


def test_uoro_windowed_return_error_halves_within_a_few_thousand_steps():
    check_learns(uoro, uoro.Config(6, 4), uoro.Hyper(0.01, 0.9))


def test_uoro_config_from_shape_parses_and_rejects():
    check_from_shape(uoro, "uoro")
