"""T-BPTT against its specification (ALGORITHMS.md section 6, 8b), in float64.

References are written here from the equations: an LSTM cell in numpy/jnp, jax.grad of an
unrolled window, and a plain-numpy learner for the `stale` variant's own definition.
"""

import jax
import jax.numpy as jnp
import numpy as np

from learners import tbptt


def sigmoid(a):
    return 1.0 / (1.0 + jnp.exp(-a))


def reference_cell(params, x, h, c):
    """Dense LSTM step with gate blocks (i, f, g, o) of H rows."""
    hidden = h.shape[0]
    a = params.W @ x + params.U @ h + params.b
    i, f, g, o = (a[q * hidden : (q + 1) * hidden] for q in range(4))
    c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
    return sigmoid(o) * jnp.tanh(c), c


def reference_value(params, inputs, h0, c0):
    """V = w . h after running `inputs` [T, d] from (h0, c0)."""
    h, c = h0, c0
    for x in inputs:
        h, c = reference_cell(params, x, h, c)
    return jnp.dot(params.w, h)


def randomized(state, key, scale=0.8):
    """Larger weights and a non-zero head, so gradients through the window are not trivial."""
    keys = jax.random.split(key, 4)
    params = tbptt.Params(
        *(jax.random.uniform(kk, p.shape, p.dtype, -scale, scale) for kk, p in zip(keys, state.params, strict=True))
    )
    return state._replace(params=params)


def run(cfg, hyper, state, observations, cumulants, gammas):
    step = jax.jit(lambda s, x, cu, g: tbptt.step(cfg, hyper, s, x, cu, g))
    predictions = []
    for x, cu, g in zip(observations, cumulants, gammas, strict=True):
        state, prediction = step(state, x, cu, g)
        predictions.append(float(prediction))
    return state, np.array(predictions)


