"""Compute accounting shared by the learners, and compute matching of T-BPTT shapes.

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

    if budget <= 0 or tolerance < 0:
        raise ValueError(f"budget must be > 0 and tolerance >= 0, got {budget}, {tolerance}")
    shapes = []
    for truncation in range(1, max_truncation + 1):
        for hidden in range(1, max_hidden + 1):
            cost = tbptt.cost(tbptt.Config(n_inputs, truncation, hidden, variant))
            if abs(budget_of(cost, measure) - budget) <= tolerance * budget:
                shapes.append((truncation, hidden))
    return shapes
