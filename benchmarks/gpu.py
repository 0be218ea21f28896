"""GPU throughput of the learners and the camera-ready sweeps' GPU-hours (issue 15, item 5).

    PYTHONPATH=. python3 benchmarks/gpu.py [--batches 1024 2048 4096 8192 16384] [--steps 1000]
        [--repeats 3] [--processes 4 8] [--only NAME ...] [--budget-s 420] [--quick]

Needs only jax (with CUDA on a GPU machine), numpy and optax: no project install, no Ray,
DuckDB or W&B. For each learner shape and batch B, a jitted `vmap(scan(step))` (the
orchestrator's `learners.runner.BatchRunner`) advances B runs, each with its own step size and
key, over a shared chunk of `--steps` steps of a binary stream, float32; after a compile call
the median of `--repeats` timed calls (block_until_ready) gives learner-steps/s, times the
learner's parameter count parameter-steps/s. Besides `--batches`, each shape is also timed at
the batch the camera-ready sweeps form for the learner shapes priced by it (runs per static
signature: 720 for the trace-patterning CCN family, 120 for its T-BPTT shapes, 15 per Atari
game and shape). The shapes: CCN 20:4, columnar 7:7, T-BPTT 10:5 (d = 12), columnar 6:6 on
Atari inputs (d = 275), columnar 50 x 100 (d = 100), and T-BPTT 8:5 at d = 275 (the Atari
sweep's, at its sweep batch only).

`--processes K ...`: K spawned processes share the GPU, each with XLA_PYTHON_CLIENT_MEM_FRACTION
= 0.9 / K set before JAX starts, each running the same shape and batch at once (compiled first,
then a barrier); their summed rate is K x B x steps x repeats over the window from the first
start to the last end. That is how many actors per GPU the orchestrator should offer.

Every cell runs in a worker process (the parent never touches the device), so an XLA
out-of-memory error prints "OOM" for its cell and a crashed worker "crashed"; `--budget-s`
bounds the whole run (cells after it are skipped with a note; a cell still running 45 s past
it is stopped). Last, the targets of issue 15 with met / not met, and the GPU-hours of
sweeps/camera-ready-*.toml extrapolated from the measured rates (learner-steps per learner
shape group, read from the TOML here; tests/test_benchmarks_gpu.py checks them against the
project's spec code).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import multiprocessing as mp
import os
import platform
import queue as queue_module
import shutil
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and benchmarks/learners.py would
# shadow the `learners` package: look in the repository root instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "benchmarks"]

import numpy as np  # noqa: E402

from learners import ccn, tbptt  # noqa: E402  (imports jax; nothing here starts a device backend)
from orchestrator.plan import GPU_MAX_BATCH  # noqa: E402  (standard library only)

DEFAULT_BATCHES = (1024, 2048, 4096, 8192, 16384)
DEFAULT_PROCESSES = (4, 8)
MEMORY_FRACTION = 0.9  # of the GPU's memory, shared by the K processes of a cell
STOP_GRACE_S = 45.0  # a cell still running this long after the budget is stopped
SWEEPS = ("sweeps/camera-ready-trace-patterning.toml", "sweeps/camera-ready-atari.toml")
N_INPUTS = {"trace_patterning": 12, "atari": 275}  # observation size d of the sweeps' task kinds

# name: (learner module, config, hyperparameters); the key of each is its shape_key
SHAPES = {
    "CCN 20:4": (ccn, ccn.Config(12, 20, 4, 1_000_000), ccn.Hyper(0.01, 0.99, 0.99999, 0.01)),
    "columnar 7:7": (ccn, ccn.Config(12, 7, 7, None), ccn.Hyper(0.01, 0.99, 0.99999, 0.01)),
    "T-BPTT 10:5": (tbptt, tbptt.Config(12, 10, 5), tbptt.Hyper(1e-3, 0.99)),
    "columnar 6:6 Atari": (ccn, ccn.Config(275, 6, 6, None), ccn.Hyper(1e-4, 0.99, 0.999998, 0.001)),
    "columnar 50 x 100": (ccn, ccn.Config(100, 50, 50, None), ccn.Hyper(0.01, 0.99, 0.99999, 0.01)),
    # Atari's T-BPTT (d = 275): no d = 12 shape prices it well; timed at the sweep's batches only
    "T-BPTT 8:5 Atari": (tbptt, tbptt.Config(275, 8, 5), tbptt.Hyper(1e-4, 0.99)),
}
SWEEP_BATCHES_ONLY = ("T-BPTT 8:5 Atari",)  # shapes not timed at --batches

TARGET_PARAM_STEPS = ("columnar 50 x 100", 5e10)  # parameter-steps/s on an H100/H200
TARGET_LEARNER_STEPS = ("CCN 20:4", 20e6)  # learner-steps/s per GPU
TARGET_HOURS = ("sweeps/camera-ready-trace-patterning.toml", 2.0)  # GPU-hours


# --------------------------------------------------------------------------- shapes and costs
def shape_key(learner: str, shape: str, n_inputs: int) -> tuple:
    """("ccn", columns, per stage, d) or ("tbptt", truncation, hidden, d) from a spec's shape string."""
    parts = str(shape).split(":")
    if learner == "ccn" and len(parts) == 3:
        return ("ccn", int(parts[0]), int(parts[1]), n_inputs)
    if learner == "tbptt" and len(parts) == 2:
        return ("tbptt", int(parts[0]), int(parts[1]), n_inputs)
    raise ValueError(f"learner {learner!r} shape {shape!r}: benchmarks/gpu.py prices only ccn N:k:S and tbptt k:H")