def test_recompute_gradient_equals_jax_grad_of_windowed_prediction(x64):
    cfg = tbptt.Config(n_inputs=3, truncation=4, hidden=3, dtype="float64")
    hyper = tbptt.Hyper(step_size=0.05, lam=0.9)
    initial = randomized(tbptt.init(cfg, hyper, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    state = initial
    rng = np.random.default_rng(0)
    steps = 15
    observations = rng.normal(size=(steps + 1, 3))
    state, _ = run(cfg, hyper, state, observations[:steps], rng.normal(size=steps), np.full(steps, 0.9))
    before = state
    # gamma = 0 on the next step: the eligibility becomes exactly grad V(S_t) of the window.
    after, _ = run(cfg, hyper, before, observations[steps:], np.zeros(1), np.zeros(1))
    window = before.window
    expected = jax.grad(reference_value)(before.params, window.inputs, window.start_h, window.start_c)
    for got, want in zip(after.eligibility, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    assert not np.allclose(before.params.W, initial.params.W)  # parameters moved: a real window rerun


def test_truncation_at_least_history_with_step_size_zero_is_full_bptt(x64):
    for variant in tbptt.VARIANTS:
        cfg = tbptt.Config(n_inputs=3, truncation=30, hidden=4, variant=variant, dtype="float64")
        hyper = tbptt.Hyper(step_size=0.0, lam=0.9)
        state = randomized(tbptt.init(cfg, hyper, jax.random.PRNGKey(2)), jax.random.PRNGKey(3))
        rng = np.random.default_rng(1)
        steps = 21
        observations = rng.normal(size=(steps, 3))
        gammas = np.full(steps, 0.9)
        gammas[-1] = 0.0  # the last step's eligibility is exactly grad V(S_{T-2})
        final, _ = run(cfg, hyper, state, observations, rng.normal(size=steps), gammas)
        zeros = jnp.zeros(4)
        expected = jax.grad(reference_value)(state.params, observations[:-1], zeros, zeros)
        for got, want in zip(final.eligibility, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13, err_msg=variant)
        assert np.abs(expected.U).max() > 1e-3  # gradients reach far back: not vacuous


def numpy_stale_learner(params, observations, cumulants, gammas, k, alpha, lam):
    """The `stale` variant by its definition: backprop through the activations stored when each
    input was consumed (older parameters), with the current U and w; TD(lambda) + RMSProp."""
    W, U, b, w = (np.array(p, dtype=float) for p in params)
    hidden = w.shape[0]
    names = ("W", "U", "b", "w")
    theta = dict(zip(names, (W, U, b, w), strict=True))
    e = {n: np.zeros_like(v) for n, v in theta.items()}
    s = {n: np.ones_like(v) for n, v in theta.items()}
    records = []  # (x, h_prev, c_prev, (i, f, g, o), c), oldest first, at most k
    h, c, old = np.zeros(hidden), np.zeros(hidden), 0.0
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    predictions = []
    for x, cumulant, gamma in zip(observations, cumulants, gammas, strict=True):
        grad = {n: np.zeros_like(v) for n, v in theta.items()}
        grad["w"] = h.copy()
        dh, dc_next = theta["w"].copy(), np.zeros(hidden)
        for x_j, h_prev, c_prev, (i, f, g, o), c_j in reversed(records):
            dc = dh * o * (1 - np.tanh(c_j) ** 2) + dc_next
            da = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g**2),
                                 dh * np.tanh(c_j) * o * (1 - o)])
            grad["W"] += np.outer(da, x_j)
            grad["U"] += np.outer(da, h_prev)
            grad["b"] += da
            dh, dc_next = theta["U"].T @ da, dc * f
        for n in names:
            e[n] = gamma * lam * e[n] + grad[n]
        a = theta["W"] @ x + theta["U"] @ h + theta["b"]
        a_i, a_f, a_g, a_o = np.split(a, 4)
        i, f, g, o = sig(a_i), sig(a_f), np.tanh(a_g), sig(a_o)
        c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        records = (records + [(x, h, c, (i, f, g, o), c_new)])[-k:]
        h, c = h_new, c_new
        prediction = theta["w"] @ h
        delta = cumulant + gamma * prediction - old
        for n in names:
            s[n] = 0.9999 * s[n] + (1 - 0.9999) * (delta * e[n]) ** 2
            theta[n] = theta[n] + alpha * delta * e[n] / (np.sqrt(s[n]) + 1e-8)
        old = prediction
        predictions.append(prediction)
    return np.array(predictions), theta


def test_stale_matches_its_own_definition(x64):
    cfg = tbptt.Config(n_inputs=3, truncation=4, hidden=3, variant="stale", dtype="float64")
    hyper = tbptt.Hyper(step_size=0.03, lam=0.8)
    state = randomized(tbptt.init(cfg, hyper, jax.random.PRNGKey(4)), jax.random.PRNGKey(5))
    rng = np.random.default_rng(2)
    steps = 25
    observations, cumulants = rng.normal(size=(steps, 3)), rng.normal(size=steps)
    gammas = np.full(steps, 0.9)
    final, predictions = run(cfg, hyper, state, observations, cumulants, gammas)
    expected, theta = numpy_stale_learner(state.params, observations, cumulants, gammas, 4, 0.03, 0.8)
    np.testing.assert_allclose(predictions, expected, rtol=1e-10, atol=1e-12)
    for name, got in zip(("W", "U", "b", "w"), final.params, strict=True):
        np.testing.assert_allclose(got, theta[name], rtol=1e-10, atol=1e-12, err_msg=name)
    # and it is a different rule from `recompute` once parameters move
    recompute, _ = run(tbptt.Config(3, 4, 3, "recompute", "float64"), hyper, state._replace(
        window=tbptt.init(tbptt.Config(3, 4, 3, "recompute", "float64"), hyper, jax.random.PRNGKey(4)).window),
        observations, cumulants, gammas)
    assert not np.allclose(recompute.params.U, final.params.U, rtol=1e-6)


