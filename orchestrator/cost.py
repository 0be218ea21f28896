"""What a sweep costs before it runs: learner-steps, FLOPs and estimated core-hours (`ccn plan`).

Throughput, in learner-steps per second of one actor (one CPU core), comes from one of two
sources, and the estimate says which:

* measured: the `runs` tables of the sweeps already under the results root (each batch's runs x
  steps over its wall seconds, compilation included), for every learner shape they ran on a CPU;
* benchmarks: `BENCHMARK_RATES`, the learner figures recorded in docs/benchmarks.md, for the
  shapes no sweep measured; a shape the benchmarks did not run either is priced from the
  benchmarked shape of its kind nearest in FLOPs per step, scaled by FLOPs per step.

A learner shape is the cost-relevant part of a learner: its kind and columns / columns per stage
(CCN family) or truncation / hidden units (T-BPTT), and the observation size d. Stage length
does not change the cost per step. benchmarks/sweep_cost.py prints the same extrapolation per shape.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from orchestrator.runs import Run

# Learner-steps per second of one actor on one CPU core, float32, compilation excluded: the
# "2 processes" rows of the learner tables in docs/benchmarks.md (`benchmarks/learners.py`,
# 2026-11-28 and, for the section 9 learners, 2026-11-30; batch 64, each process pinned to one
# core as the actors are), per core.
# Keys: shape_key(...). Update both together.
BENCHMARK_RATES: dict[tuple, float] = {
    ("ccn", 20, 4, 12): 607_783 / 2,
    ("ccn", 7, 7, 12): 874_099 / 2,
    ("tbptt", 10, 5, 12): 316_692 / 2,
    ("tbptt", 3, 10, 12): 368_082 / 2,
    ("ccn", 50, 50, 100): 31_362 / 2,
    # the section 9 learners (2026-11-30, a quiet machine; the tanh RTU, 443,716, shares the RTU's key)
    ("rtu", "27", None, 12): 430_914 / 2,
    ("lru", "27", None, 12): 396_616 / 2,
    ("snap1", "8", None, 12): 642_941 / 2,
    ("uoro", "9", None, 12): 479_821 / 2,
}
BENCHMARKS_SOURCE = (
    "docs/benchmarks.md learner throughput (float32, an idle core, compilation excluded: a lower bound; "
    "sweeps have measured up to 2x more, docs/results.md)"
)


def shape_key(learner: str, config: dict[str, Any], n_inputs: int) -> tuple:
    """(kind, columns, columns per stage, d) or (kind, truncation, hidden, d): what sets the cost per step.

    Any other learner kind: (kind, its shape string, None, d) (config: its run config, or a runs row
    with its `shape`)."""
    if learner == "tbptt":
        return (learner, config["truncation"], config["hidden"], n_inputs)
    if learner == "ccn":
        return (learner, config["total_columns"], config["columns_per_stage"], n_inputs)
    if config.get("shape") is not None:
        return (learner, config["shape"], None, n_inputs)
    from orchestrator.learner_kinds import learner_kind

    return (learner, learner_kind(learner).format_shape(config, n_inputs), None, n_inputs)


def label(key: tuple) -> str:
    learner, a, b, d = key
    return f"{learner} {a}:{b} (d={d})" if b is not None else f"{learner} {a} (d={d})"


def flops_per_step(key: tuple) -> int:
    """The FLOPs per step of a learner shape (its learner's cost: analytic, else measured)."""
    from orchestrator.learner_kinds import learner_kind

    learner, a, b, d = key
    if learner in ("tbptt", "ccn"):
        config = {"truncation": a, "hidden": b} if learner == "tbptt" else {"total_columns": a, "columns_per_stage": b}
        return learner_kind(learner).cost(config, d).flops_per_step
    kind = learner_kind(learner)
    return kind.cost(kind.parse_shape(a, d), d).flops_per_step


def measured_rates(results: str, sweeps: Iterable[str] | None = None, device: str | None = None) -> dict[tuple, dict]:
    """Per learner shape: learner_steps, seconds, rate (learner-steps/s per actor), batches, devices, sweeps.

    sweeps: the sweep folders to read (None: every folder under `results` with a runs table);
    device: only batches that ran on this device ("cpu"), or None for all.
    """
    from orchestrator.results import ResultsStore

    found: dict[tuple, dict] = defaultdict(
        lambda: {"learner_steps": 0, "seconds": 0.0, "batches": set(), "device": set(), "sweeps": set()}
    )
    for sweep in sweep_folders(results) if sweeps is None else sweeps:
        dataset = ResultsStore(results, sweep).dataset("runs")
        if dataset is None:
            continue
        wanted = ["learner", "shape", "total_columns", "columns_per_stage", "truncation", "hidden", "n_inputs",
                  "batch_key", "batch_size", "steps", "wall_seconds", "device"]
        columns = [name for name in wanted if name in dataset.schema.names]
        if len(columns) != len(wanted):
            continue
        batches: dict[str, dict] = {}
        for row in dataset.to_table(columns=columns).to_pylist():
            if (device is None or row["device"] == device) and row["wall_seconds"]:
                batches.setdefault(row["batch_key"], row)  # one row per batch: its size, steps and wall time
        for batch_key, row in batches.items():
            entry = found[shape_key(row["learner"], row, row["n_inputs"])]
            entry["learner_steps"] += row["batch_size"] * row["steps"]
            entry["seconds"] += row["wall_seconds"]
            entry["batches"].add(batch_key)
            entry["device"].add(row["device"])
            entry["sweeps"].add(sweep)
    return {key: {**value, "rate": value["learner_steps"] / value["seconds"]} for key, value in found.items()}


def sweep_folders(results: str) -> list[str]:
    """The folders directly under a results root that hold a `runs` table (sweeps, evaluation stages too)."""
    from pyarrow import fs as pafs

    from orchestrator.results import open_filesystem

    try:
        filesystem, base = open_filesystem(str(results))
        if filesystem.get_file_info(base).type != pafs.FileType.Directory:
            return []
        folders = [info.base_name for info in filesystem.get_file_info(pafs.FileSelector(base))
                   if info.type == pafs.FileType.Directory]
        return sorted(name for name in folders
                      if filesystem.get_file_info(f"{base}/{name}/runs").type == pafs.FileType.Directory)
    except OSError:
        return []


def benchmark_rate(key: tuple) -> float:
    """The benchmarked rate of a shape, else the nearest benchmarked shape of its kind (of any kind when
    none of its own was benchmarked) scaled by FLOPs per step."""
    if key in BENCHMARK_RATES:
        return BENCHMARK_RATES[key]
    flops = flops_per_step(key)
    candidates = [other for other in BENCHMARK_RATES if other[0] == key[0]] or list(BENCHMARK_RATES)
    nearest = min(candidates, key=lambda other: abs(math.log(flops_per_step(other) / flops)))
    return BENCHMARK_RATES[nearest] * flops_per_step(nearest) / flops


@dataclasses.dataclass(frozen=True)
class Cost:
    """What some runs cost: learner-steps, FLOPs and estimated core-hours, with the rates' source."""

    runs: int
    learner_steps: int
    flops: int
    core_hours: float
    measured_steps: int  # learner-steps priced at measured rates (the rest: BENCHMARK_RATES)
    measured_sweeps: tuple[str, ...]

    @property
    def source(self) -> str:
        if not self.learner_steps:
            return "nothing to run"
        if self.measured_steps == self.learner_steps:
            return f"measured throughput of the finished batches in {', '.join(self.measured_sweeps)}"
        if not self.measured_steps:
            return BENCHMARKS_SOURCE
        share = self.measured_steps / self.learner_steps
        return (
            f"measured throughput ({', '.join(self.measured_sweeps)}) for {share:.0%} of the learner-steps, "
            f"{BENCHMARKS_SOURCE} for the rest"
        )


def estimate(runs: Iterable[Run], measured: dict[tuple, dict] | None = None) -> Cost:
    """Cost of `runs` at the measured rates where a shape was measured, else the benchmarks'."""
    measured = measured or {}
    steps: dict[tuple, int] = defaultdict(int)
    flops = count = 0
    per_step: dict[tuple, int] = {}
    for run in runs:
        key = shape_key(run.learner, run.config_dict, run.task.n_inputs)
        if key not in per_step:
            per_step[key] = flops_per_step(key)
        steps[key] += run.steps
        flops += per_step[key] * run.steps
        count += 1
    seconds, measured_steps, sweeps = 0.0, 0, set()
    for key, learner_steps in steps.items():
        if key in measured:
            seconds += learner_steps / measured[key]["rate"]
            measured_steps += learner_steps
            sweeps |= measured[key]["sweeps"]
        else:
            seconds += learner_steps / benchmark_rate(key)
    return Cost(count, sum(steps.values()), flops, seconds / 3600, measured_steps, tuple(sorted(sweeps)))


def format_count(value: float) -> str:
    """1234 -> '1,234'; 2.5e9 -> '2.50G'; FLOPs in engineering units."""
    for size, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= size:
            return f"{value / size:,.2f}{unit}"
    return f"{value:,.0f}"


def format_hours(hours: float) -> str:
    if hours < 0.01:
        return f"{hours * 3600:,.0f} core-seconds"
    return f"{hours:,.2f} core-hours" if hours < 10 else f"{hours:,.0f} core-hours"