def config_of(key: tuple):
    learner, a, b, d = key
    return ccn.Config(d, a, b, None) if learner == "ccn" else tbptt.Config(d, a, b)


def cost_of(key: tuple):
    return (ccn if key[0] == "ccn" else tbptt).cost(config_of(key))


def bench_key(name: str) -> tuple:
    _, cfg, _ = SHAPES[name]
    if isinstance(cfg, ccn.Config):
        return ("ccn", cfg.total_columns, cfg.columns_per_stage, cfg.n_inputs)
    return ("tbptt", cfg.truncation, cfg.hidden, cfg.n_inputs)


def label(key: tuple) -> str:
    learner, a, b, d = key
    if learner == "tbptt":
        return f"T-BPTT {a}:{b} (d={d})"
    family = "columnar" if a == b else "constructive" if b == 1 else "CCN"
    return f"{family} {a}:{b} (d={d})"


def nearest_bench(key: tuple, names=None) -> tuple[str, float]:
    """The benchmarked shape that prices `key` and the scale on its rate: the same learner kind, the
    same d when one was benchmarked, nearest in FLOPs per step; rate x flops(benchmarked) / flops(key)
    (the rule of orchestrator/cost.py)."""
    names = list(SHAPES) if names is None else list(names)
    same_kind = [n for n in names if bench_key(n)[0] == key[0]] or names
    same_d = [n for n in same_kind if bench_key(n)[3] == key[3]] or same_kind
    flops = cost_of(key).flops_per_step
    name = min(same_d, key=lambda n: abs(math.log(cost_of(bench_key(n)).flops_per_step / flops)))
    return name, cost_of(bench_key(name)).flops_per_step / flops


# --------------------------------------------------------------------------- the sweeps, read from their TOML
@dataclasses.dataclass
class Group:
    """The runs of one learner shape in a sweep."""

    key: tuple
    runs: int = 0
    learner_steps: int = 0
    steps_per_run: int = 0  # the longest
    batch: int = 0  # runs per batch the planner forms (runs per static signature, at most GPU_MAX_BATCH)