def test_config_parsing_and_validation():
    cfg = tbptt.Config.from_shape("10:5", 12)
    assert (cfg.truncation, cfg.hidden, cfg.variant, cfg.shape) == (10, 5, "recompute", "10:5")
    for bad in ("10", "a:5", "10:5:3"):
        try:
            tbptt.Config.from_shape(bad, 12)
        except ValueError as error:
            assert "truncation:hidden" in str(error)
        else:
            raise AssertionError(f"{bad!r} was accepted")
    try:
        tbptt.Config(12, 10, 5, variant="fast")
    except ValueError as error:
        assert "recompute" in str(error)
    else:
        raise AssertionError("unknown variant accepted")


def test_update_after_a_quiet_stretch_moves_every_group_by_about_100_alpha(x64):
    """The amplifier of the short-truncation bursts (docs/learners.md, T-BPTT): RMSProp's second
    moment s decays towards the small (delta e)^2 of the predict-0 regime, so one large TD error
    moves every parameter group, head included, by ~alpha / sqrt(1 - beta) = 100 alpha in one step
    (the authors' rule: beta 0.9999, s_0 = 1, no clipping). From a fresh s = 1 the same step is small."""
    cfg = tbptt.Config(n_inputs=3, truncation=3, hidden=4, dtype="float64")
    alpha = 1e-3
    hyper = tbptt.Hyper(step_size=alpha, lam=0.99)
    step = jax.jit(lambda s, x, cu: tbptt.step(cfg, hyper, s, x, cu, 0.9)[0])
    state = randomized(tbptt.init(cfg, hyper, jax.random.PRNGKey(6)), jax.random.PRNGKey(7))
    rng = np.random.default_rng(3)
    for x in rng.normal(size=(6, 3)):
        state = step(state, x, 0.0)
    cap = alpha / np.sqrt(1 - 0.9999)
    quiet = state._replace(rms=state.rms._replace(nu=jax.tree.map(lambda v: jnp.full_like(v, 1e-12), state.rms.nu)))
    x = rng.normal(size=3)  # then a US (cumulant 2) the predict-0 learner did not expect
    for start, low, high in ((quiet, 0.9 * cap, cap * (1 + 1e-9)), (state, 0.0, 0.2 * cap)):
        after = step(start, x, 2.0)
        for name, new, old in zip(("W", "U", "b", "w"), after.params, start.params, strict=True):
            moved = float(np.abs(np.asarray(new) - np.asarray(old)).max())
            assert low <= moved <= high, (name, moved, cap)


def test_recompute_state_is_one_recurrent_trajectory(x64):
    """After learning has moved the parameters, `recompute` must still run ONE LSTM: with step size 0
    from then on, its predictions are a plain LSTM run from the rerun window's state. (Advancing
    s_{t-k} to the state stored when x_{t-k+1} was consumed instead makes k + 1 interleaved chains,
    h_{t+1} = F^{k+1}(h_{t-k}), that never see each other's updates; on trace patterning they fell
    into a period-(k + 1) cycle and the head diverged: docs/learners.md, T-BPTT.)"""
    cfg = tbptt.Config(n_inputs=3, truncation=2, hidden=3, dtype="float64")
    state = randomized(tbptt.init(cfg, tbptt.Hyper(0.05), jax.random.PRNGKey(8)), jax.random.PRNGKey(9))
    rng = np.random.default_rng(4)
    observations = rng.normal(size=(20, 3))
    state, _ = run(cfg, tbptt.Hyper(0.05, 0.9), state, observations[:12], rng.normal(size=12), np.full(12, 0.9))
    h, c = state.window.start_h, state.window.start_c
    for x in state.window.inputs:  # the rerun: the state the learner continues from
        h, c = reference_cell(state.params, x, h, c)
    expected = []
    for x in observations[12:]:
        h, c = reference_cell(state.params, x, h, c)
        expected.append(float(jnp.dot(state.params.w, h)))
    _, predictions = run(cfg, tbptt.Hyper(0.0, 0.9), state, observations[12:], np.zeros(8), np.full(8, 0.9))
    np.testing.assert_allclose(predictions, expected, rtol=1e-10, atol=1e-12)
