"""Compute accounting shared by the learners, compute matching between any learners, measured costs.

Every learner's `cost(cfg)` returns a `Cost`; comparisons at equal compute use these
analytic numbers, never wall-clock time (ALGORITHMS.md section 7, docs/compute.md).
"""

from __future__ import annotations

from typing import Literal, NamedTuple


class Cost(NamedTuple):
    """Per-learner compute, computable without running it.

    params              every parameter of the learner
    learning_params     parameters updated per step (in the most expensive stage)
    flops_per_step      analytic floating-point operations of one full step
    paper_ops_per_step  the authors' budget rule (ALGORITHMS.md section 7)
    """

    params: int
    learning_params: int
    flops_per_step: int
    paper_ops_per_step: int


Measure = Literal["flops", "paper_ops"]


def budget_of(cost: Cost, measure: Measure) -> int:
    """The per-step budget of `cost` under `measure` ("flops" or "paper_ops")."""
    if measure == "flops":
        return cost.flops_per_step
    if measure == "paper_ops":
        return cost.paper_ops_per_step
    raise ValueError(f"compute measure must be 'flops' or 'paper_ops', got {measure!r}")


def matching_shapes(
    learner,
    budget: float,
    n_inputs: int,
    tolerance: float,
    measure: Measure = "flops",
    *,
    shapes=None,
    **static,
) -> list:
    """The configs of `learner` (any learner of the protocol, learners.registry) within tolerance of `budget`.

    |cost - budget| <= tolerance * budget, over `shapes` (shape strings; default: the learner's
    `candidate_shapes(n_inputs, **static)`); `static` are its static settings. Returns the Configs in
    the order searched. Raises ValueError when the learner has no candidate shapes.
    """
    from learners import registry

    if budget <= 0 or tolerance < 0:
        raise ValueError(f"budget must be > 0 and tolerance >= 0, got {budget}, {tolerance}")
    if shapes is None:
        shapes = registry.candidate_shapes(learner, n_inputs, static)
        if shapes is None:
            raise ValueError(f"{registry.title(learner, getattr(learner, '__name__', 'the learner'))} has no "
                             "candidate_shapes(n_inputs): give its shapes")
    matched = []
    for shape in shapes:
        cfg = learner.Config.from_shape(shape, n_inputs, **static)
        if abs(budget_of(registry.cost(learner, cfg), measure) - budget) <= tolerance * budget:
            matched.append(cfg)
    return matched


def matching_tbptt_shapes(
    budget: float,
    n_inputs: int,
    tolerance: float,
    measure: Measure = "flops",
    *,
    max_truncation: int = 64,
    max_hidden: int = 64,
    variant: str = "recompute",
) -> list[tuple[int, int]]:
    """Every T-BPTT (truncation, hidden) whose per-step cost is within tolerance of `budget`.

    |cost - budget| <= tolerance * budget, searched over truncation 1..max_truncation and
    hidden 1..max_hidden; sorted by truncation. A budget taken from a CCN's Cost, e.g.
    `matching_tbptt_shapes(ccn.cost(cfg).flops_per_step, 12, 0.15)`.
    """
    from learners import tbptt  # local import: tbptt imports this module

    shapes = tbptt.candidate_shapes(n_inputs, max_truncation=max_truncation, max_hidden=max_hidden)
    return [(cfg.truncation, cfg.hidden)
            for cfg in matching_shapes(tbptt, budget, n_inputs, tolerance, measure, shapes=shapes, variant=variant)]


# --------------------------------------------------------------------------- measured cost
_MEASURED: dict[tuple, Cost] = {}


def measured_cost(learner, cfg) -> Cost:
    """The Cost of a learner without an analytic `cost`: flops from XLA's cost analysis of its jitted
    step (compiled for this config, not run), params counted from its initial state's `params` (or
    every float leaf of the state). paper_ops_per_step, which only an author's rule defines, is the
    flops. Cached per (learner, config); results mark it cost_source = "measured"."""
    key = (getattr(learner, "__name__", id(learner)), cfg)
    if key in _MEASURED:
        return _MEASURED[key]
    import contextlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    dtype = getattr(cfg, "dtype", "float32")
    context = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    with context:
        defaults = learner.Hyper._field_defaults
        hyper = learner.Hyper(**{name: jnp.asarray(defaults.get(name, 0.01), dtype) for name in learner.Hyper._fields})
        state = jax.eval_shape(lambda: learner.init(cfg, hyper, jax.random.PRNGKey(0)))
        scalar = jax.ShapeDtypeStruct((), jnp.dtype(dtype))
        observation = jax.ShapeDtypeStruct((cfg.n_inputs,), jnp.dtype(dtype))
        compiled = jax.jit(lambda h, s, o, c, g: learner.step(cfg, h, s, o, c, g)).lower(
            hyper, state, observation, scalar, scalar).compile()
        analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    flops = int(round(float((analysis or {}).get("flops", 0.0))))
    counted = getattr(state, "params", state)
    params = int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(counted)
                     if jnp.issubdtype(leaf.dtype, jnp.inexact)))
    result = Cost(params=params, learning_params=params, flops_per_step=flops, paper_ops_per_step=flops)
    _MEASURED[key] = result
    return result