def sweep_groups(path: str | Path) -> dict[tuple, Group]:
    """Learner shape -> Group, from a sweep spec's TOML (tasks x learners x shapes x grids x seeds)."""
    path = Path(path)
    with open(path, "rb") as file:
        doc = tomllib.load(file)
    seeds = doc["seeds"]
    n_seeds = len(seeds) if isinstance(seeds, list) else int(seeds)
    groups: dict[tuple, Group] = {}
    for t, task in enumerate(doc["tasks"], 1):
        if task.get("kind") not in N_INPUTS:
            raise ValueError(f"{path}: tasks[{t}].kind: {task.get('kind')!r} has no known d here ({sorted(N_INPUTS)})")
        d = N_INPUTS[task["kind"]]
        for i, learner in enumerate(doc["learners"], 1):
            if "match_flops" in learner:
                raise ValueError(f"{path}: learners[{i}].match_flops: not priced by benchmarks/gpu.py")
            shapes = learner["shape"] if isinstance(learner["shape"], list) else [learner["shape"]]
            grid = math.prod(len(value) for name, value in learner.items()
                             if name not in ("kind", "name", "shape", "steps") and isinstance(value, list))
            steps = int(learner.get("steps", doc["steps"]))
            signature_runs = n_seeds * grid  # every run of one task, learner table and shape shares a program
            batch = math.ceil(signature_runs / math.ceil(signature_runs / GPU_MAX_BATCH))
            for shape in shapes:
                key = shape_key(learner["kind"], shape, d)
                group = groups.setdefault(key, Group(key))
                group.runs += signature_runs
                group.learner_steps += signature_runs * steps
                group.steps_per_run = max(group.steps_per_run, steps)
                group.batch = max(group.batch, batch)
    return groups


def sweep_batches(groups_by_sweep: dict[str, dict[tuple, Group]], names) -> dict[str, list[int]]:
    """Benchmarked shape -> the sweep batches of the groups it prices with the same learner kind and d (sorted)."""
    batches: dict[str, set[int]] = {name: set() for name in names}
    for groups in groups_by_sweep.values():
        for group in groups.values():
            name = nearest_bench(group.key, names)[0]
            if bench_key(name)[::3] == group.key[::3]:
                batches[name].add(group.batch)
    return {name: sorted(values) for name, values in batches.items()}


# --------------------------------------------------------------------------- one cell, in a worker process
def binary_stream(steps: int, n_inputs: int, seed: int = 0):
    import jax.numpy as jnp

    from environments.core import StreamStep

    rng = np.random.default_rng(seed)
    observation = (rng.random((steps, n_inputs)) < 0.2).astype(np.float32)
    return StreamStep(jnp.asarray(observation), jnp.asarray(observation[:, 0]),
                      jnp.full((steps,), 0.9, jnp.float32), jnp.zeros((steps,), jnp.float32))


def batch_hypers(hyper, batch: int):
    """B copies of `hyper` with step sizes spread over a decade (every run distinct)."""
    import jax.numpy as jnp

    fields = {name: jnp.full((batch,), value, jnp.float32) for name, value in hyper._asdict().items()}
    fields["step_size"] = hyper.step_size * jnp.logspace(-0.5, 0.5, batch, dtype=jnp.float32)
    return type(hyper)(**fields)


def is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_cell(name: str, batch: int, steps: int, repeats: int, seed: int, barrier) -> list[tuple[float, float]]:
    """(start, end) monotonic seconds of each timed call of `name` at `batch` (after a compile call)."""
    import jax

    from learners import runner

    module, cfg, hyper = SHAPES[name]
    stream = binary_stream(steps, cfg.n_inputs)
    batch_runner = runner.BatchRunner(module, cfg)
    hypers = batch_hypers(hyper, batch)
    carry = batch_runner.init(hypers, jax.random.split(jax.random.PRNGKey(seed), batch))
    carry, out = batch_runner.advance(hypers, carry, stream)  # compiles
    jax.block_until_ready((carry, out))
    barrier.wait(timeout=600)
    calls = []
    for _ in range(repeats):
        start = time.monotonic()
        carry, out = batch_runner.advance(hypers, carry, stream)
        jax.block_until_ready((carry, out))
        calls.append((start, time.monotonic()))
    return calls


