"""What a sweep would cost, extrapolated from the throughput a finished sweep measured.

    python benchmarks/sweep_cost.py --results RESULTS --measured SWEEP [--measured SWEEP ...] \
        sweeps/camera-ready-trace-patterning.toml [more specs]

Throughput is read from the measured sweeps' `runs` table: per learner shape (learner kind and
its cost-relevant shape: columns and columns per stage, or truncation and hidden units; stage
length does not change the cost per step) and observation size, learner-steps per second of one
actor = sum(runs x steps) / sum(batch wall seconds) over its batches (each batch ran on one
actor: one CPU core here, compilation included). The target spec's runs are then costed at those
rates: core-hours = its learner-steps / rate. Shapes the measured sweeps did not run are listed.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import cost  # noqa: E402
from orchestrator.cost import label, shape_key  # noqa: E402


def measured_rates(results: str, sweeps: list[str]) -> dict[tuple, dict]:
    """Per learner shape, the measured sweeps' throughput (orchestrator.cost, which `ccn plan` uses too)."""
    from orchestrator.results import ResultsStore

    for sweep in sweeps:
        if ResultsStore(results, sweep).dataset("runs") is None:
            raise SystemExit(f"sweep_cost: no results for sweep {sweep!r} under {results}")
    return cost.measured_rates(results, sweeps)


def _hours(hours: float) -> str:
    return f"{hours:,.1f}" if hours < 10 else f"{hours:,.0f}"


def main(argv: list[str] | None = None) -> int:
    from orchestrator.spec import load_spec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", help="sweep specs to cost")
    parser.add_argument("--results", required=True, help="results root holding the measured sweeps")
    parser.add_argument("--measured", action="append", required=True, help="a finished sweep to take rates from")
    arguments = parser.parse_args(argv)

    rates = measured_rates(arguments.results, arguments.measured)
    print("measured throughput per actor (one CPU core), compilation included:\n")
    print("| learner shape | batches | learner-steps | learner-steps/s per actor | device |")
    print("|---|---|---|---|---|")
    for key, rate in sorted(rates.items()):
        print(f"| {label(key)} | {len(rate['batches'])} | {rate['learner_steps'] / 1e6:,.0f}M | "
              f"{rate['rate']:,.0f} | {', '.join(sorted(rate['device']))} |")
    for spec in arguments.specs:
        sweep = load_spec(spec)
        steps: dict[tuple, int] = defaultdict(int)
        counts: dict[tuple, int] = defaultdict(int)
        for run in sweep.runs:
            key = shape_key(run.learner, run.config_dict, run.task.n_inputs)
            steps[key] += run.steps
            counts[key] += 1
        print(f"\n{spec}: {len(sweep.runs):,} runs, {sum(steps.values()) / 1e9:,.1f}G learner-steps\n")
        print("| learner shape | runs | learner-steps | core-hours at the measured rate |")
        print("|---|---|---|---|")
        total, missing = 0.0, []
        for key in sorted(steps):
            if key not in rates:
                missing.append(label(key))
                print(f"| {label(key)} | {counts[key]:,} | {steps[key] / 1e9:,.2f}G | (not measured) |")
                continue
            hours = steps[key] / rates[key]["rate"] / 3600
            total += hours
            print(f"| {label(key)} | {counts[key]:,} | {steps[key] / 1e9:,.2f}G | {_hours(hours)} |")
        print(f"| **total** | {len(sweep.runs):,} | {sum(steps.values()) / 1e9:,.1f}G | **{_hours(total)}** |")
        if missing:
            print(f"\nnot measured (not in the total): {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
