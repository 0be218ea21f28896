"""Exact, vmappable online learners: the CCN family (exact RTRL) and T-BPTT, with TD(lambda).

    from learners import ccn, tbptt
    cfg   = ccn.Config(n_inputs=12, total_columns=20, columns_per_stage=4, steps_per_stage=10_000_000)
    hyper = ccn.Hyper(step_size=0.01, lam=0.99, normalization_rate=0.99999, std_cap=0.01)
    state = ccn.init(cfg, hyper, key)
    state, prediction = ccn.step(cfg, hyper, state, observation, cumulant, gamma)
    ccn.cost(cfg)   # Cost(params, learning_params, flops_per_step, paper_ops_per_step)

Learners know nothing of Ray, files or W&B.
"""

import os

# XLA:CPU copies every loop-carried buffer a scan body updates in place (the learners' state)
# unless copy insertion uses region analysis; with it the copies vanish (docs/benchmarks.md).
# It only takes effect if set before JAX starts its CPU backend; an explicit setting wins.
_REGION_ANALYSIS = "--xla_cpu_copy_insertion_use_region_analysis"
if _REGION_ANALYSIS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_REGION_ANALYSIS}=true").strip()

from learners import ccn, common, compute, lru, rtu, runner, snap1, tbptt, uoro  # noqa: E402

__all__ = ["ccn", "tbptt", "rtu", "lru", "snap1", "uoro", "common", "compute", "runner"]