def _worker(index: int, requests, results, barrier) -> None:
    """A worker process: report the device, then run the cells it is sent until None."""
    import gc

    import jax

    device = jax.devices()[0]
    memory = None
    with contextlib.suppress(Exception):  # not every backend has memory stats
        memory = (device.memory_stats() or {}).get("bytes_limit")
    results.put(("ready", index, {"platform": device.platform, "kind": device.device_kind,
                                  "count": jax.device_count(), "jax": jax.__version__, "memory": memory}))
    while (cell := requests.get()) is not None:
        try:
            reply = {"calls": run_cell(*cell, seed=index, barrier=barrier)}
        except threading.BrokenBarrierError:
            reply = {"note": "aborted (another process failed)"}
        except Exception as error:  # noqa: BLE001 - the cell's result is the error
            barrier.abort()
            reply = {"note": "OOM"} if is_oom(error) else {"note": f"error: {str(error).splitlines()[0][:160]}"}
        gc.collect()
        results.put(("cell", index, reply))


class Pool:
    """K worker processes sharing the device, each with MEMORY_FRACTION / K of its memory."""

    def __init__(self, processes: int, deadline: float):
        context = mp.get_context("spawn")
        self.processes, self.results = processes, context.Queue()
        self.requests = [context.Queue() for _ in range(processes)]
        self.barrier = context.Barrier(processes)
        saved = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{MEMORY_FRACTION / processes:.4f}"
        try:  # a spawned process starts with the parent's environment: set before its JAX starts
            self.workers = [context.Process(target=_worker, args=(i, self.requests[i], self.results, self.barrier),
                                            daemon=True) for i in range(processes)]
            for worker in self.workers:
                worker.start()
        finally:
            if saved is None:
                del os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]
            else:
                os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = saved
        replies = self._collect(deadline)
        self.device = None if replies is None else replies[0]

    def _collect(self, deadline: float) -> list | None:
        """One reply per worker, or None when one died or the deadline passed (the pool is then closed)."""
        replies: dict[int, dict] = {}
        while len(replies) < self.processes:
            try:
                _, index, reply = self.results.get(timeout=1.0)
                replies[index] = reply
            except queue_module.Empty:
                if time.monotonic() > deadline or not all(worker.is_alive() for worker in self.workers):
                    self.close()
                    return None
        return [replies[i] for i in range(self.processes)]

    def run(self, name: str, batch: int, steps: int, repeats: int, deadline: float) -> dict:
        """{"rate": learner-steps/s (summed over the processes)} or {"note": why not}."""
        for requests in self.requests:
            requests.put((name, batch, steps, repeats))
        replies = self._collect(deadline)
        if replies is None:
            return {"note": "stopped: budget" if time.monotonic() > deadline else "crashed"}
        notes = [reply["note"] for reply in replies if "note" in reply]
        if notes:
            self.barrier.reset()
            return {"note": next((n for n in notes if not n.startswith("aborted")), notes[0])}
        if self.processes == 1:
            seconds = float(np.median([end - start for start, end in replies[0]["calls"]]))
            return {"rate": batch * steps / seconds}
        calls = [call for reply in replies for call in reply["calls"]]
        window = max(end for _, end in calls) - min(start for start, _ in calls)
        return {"rate": self.processes * batch * steps * repeats / window}

    def close(self) -> None:
        """Stop this pool's workers (politely, then by pid)."""
        for requests in self.requests:
            with contextlib.suppress(OSError, ValueError):
                requests.put(None)
        for worker in self.workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join()


# --------------------------------------------------------------------------- extrapolation
@dataclasses.dataclass
class Cell:
    name: str
    batch: int
    processes: int
    rate: float | None = None  # learner-steps/s, summed over the processes
    note: str = ""

    @property
    def param_rate(self) -> float | None:
        return None if self.rate is None else self.rate * SHAPES[self.name][0].cost(SHAPES[self.name][1]).params


def best_cell(cells: list[Cell], name: str) -> Cell | None:
    measured = [cell for cell in cells if cell.name == name and cell.rate]
    return max(measured, key=lambda cell: cell.rate) if measured else None


