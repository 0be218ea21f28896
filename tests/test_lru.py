"""The online LRU against its specification (ALGORITHMS.md section 9, online LRU).

The exactness check runs in float64 against a reference written here from the paper's equations
in complex arithmetic (lambda = exp(-exp(nu_log) + i exp(theta_log)), h = lambda h + gamma B x),
not from the learner's real-pair traces, differentiated by jax.jacrev of the unrolled predictions.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ccn import ema_reference
from test_learners import cyclic_stream, xla_flops
from test_rtu import ACTIVATION, head_statistics

from learners import ccn, compute, lru, registry, runner


def reference_predictions(p, x_hats, activation, head_mean, head_var):
    """V_t for t = 1..T of a one-layer LRU, with the head statistics held constant."""
    lam = jnp.exp(-jnp.exp(p["nu_log"]) + 1j * jnp.exp(p["theta_log"]))  # [n]
    b_matrix = p["b"][0] + 1j * p["b"][1]  # [n, d]

    def body(h, inputs):
        x_hat, mean, var = inputs
        h = lam * h + jnp.exp(p["gamma_log"]) * (b_matrix @ x_hat)
        out = ACTIVATION[activation](jnp.stack([h.real, h.imag]))  # [2, n]
        return h, jnp.sum(p["head_w"] * (out - mean) / jnp.sqrt(var)) + p["head_b"]

    _, values = jax.lax.scan(body, jnp.zeros_like(lam), (x_hats, head_mean, head_var))
    return values


@pytest.mark.parametrize("activation", ["linear", "tanh"])
def test_online_gradient_used_at_each_step_equals_jax_grad_of_unrolled_prediction_float64(x64, activation):
    d, n, steps, rate, std_cap = 4, 3, 60, 0.9, 0.01
    cfg = lru.Config(n_inputs=d, units=n, activation=activation, dtype="float64")
    # step size 0 keeps the parameters fixed; gamma * lambda = 0 makes each step's eligibility
    # exactly the gradient it adds, grad V(S_t) of the previous forward pass.
    hyper = lru.Hyper(step_size=0.0, lam=0.0, normalization_rate=rate, std_cap=std_cap)
    state = lru.init(cfg, hyper, jax.random.PRNGKey(0))
    head_w = jax.random.normal(jax.random.PRNGKey(1), (2, n), jnp.float64)
    gamma_log = state.params.gamma_log + 0.2  # gamma no longer tied to |lambda|: a free parameter
    state = state._replace(params=state.params._replace(head_w=head_w, head_b=jnp.float64(0.3), gamma_log=gamma_log))
    rng = np.random.default_rng(0)
    observations = rng.normal(size=(steps, d)) + 0.5
    step = jax.jit(lambda s, x: lru.step(cfg, hyper, s, x, 1.0, 0.0))
    states = []
    for x in observations:
        state, _ = step(state, x)
        states.append(state)

    p0 = states[0].params
    p = {"nu_log": p0.nu_log, "theta_log": p0.theta_log, "gamma_log": p0.gamma_log, "b": p0.input_weights,
         "head_w": p0.head_w, "head_b": p0.head_b}
    x_hats = jnp.asarray(ema_reference(observations, rate, std_cap))
    out = ACTIVATION[activation](np.stack([np.asarray(s.h) for s in states]))
    head_mean, head_var = (jnp.asarray(a) for a in head_statistics(np.asarray(out), rate, std_cap))
    values = reference_predictions(p, x_hats, activation, head_mean, head_var)
    np.testing.assert_allclose([float(s.prediction) for s in states], values, rtol=1e-12, atol=1e-13)
    jac = jax.jacrev(reference_predictions)(p, x_hats, activation, head_mean, head_var)

    for t in range(steps - 1):  # step t + 1 adds grad V(S_t)
        used = states[t + 1].eligibility
        for got, name in [(used.nu_log, "nu_log"), (used.theta_log, "theta_log"), (used.gamma_log, "gamma_log"),
                          (used.input_weights, "b"), (used.head_w, "head_w"), (used.head_b, "head_b")]:
            np.testing.assert_allclose(got, jac[name][t], rtol=1e-10, atol=1e-12, err_msg=f"{name} at step {t}")
    for name in ("nu_log", "theta_log", "gamma_log", "b"):
        assert np.abs(jac[name][-1]).max() > 1e-3, name  # not vacuous


def test_vmapped_batch_of_8_seeds_equals_8_separate_runs():
    cfg = lru.Config(6, 4, "linear")
    steps = cyclic_stream(120)
    step_sizes = [0.001, 0.003, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2]
    hypers = runner.stack_hypers(lru.Hyper, [lru.Hyper(a, 0.9, 0.999, 0.01)._asdict() for a in step_sizes])
    keys = jax.random.split(jax.random.PRNGKey(7), 8)
    batch = runner.BatchRunner(lru, cfg)
    _, batched = batch.advance(hypers, batch.init(hypers, keys), steps)  # [8, T]
    single = jax.jit(lambda hyper, carry: runner.scan_arrays(lru, cfg, hyper, carry, steps))
    init_one = jax.jit(lambda hyper, key: runner.init_carry(lru, cfg, hyper, key))  # compiled, as in the batch
    for b, alpha in enumerate(step_sizes):
        hyper = lru.Hyper(alpha, 0.9, 0.999, 0.01)
        _, predictions = single(hyper, init_one(hyper, keys[b]))
        np.testing.assert_allclose(batched[b], predictions, rtol=1e-6, atol=1e-6)
    assert len({float(p[-1]) for p in batched}) == 8  # the runs really differ


@pytest.mark.parametrize("cfg", [lru.Config(12, 30), lru.Config(40, 16, "tanh")],
                         ids=lambda c: f"{c.units}-{c.activation}-{c.n_inputs}")
def test_analytic_flops_within_15_percent_of_xla_cost_analysis(cfg):
    analytic, measured = lru.cost(cfg).flops_per_step, xla_flops(lru, cfg, lru.Hyper())
    assert abs(analytic - measured) <= 0.15 * measured, (analytic, measured)


def test_cost_counts_parameters_and_the_authors_rule():
    cost = lru.cost(lru.Config(12, 30))
    assert cost.params == 3 * 30 + 2 * 30 * 12 + 2 * 30 + 1
    assert cost.paper_ops_per_step == cost.params + 4 * (3 * 30 + 2 * 30 * 12)


def test_initial_gamma_normalises_the_eigenvalue():
    state = jax.jit(lambda key: lru.init(lru.Config(5, 64), lru.Hyper(), key))(jax.random.PRNGKey(3))
    modulus = np.exp(-np.exp(np.asarray(state.params.nu_log, np.float64)))
    np.testing.assert_allclose(np.exp(state.params.gamma_log), np.sqrt(1 - modulus**2), rtol=1e-4)
    assert modulus.min() > 0.0 and modulus.max() < 1.0
    phase = np.exp(np.asarray(state.params.theta_log))
    assert phase.min() > 0.0 and phase.max() <= 6.28


def test_windowed_return_error_halves_within_a_few_thousand_steps():
    cfg, hyper = lru.Config(6, 4, "linear"), lru.Hyper(0.01, 0.9, 0.999, 0.01)
    steps = cyclic_stream(3000)
    carry = runner.init_carry(lru, cfg, hyper, jax.random.PRNGKey(0))
    _, predictions = jax.jit(lambda c: runner.scan_arrays(lru, cfg, hyper, c, steps))(carry)
    windows = ((np.asarray(predictions) - np.asarray(steps.true_return)) ** 2).reshape(-1, 500).mean(axis=1)
    assert windows[-1] < 0.5 * windows[0], windows


def test_config_from_shape_parses_units_and_rejects_bad_shapes():
    cfg = lru.Config.from_shape("64", 12)
    assert (cfg.n_inputs, cfg.units, cfg.activation, cfg.shape) == (12, 64, "linear", "64")
    assert lru.Config.from_shape("8", 5, activation="relu", r_min=0.5) == lru.Config(5, 8, "relu", r_min=0.5)
    for bad in ["0", "-1", "units", "", "1e3"]:
        with pytest.raises(ValueError, match="units must be a positive integer.*LRU units, e.g. '32'"):
            lru.Config.from_shape(bad, 12)
    with pytest.raises(ValueError, match="must have 1 field"):
        lru.Config.from_shape("8:2", 12)
    with pytest.raises(ValueError, match="unknown setting.*'truncation'"):
        lru.Config.from_shape("8", 12, truncation=3)
    with pytest.raises(ValueError, match="dtype must be"):
        lru.Config.from_shape("8", 12, dtype="float16")
    with pytest.raises(ValueError, match="positive integer"):
        lru.Config(0, 8)


def test_follows_the_learner_protocol_and_matches_the_ccn_budget():
    assert registry.protocol_problems(lru) == []
    assert registry.shape_fields(lru) == ("units",)
    assert lru.check_hyper("lam", 1.5) and lru.check_hyper("step_size", 0.0) and not lru.check_hyper("lam", 0.9)
    budget = ccn.cost(ccn.Config(12, 20, 4, 10_000_000)).flops_per_step  # trace patterning's CCN 20:4
    matched = compute.matching_shapes(lru, budget, 12, 0.05)
    assert "27" in [cfg.shape for cfg in matched]
    assert all(abs(lru.cost(cfg).flops_per_step - budget) <= 0.05 * budget for cfg in matched)


@pytest.mark.parametrize("module", [lru], ids=["lru"])  # the RTU shares the pair helpers (learners/rtu.py)
def test_batched_step_keeps_its_largest_traces_in_place(module):
    """The compiled batch (64 runs, 27 units, 12 inputs) keeps every [B, 2, n, d] array in the default
    layout: stacking the halves of a pair made XLA:CPU carry the LRU's e_B with the pair axis
    outermost and transpose it every step (issue 14 item 6)."""
    cfg, batch = module.Config(12, 27), 64
    hypers = runner.stack_hypers(module.Hyper, [module.Hyper()._asdict()] * batch)
    batch_runner = runner.BatchRunner(module, cfg, donate=False)
    carry = batch_runner.init(hypers, jax.random.split(jax.random.PRNGKey(0), batch))
    hlo = batch_runner._advance.lower(hypers, carry, cyclic_stream(4, period=12)).compile().as_text()
    big = re.findall(r"f32\[64,2,27,12\](\{[0-9,]*\})? ([\w-]+)\(", hlo)
    assert big, "no [64, 2, 27, 12] arrays found: the test no longer looks at the traces"
    assert {layout for layout, _ in big if layout} == {"{3,2,1,0}"}, sorted(set(big))
