"""Recurrent trace units against their specification (ALGORITHMS.md section 9, RTU).

The exactness check runs in float64 against a reference written here from the equations in
complex arithmetic (lambda = exp(-exp(nu_log) + i exp(theta_log)), c = lambda c + eta (W1 x + i W2 x)),
not from the learner's real-pair code, differentiated by jax.jacrev of the unrolled predictions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ccn import ema_reference
from test_learners import cyclic_stream, xla_flops

from learners import ccn, compute, registry, rtu, runner

ACTIVATION = {"linear": lambda c: c, "tanh": jnp.tanh, "relu": lambda c: jnp.maximum(c, 0.0)}


def head_statistics(features, rate, std_cap):
    """Means and variances [T, ...] of the head's EMA after each step (updated before normalising)."""
    mean, var = np.zeros(features.shape[1:]), np.ones(features.shape[1:])
    means, variances = [], []
    for h in features:
        mean = rate * mean + (1 - rate) * h
        var = np.maximum(rate * var + (1 - rate) * (h - mean) ** 2, std_cap)
        means.append(mean)
        variances.append(var)
    return np.stack(means), np.stack(variances)


def reference_predictions(p, x_hats, activation, head_mean, head_var):
    """V_t for t = 1..T of a complex-diagonal RTU, with the head statistics held constant."""
    lam = jnp.exp(-jnp.exp(p["nu_log"]) + 1j * jnp.exp(p["theta_log"]))  # [n]
    eta = jnp.sqrt(1.0 - jnp.abs(lam) ** 2)

    def body(c, inputs):
        x_hat, mean, var = inputs
        c = lam * c + eta * (p["w"][0] @ x_hat + 1j * (p["w"][1] @ x_hat))
        h = ACTIVATION[activation](jnp.stack([c.real, c.imag]))  # [2, n]
        return c, jnp.sum(p["head_w"] * (h - mean) / jnp.sqrt(var)) + p["head_b"]

    _, values = jax.lax.scan(body, jnp.zeros_like(lam), (x_hats, head_mean, head_var))
    return values


@pytest.mark.parametrize("activation", ["linear", "tanh"])
def test_rtrl_gradient_used_at_each_step_equals_jax_grad_of_unrolled_prediction_float64(x64, activation):
    d, n, steps, rate, std_cap = 4, 3, 60, 0.9, 0.01
    cfg = rtu.Config(n_inputs=d, units=n, activation=activation, dtype="float64")
    # step size 0 keeps the parameters fixed; gamma * lambda = 0 makes each step's eligibility
    # exactly the gradient it adds, grad V(S_t) of the previous forward pass.
    hyper = rtu.Hyper(step_size=0.0, lam=0.0, normalization_rate=rate, std_cap=std_cap)
    state = rtu.init(cfg, hyper, jax.random.PRNGKey(0))
    head_w = jax.random.normal(jax.random.PRNGKey(1), (2, n), jnp.float64)
    state = state._replace(params=state.params._replace(head_w=head_w, head_b=jnp.float64(0.3)))
    rng = np.random.default_rng(0)
    observations = rng.normal(size=(steps, d)) + 0.5
    step = jax.jit(lambda s, x: rtu.step(cfg, hyper, s, x, 1.0, 0.0))
    states = []
    for x in observations:
        state, _ = step(state, x)
        states.append(state)

    p0 = states[0].params
    p = {"nu_log": p0.nu_log, "theta_log": p0.theta_log, "w": p0.input_weights, "head_w": p0.head_w,
         "head_b": p0.head_b}
    x_hats = jnp.asarray(ema_reference(observations, rate, std_cap))
    h_ref = ACTIVATION[activation](np.stack([np.asarray(s.c) for s in states]))
    head_mean, head_var = head_statistics(np.asarray(h_ref), rate, std_cap)
    values = reference_predictions(p, x_hats, activation, jnp.asarray(head_mean), jnp.asarray(head_var))
    np.testing.assert_allclose([float(s.prediction) for s in states], values, rtol=1e-12, atol=1e-13)
    jac = jax.jacrev(reference_predictions)(p, x_hats, activation, jnp.asarray(head_mean), jnp.asarray(head_var))

    for t in range(steps - 1):  # step t + 1 adds grad V(S_t)
        used = states[t + 1].eligibility
        for got, name in [(used.nu_log, "nu_log"), (used.theta_log, "theta_log"), (used.input_weights, "w"),
                          (used.head_w, "head_w"), (used.head_b, "head_b")]:
            np.testing.assert_allclose(got, jac[name][t], rtol=1e-10, atol=1e-12, err_msg=f"{name} at step {t}")
        np.testing.assert_allclose(rtu.value_gradient(cfg, states[t]).input_weights, jac["w"][t], rtol=1e-10,
                                   atol=1e-12)
    assert np.abs(jac["nu_log"][-1]).max() > 1e-3 and np.abs(jac["w"][-1]).max() > 1e-3  # not vacuous
    assert np.abs(jac["theta_log"][-1]).max() > 1e-3