def rate_at_batch(cells: list[Cell], name: str, batch: int) -> tuple[float, Cell] | None:
    """The best estimate over process counts of `name`'s rate at `batch`: for each K the cell of the
    nearest measured batch, its rate x batch / its batch when that is larger (a smaller batch is no
    slower per step), else unscaled (a larger batch is no slower per run)."""
    best = None
    for processes in sorted({cell.processes for cell in cells if cell.name == name and cell.rate}):
        candidates = [c for c in cells if c.name == name and c.rate and c.processes == processes]
        cell = min(candidates, key=lambda c: (abs(math.log(c.batch / batch)), -c.batch))
        rate = cell.rate * min(1.0, batch / cell.batch)
        if best is None or rate > best[0]:
            best = (rate, cell)
    return best


@dataclasses.dataclass
class Estimate:
    """Hours of one sweep on one device: at the best measured batch, and at the sweep's own batches."""

    rows: list[dict]
    best_hours: float | None  # every group at its shape's best measured rate (None: a shape unmeasured)
    sweep_hours: float | None  # at the sweep's batches: max(sum over groups, the longest batch)
    longest_hours: float | None


def extrapolate(groups: dict[tuple, Group], cells: list[Cell], names=None) -> Estimate:
    rows, best_total, sweep_total, longest = [], 0.0, 0.0, 0.0
    for key, group in sorted(groups.items(), key=lambda item: -item[1].learner_steps):
        name, scale = nearest_bench(key, names)
        best = best_cell(cells, name)
        at_batch = rate_at_batch(cells, name, group.batch)
        row = {"group": group, "name": name, "scale": scale, "best": best, "at_batch": at_batch,
               "best_hours": None if best is None else group.learner_steps / (best.rate * scale) / 3600,
               "sweep_hours": None, "longest_hours": None}
        if at_batch is not None:
            rate, cell = at_batch
            row["sweep_hours"] = group.learner_steps / (rate * scale) / 3600
            # one batch of this group: steps per run at this process's step time (its share of the rate)
            row["longest_hours"] = group.steps_per_run * group.batch * cell.processes / (rate * scale) / 3600
            longest = max(longest, row["longest_hours"])
        best_total = None if best_total is None or row["best_hours"] is None else best_total + row["best_hours"]
        sweep_total = None if sweep_total is None or row["sweep_hours"] is None else sweep_total + row["sweep_hours"]
        rows.append(row)
    return Estimate(rows, best_total, None if sweep_total is None else max(sweep_total, longest),
                    None if sweep_total is None else longest)


# --------------------------------------------------------------------------- printing
def fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    for size, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:,.2f}{unit}"
    return f"{value:,.0f}"


def fmt_hours(value: float | None) -> str:
    return "-" if value is None else f"{value:,.3f}" if value < 10 else f"{value:,.1f}"


def print_cell(cell: Cell) -> None:
    module, cfg, _ = SHAPES[cell.name]
    print(f"| {cell.name} | {cfg.n_inputs} | {module.cost(cfg).params:,} | {cell.batch:,} | {cell.processes} | "
          f"{fmt_rate(cell.rate)} | {fmt_rate(cell.param_rate)} | {cell.note} |", flush=True)


