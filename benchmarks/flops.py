"""Analytic flops_per_step against XLA's cost analysis of the jitted step, and paper ops.

    .venv/bin/python benchmarks/flops.py

XLA's count is flops + transcendentals of one compiled `step`, with T-BPTT's window loops
unrolled (`unroll_window=True`) so that XLA counts every slot rather than a loop body once.
For multi-stage CCNs XLA counts the masked padding that the hardware executes; the analytic count uses the real sizes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from learners import ccn, tbptt  # noqa: E402


def xla_flops(module, cfg, hyper) -> float:
    if module is tbptt:  # XLA counts a loop body once: count an unrolled window
        cfg = dataclasses.replace(cfg, unroll_window=True)
    state = module.init(cfg, hyper, jax.random.PRNGKey(0))
    fn = jax.jit(lambda s, x: module.step(cfg, hyper, s, x, 0.0, 0.9))
    analysis = fn.lower(state, jnp.zeros(cfg.n_inputs)).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return analysis.get("flops", 0.0) + analysis.get("transcendentals", 0.0)


def main() -> None:
    ccn_hyper, tbptt_hyper = ccn.Hyper(0.01, 0.9, 0.999, 0.01), tbptt.Hyper(1e-3, 0.9)
    rows = [(ccn, ccn.Config.from_shape(s, d), ccn_hyper)
            for s, d in [("1:1:inf", 12), ("7:7:inf", 12), ("50:50:inf", 100), ("20:4:10000000", 12),
                         ("10:1:5000000", 12), ("6:6:inf", 275), ("30:1:1000000", 275)]]
    rows += [(tbptt, tbptt.Config.from_shape(s, 12, v), tbptt_hyper)
             for s in ["2:13", "3:10", "5:8", "8:5", "10:5", "15:4", "20:3", "30:2"] for v in tbptt.VARIANTS]
    print("| learner | shape | inputs | params | paper ops/step | analytic flops/step | XLA flops/step "
          "| analytic / XLA |")
    print("|---|---|---|---|---|---|---|---|")
    for module, cfg, hyper in rows:
        cost = module.cost(cfg)
        measured = xla_flops(module, cfg, hyper)
        name = "CCN family" if module is ccn else f"T-BPTT {cfg.variant}"
        print(f"| {name} | {cfg.shape} | {cfg.n_inputs} | {cost.params} | {cost.paper_ops_per_step:,} | "
              f"{cost.flops_per_step:,} | {measured:,.0f} | {cost.flops_per_step / measured:.2f} |", flush=True)


if __name__ == "__main__":
    main()