def test_vmapped_batch_of_8_seeds_equals_8_separate_runs():
    cfg = rtu.Config(6, 4, "tanh")
    steps = cyclic_stream(120)
    step_sizes = [0.001, 0.003, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2]
    hypers = runner.stack_hypers(rtu.Hyper, [rtu.Hyper(a, 0.9, 0.999, 0.01)._asdict() for a in step_sizes])
    keys = jax.random.split(jax.random.PRNGKey(7), 8)
    batch = runner.BatchRunner(rtu, cfg)
    _, batched = batch.advance(hypers, batch.init(hypers, keys), steps)  # [8, T]
    single = jax.jit(lambda hyper, carry: runner.scan_arrays(rtu, cfg, hyper, carry, steps))
    init_one = jax.jit(lambda hyper, key: runner.init_carry(rtu, cfg, hyper, key))  # compiled, as in the batch
    for b, alpha in enumerate(step_sizes):
        hyper = rtu.Hyper(alpha, 0.9, 0.999, 0.01)
        _, predictions = single(hyper, init_one(hyper, keys[b]))
        np.testing.assert_allclose(batched[b], predictions, rtol=1e-6, atol=1e-6)
    assert len({float(p[-1]) for p in batched}) == 8  # the runs really differ


@pytest.mark.parametrize("cfg", [rtu.Config(12, 30, "tanh"), rtu.Config(40, 16, "relu")],
                         ids=lambda c: f"{c.units}-{c.activation}-{c.n_inputs}")
def test_analytic_flops_within_15_percent_of_xla_cost_analysis(cfg):
    analytic, measured = rtu.cost(cfg).flops_per_step, xla_flops(rtu, cfg, rtu.Hyper())
    assert abs(analytic - measured) <= 0.15 * measured, (analytic, measured)


def test_cost_counts_parameters_and_the_authors_rule():
    cost = rtu.cost(rtu.Config(12, 30))
    assert cost.params == 2 * 30 + 2 * 30 * 12 + 2 * 30 + 1
    assert cost.paper_ops_per_step == cost.params + 4 * (2 * 30 + 2 * 30 * 12)
    assert rtu.cost(rtu.Config(12, 31)).flops_per_step > cost.flops_per_step


def test_windowed_return_error_halves_within_a_few_thousand_steps():
    cfg, hyper = rtu.Config(6, 4, "linear"), rtu.Hyper(0.01, 0.9, 0.999, 0.01)
    steps = cyclic_stream(3000)
    carry = runner.init_carry(rtu, cfg, hyper, jax.random.PRNGKey(0))
    _, predictions = jax.jit(lambda c: runner.scan_arrays(rtu, cfg, hyper, c, steps))(carry)
    windows = ((np.asarray(predictions) - np.asarray(steps.true_return)) ** 2).reshape(-1, 500).mean(axis=1)
    assert windows[-1] < 0.5 * windows[0], windows


def test_config_from_shape_parses_units_and_rejects_bad_shapes():
    cfg = rtu.Config.from_shape("32", 12)
    assert (cfg.n_inputs, cfg.units, cfg.activation, cfg.shape) == (12, 32, "linear", "32")
    assert rtu.Config.from_shape(" 8 ", 5, activation="tanh", dtype="float64") == rtu.Config(5, 8, "tanh",
                                                                                             dtype="float64")
    assert hash(cfg) == hash(rtu.Config(12, 32))
    for bad in ["0", "-3", "abc", "", "2.5"]:
        with pytest.raises(ValueError, match="units must be a positive integer.*RTU units, e.g. '32'"):
            rtu.Config.from_shape(bad, 12)
    with pytest.raises(ValueError, match="must have 1 field"):
        rtu.Config.from_shape("4:5", 12)
    with pytest.raises(ValueError, match="unknown setting.*'hidden'"):
        rtu.Config.from_shape("8", 12, hidden=3)
    with pytest.raises(ValueError, match="activation must be one of"):
        rtu.Config.from_shape("8", 12, activation="sigmoid")
    with pytest.raises(ValueError, match="r_min < r_max"):
        rtu.Config(12, 8, r_min=0.9, r_max=0.5)
    assert rtu.Hyper()._asdict() == {"step_size": 1e-3, "lam": 0.99, "normalization_rate": 0.99999, "std_cap": 0.01}


def test_follows_the_learner_protocol_and_matches_the_ccn_budget():
    assert registry.protocol_problems(rtu) == []
    assert registry.shape_fields(rtu) == ("units",)
    assert rtu.check_hyper("lam", 1.5) and rtu.check_hyper("step_size", 0.0) and not rtu.check_hyper("lam", 0.9)
    budget = ccn.cost(ccn.Config(12, 20, 4, 10_000_000)).flops_per_step  # trace patterning's CCN 20:4
    matched = compute.matching_shapes(rtu, budget, 12, 0.05)
    assert "27" in [cfg.shape for cfg in matched]
    assert all(abs(rtu.cost(cfg).flops_per_step - budget) <= 0.05 * budget for cfg in matched)