def print_targets(cells: list[Cell], estimates: dict[str, Estimate], device: dict | None) -> None:
    platform_name = device["platform"] if device else "nothing"
    on = "" if platform_name == "gpu" else f" (measured on {platform_name})"
    print(f"\n## Targets of issue 15 (for an H100/H200){on}\n")
    print("| target | measured | met |")
    print("|---|---|---|")
    name, target = TARGET_PARAM_STEPS
    best = max((c for c in cells if c.name == name and c.rate), key=lambda c: c.param_rate, default=None)
    measured = "not measured" if best is None else f"{best.param_rate:.3g} (batch {best.batch:,} x {best.processes})"
    print(f"| {name} >= {target:.0e} parameter-steps/s | {measured} | "
          f"{'-' if best is None else 'met' if best.param_rate >= target else 'not met'} |")
    name, target = TARGET_LEARNER_STEPS
    best = best_cell(cells, name)
    measured = "not measured" if best is None else f"{fmt_rate(best.rate)} (batch {best.batch:,} x {best.processes})"
    print(f"| {name} >= {fmt_rate(target)} learner-steps/s per GPU | {measured} | "
          f"{'-' if best is None else 'met' if best.rate >= target else 'not met'} |")
    sweep, target = TARGET_HOURS
    estimate = estimates[sweep]
    hours, how = estimate.sweep_hours, "at the sweep's batches"
    if hours is None and estimate.best_hours is not None:
        hours, how = estimate.best_hours, "at the best batch (the sweep's batches not measured)"
    measured = "not measured" if hours is None else f"{fmt_hours(hours)} h {how}"
    print(f"| {Path(sweep).stem} <= {target:g} GPU-hours | {measured} | "
          f"{'-' if hours is None else 'met' if hours <= target else 'not met'} |")


