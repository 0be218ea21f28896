"""SnAp-1 on the dense LSTM against its specification (ALGORITHMS.md section 9), and the learner
properties every learner shares (the `check_*` helpers are reused by tests/test_uoro.py).

The reference is written here from the definition: the full influence matrix of the state
s = (h, c), J_t = D_t J_{t-1} + I_t, with D_t and I_t the dense Jacobians of one cell step
(jax.jacobian of test_tbptt's reference cell), masked every step to SnAp-1's pattern (a
parameter of unit u keeps its influence on h_u and c_u only), driving a plain-numpy TD(lambda)
and RMSProp learner.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_learners import cyclic_stream, xla_flops
from test_tbptt import reference_cell

from learners import runner, snap1, tbptt


def run(module, cfg, hyper, state, observations, cumulants, gammas):
    """Step a learner one jitted step at a time; (final state, predictions [T])."""
    step = jax.jit(lambda s, x, cu, g: module.step(cfg, hyper, s, x, cu, g))
    predictions = []
    for x, cu, g in zip(observations, cumulants, gammas, strict=True):
        state, prediction = step(state, x, cu, g)
        predictions.append(float(prediction))
    return state, np.array(predictions)


def randomized(state, key, scale=0.8):
    """Larger LSTM weights and a non-zero head, so every influence term matters."""
    k1, k2 = jax.random.split(key)
    weights = jax.random.uniform(k1, state.params.weights.shape, state.params.weights.dtype, -scale, scale)
    w = jax.random.uniform(k2, state.params.w.shape, state.params.w.dtype, -scale, scale)
    return state._replace(params=snap1.Params(weights, w))


def masked_influence_learner(dense, observations, cumulants, gammas, alpha, lam, mask=True):
    """TD(lambda) + RMSProp driven by the dense influence matrix J [2H, |theta|], masked or not.

    dense = (W, U, b, w). Returns (predictions [T], (W, U, b, w), J)."""
    W, U, b, w = (np.array(p, dtype=float) for p in dense)
    hidden, d = w.shape[0], W.shape[1]
    sizes = (W.size, U.size, b.size)

    def unflatten(theta):
        W_, U_, b_ = jnp.split(theta, np.cumsum(sizes)[:2])
        return tbptt.Params(W_.reshape(4 * hidden, d), U_.reshape(4 * hidden, hidden), b_, None)

    def transition(s, theta, x):  # F(s_{t-1}, theta, x_t) = s_t, s = [h | c]
        h, c = reference_cell(unflatten(theta), x, s[:hidden], s[hidden:])
        return jnp.concatenate([h, c])

    jacobians = jax.jit(jax.jacobian(transition, argnums=(0, 1)))
    # unit of each parameter (row r = q H + u of W, U, b) and of each state entry
    param_unit = np.concatenate([np.repeat(np.arange(4 * hidden) % hidden, n) for n in (d, hidden, 1)])
    state_unit = np.tile(np.arange(hidden), 2)
    pattern = (state_unit[:, None] == param_unit[None, :]) if mask else np.ones((2 * hidden, param_unit.size), bool)

    theta = np.concatenate([W.ravel(), U.ravel(), b])
    J = np.zeros((2 * hidden, theta.size))
    s, old = np.zeros(2 * hidden), 0.0
    e_theta, e_w = np.zeros_like(theta), np.zeros_like(w)
    nu_theta, nu_w = np.ones_like(theta), np.ones_like(w)
    predictions = []
    for x, cumulant, gamma in zip(observations, cumulants, gammas, strict=True):
        e_theta = gamma * lam * e_theta + w @ J[:hidden]  # dV(S_t)/dtheta = w . dh_t/dtheta
        e_w = gamma * lam * e_w + s[:hidden]
        D, I = (np.asarray(a) for a in jacobians(s, theta, x))  # noqa: E741 (the paper's I_t)
        J = np.where(pattern, D @ J + I, 0.0)
        s = np.asarray(transition(s, theta, x))
        prediction = w @ s[:hidden]
        delta = cumulant + gamma * prediction - old
        for value, e, nu in ((theta, e_theta, nu_theta), (w, e_w, nu_w)):
            nu[:] = 0.9999 * nu + (1 - 0.9999) * (delta * e) ** 2
            value += alpha * delta * e / (np.sqrt(nu) + 1e-8)
        old = prediction
        predictions.append(prediction)
    W, U, b = (np.asarray(a) for a in unflatten(theta)[:3])
    return np.array(predictions), (W, U, b, w), J


def test_snap1_equals_naive_masked_influence_matrix_float64(x64):
    cfg = snap1.Config(n_inputs=3, hidden=4, dtype="float64")
    hyper = snap1.Hyper(step_size=0.02, lam=0.8)
    state = randomized(snap1.init(cfg, hyper, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    steps = 40
    observations, cumulants = rng.normal(size=(steps, 3)), rng.normal(size=steps)
    gammas = np.full(steps, 0.9)
    final, predictions = run(snap1, cfg, hyper, state, observations, cumulants, gammas)

    dense = (*snap1.to_dense(cfg, state.params.weights), state.params.w)
    expected, (W, U, b, w), J = masked_influence_learner(dense, observations, cumulants, gammas, 0.02, 0.8)
    np.testing.assert_allclose(predictions, expected, rtol=1e-10, atol=1e-12)
    for name, got, want in zip("WUbw", (*snap1.to_dense(cfg, final.params.weights), final.params.w), (W, U, b, w),
                               strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
    # the traces are the kept entries of J: dh_u/dtheta for each parameter of unit u
    hidden, d = 4, 3
    unit = np.arange(4 * hidden) % hidden
    sizes = np.cumsum([4 * hidden * d, 4 * hidden * hidden])
    for rows, traces in ((slice(None, hidden), final.trace_h), (slice(hidden, None), final.trace_c)):
        J_W, J_U, J_b = np.split(J[rows], sizes, axis=1)
        want = (J_W.reshape(hidden, 4 * hidden, d)[unit, np.arange(4 * hidden)],
                J_U.reshape(hidden, 4 * hidden, hidden)[unit, np.arange(4 * hidden)],
                J_b[unit, np.arange(4 * hidden)])
        for got, w_ in zip(snap1.to_dense(cfg, traces), want, strict=True):
            np.testing.assert_allclose(got, w_, rtol=1e-10, atol=1e-12)
    # not vacuous: the mask changes the learner (full RTRL learns differently) and parameters moved
    full, _, _ = masked_influence_learner(dense, observations, cumulants, gammas, 0.02, 0.8, mask=False)
    assert np.abs(full - expected).max() > 1e-3
    assert np.abs(W - dense[0]).max() > 1e-3


def test_to_dense_layout_reproduces_the_tbptt_cell(x64):
    cfg = snap1.Config(n_inputs=3, hidden=5, dtype="float64")
    state = randomized(snap1.init(cfg, snap1.Hyper(), jax.random.PRNGKey(2)), jax.random.PRNGKey(3))
    x, h, c = (jnp.asarray(np.random.default_rng(1).normal(size=n)) for n in (3, 5, 5))
    from learners import ccn

    got_h, got_c, _ = ccn.column_forward(state.params.weights, snap1.pack_inputs(x, h), c)
    W, U, b = snap1.to_dense(cfg, state.params.weights)
    want_h, want_c, _ = tbptt.cell(tbptt.Params(W, U, b, state.params.w), x, h, c)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-13)
    np.testing.assert_allclose(got_c, want_c, rtol=1e-13)


# --------------------------------------------------------------------------- shared learner checks
def check_batch_equals_separate_runs(module, cfg, make_hyper):
    """A vmapped batch of 8 (BatchRunner) equals 8 separate runs (float32, 1e-6)."""
    steps = cyclic_stream(120)
    step_sizes = [0.001, 0.003, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2]
    hypers = runner.stack_hypers(module.Hyper, [make_hyper(a)._asdict() for a in step_sizes])
    keys = jax.random.split(jax.random.PRNGKey(7), 8)
    batch = runner.BatchRunner(module, cfg)
    _, batched = batch.advance(hypers, batch.init(hypers, keys), steps)  # [8, T]
    single = jax.jit(lambda hyper, carry: runner.scan_arrays(module, cfg, hyper, carry, steps))
    for b, alpha in enumerate(step_sizes):
        hyper = make_hyper(alpha)
        _, predictions = single(hyper, runner.init_carry(module, cfg, hyper, keys[b]))
        np.testing.assert_allclose(batched[b], predictions, rtol=1e-6, atol=1e-6)
    assert len({float(p[-1]) for p in batched}) == 8  # the runs really differ


def check_learns(module, cfg, hyper, steps=3000):
    """On the cyclic stream the windowed return error halves within a few thousand steps."""
    stream = cyclic_stream(steps)
    carry = runner.init_carry(module, cfg, hyper, jax.random.PRNGKey(0))
    _, predictions = jax.jit(lambda c: runner.scan_arrays(module, cfg, hyper, c, stream))(carry)
    windows = ((np.asarray(predictions) - np.asarray(stream.true_return)) ** 2).reshape(-1, 500).mean(axis=1)
    assert np.isfinite(windows).all() and windows[-1] < 0.5 * windows[0], windows


def check_from_shape(module, name):
    cfg = module.Config.from_shape("8", 12)
    assert (cfg.n_inputs, cfg.hidden, cfg.dtype, cfg.shape) == (12, 8, "float32", "8")
    assert module.Config.from_shape(" 3 ", 5, dtype="float64") == module.Config(5, 3, "float64")
    assert hash(cfg) == hash(module.Config(12, 8))  # hashable: it selects the compiled program
    for bad in ("", "0", "-2", "8:4", "a", "8.0", "1e3"):
        with pytest.raises(ValueError, match=f"{name} hidden units"):
            module.Config.from_shape(bad, 12)
    with pytest.raises(ValueError, match="unknown setting"):
        module.Config.from_shape("8", 12, variant="stale")
    with pytest.raises(ValueError, match="dtype"):
        module.Config.from_shape("8", 12, dtype="float16")
    with pytest.raises(ValueError, match="n_inputs"):
        module.Config.from_shape("8", 0)


def test_snap1_vmapped_batch_of_8_equals_8_separate_runs():
    check_batch_equals_separate_runs(snap1, snap1.Config(6, 4), lambda a: snap1.Hyper(a, 0.9))


@pytest.mark.parametrize("n_inputs,hidden", [(12, 8), (40, 3)])
def test_snap1_analytic_flops_within_10_percent_of_xla_cost_analysis(n_inputs, hidden):
    cfg = snap1.Config(n_inputs, hidden)
    analytic, measured = snap1.cost(cfg).flops_per_step, xla_flops(snap1, cfg, snap1.Hyper())
    assert abs(analytic - measured) <= 0.10 * measured, (analytic, measured)


def test_snap1_cost_counts_and_paper_ops():
    cost = snap1.cost(snap1.Config(12, 8))
    assert cost.params == cost.learning_params == tbptt.paper_params(12, 8) == 4 * 8 * 20 + 32 + 8
    assert cost.paper_ops_per_step == cost.params + 4 * (cost.params - 8)  # forward + RTRL on LSTM params
    assert abs(cost.flops_per_step - 18_500) <= 0.05 * 18_500  # the benchmark's shape sits at the budget


def test_snap1_windowed_return_error_halves_within_a_few_thousand_steps():
    check_learns(snap1, snap1.Config(6, 4), snap1.Hyper(0.01, 0.9))


def test_snap1_config_from_shape_parses_and_rejects():
    check_from_shape(snap1, "snap1")