def print_estimate(path: str, groups: dict[tuple, Group], estimate: Estimate) -> None:
    steps, runs = sum(g.learner_steps for g in groups.values()), sum(g.runs for g in groups.values())
    print(f"\n### {path}: {fmt_rate(steps)} learner-steps, {runs:,} runs\n")
    print("| learner shape | runs | learner-steps | sweep batch | priced as (x FLOPs scale) | best rate (batch x K) | "
          "hours | rate at sweep batch (from batch x K) | hours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in estimate.rows:
        group, scale, best, at_batch = row["group"], row["scale"], row["best"], row["at_batch"]
        best_text = "-" if best is None else f"{fmt_rate(best.rate * scale)} ({best.batch:,} x {best.processes})"
        at_text = "-" if at_batch is None else (f"{fmt_rate(at_batch[0] * scale)} "
                                                f"({at_batch[1].batch:,} x {at_batch[1].processes})")
        print(f"| {label(group.key)} | {group.runs:,} | {fmt_rate(group.learner_steps)} | {group.batch:,} | "
              f"{row['name']} (x {scale:.3g}) | {best_text} | {fmt_hours(row['best_hours'])} | {at_text} | "
              f"{fmt_hours(row['sweep_hours'])} |")
    print(f"| **total** | {runs:,} | {fmt_rate(steps)} | | | | **{fmt_hours(estimate.best_hours)}** | "
          f"longest batch {fmt_hours(estimate.longest_hours)} h | **{fmt_hours(estimate.sweep_hours)}** |")


# --------------------------------------------------------------------------- main
def plan_cells(names, batches, processes, groups_by_sweep) -> list[tuple[int, str, int]]:
    """(processes, shape, batch) in run order: the sweeps' batches first, then --batches ascending
    (each over every shape), then the shared-GPU cells (each K: every shape at its sweep batches, or
    the smallest --batches for a shape no sweep uses)."""
    own = sweep_batches(groups_by_sweep, names)
    cells = [(1, name, batch) for batch in sorted({b for bs in own.values() for b in bs}) for name in names
             if batch in own[name]]
    cells += [(1, name, batch) for batch in sorted(batches) for name in names
              if batch not in own[name] and name not in SWEEP_BATCHES_ONLY]
    for k in processes:
        if k > 1:
            cells += [(k, name, batch) for name in names for batch in (own[name] or [min(batches)])]
    return cells


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None, help=f"default {list(DEFAULT_BATCHES)}")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed call (default 1000)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 3)")
    parser.add_argument("--processes", type=int, nargs="*", default=None,
                        help=f"K processes sharing the device, each K (default {list(DEFAULT_PROCESSES)}; none: off)")
    parser.add_argument("--only", nargs="*", help="substrings of shape names to run")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the cells left after this many seconds")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: batches 64 256, 50 steps, 2 repeats, K=2")
    args = parser.parse_args(argv)
    quick = {"batches": [64, 256], "steps": 50, "repeats": 2, "processes": [2]}
    normal = {"batches": list(DEFAULT_BATCHES), "steps": 1000, "repeats": 3, "processes": list(DEFAULT_PROCESSES)}
    for field, value in (quick if args.quick else normal).items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    if min(args.batches) < 1 or args.steps < 1 or args.repeats < 1 or any(k < 1 for k in args.processes):
        parser.error("--batches, --steps, --repeats and --processes must be positive")
    names = [n for n in SHAPES if not args.only or any(s in n for s in args.only)]
    if not names:
        parser.error(f"--only {args.only} matches none of {list(SHAPES)}")

    started = time.monotonic()
    deadline = started + args.budget_s
    # one compilation per program for the whole run: the K-process cells load what the first compiled
    cache = None
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu-bench-jax-cache-")
    groups_by_sweep = {path: sweep_groups(_ROOT / path) for path in SWEEPS}
    planned = plan_cells(names, args.batches, args.processes, groups_by_sweep)

    cells: list[Cell] = []
    device, pool, printed = None, None, False

    def record(cell: Cell) -> None:
        nonlocal printed
        if not printed:
            print_header(device, args)
            printed = True
        cells.append(cell)
        print_cell(cell)

    try:
        for processes, name, batch in planned:
            if time.monotonic() > deadline:
                record(Cell(name, batch, processes, note="skipped: --budget-s"))
                continue
            if pool is None or pool.processes != processes:
                if pool is not None:
                    pool.close()
                pool = Pool(processes, deadline + STOP_GRACE_S)
                if pool.device is None:
                    pool = None
                    record(Cell(name, batch, processes, note="worker did not start"))
                    continue
                device = device or pool.device
            result = pool.run(name, batch, args.steps, args.repeats, deadline + STOP_GRACE_S)
            record(Cell(name, batch, processes, result.get("rate"), result.get("note", "")))
            if result.get("note") in ("crashed", "stopped: budget"):
                pool = None  # closed by Pool.run
    finally:
        if pool is not None:
            pool.close()
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
            del os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not printed:
        print_header(device, args)
    skipped = sum(cell.note.startswith("skipped") for cell in cells)
    if skipped:
        print(f"\n{skipped} cell(s) skipped: the run passed --budget-s {args.budget_s:g} "
              f"after {time.monotonic() - started:.0f} s")

    estimates = {path: extrapolate(groups, cells, names) for path, groups in groups_by_sweep.items()}
    print_targets(cells, estimates, device)
    where = f"{device['kind']}" if device else "no device"
    print(f"\n## Camera-ready sweeps: hours on one {where}, extrapolated from the rates above\n")
    print("Each learner shape is priced by the benchmarked shape of its kind (same d when benchmarked, nearest in "
          "FLOPs per step), its rate x FLOPs(benchmarked) / FLOPs(shape). 'best rate': the shape's best cell "
          "(the ideal of full batches); 'at sweep batch': the batch the planner forms for the shape (runs per "
          "program), from the nearest measured batch (x batch / measured batch when smaller) and the best K "
          "processes (K batches at once); total = max(sum, the longest single batch).")
    for path, groups in groups_by_sweep.items():
        print_estimate(path, groups, estimates[path])
    print(f"\n# wall {time.monotonic() - started:.0f} s", flush=True)


def print_header(device: dict | None, args) -> None:
    if device is None:
        where = "device not started"
    else:
        memory = f", {device['memory'] / 2**30:.1f} GiB" if device.get("memory") else ""
        where = f"jax {device['jax']}, device {device['platform']}: {device['kind']} x{device['count']}{memory}"
    print(f"# benchmarks/gpu.py {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {where}, "
          f"host {platform.machine()} x{os.cpu_count()}, float32")
    print(f"# {args.steps:,} steps per call; 1 process: median of {args.repeats} timed calls after a compile call; "
          f"K processes: K x batch x steps x {args.repeats} over their common window; budget {args.budget_s:g} s\n")
    print("| learner | d | params | batch | processes | learner-steps/s | parameter-steps/s | note |")
    print("|---|---|---|---|---|---|---|---|", flush=True)


if __name__ == "__main__":
    main()
