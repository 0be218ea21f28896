"""Learner throughput: learner-steps/s and ns per parameter-step, batched vs one run at a time.

    .venv/bin/python benchmarks/learners.py [--quick] [--batches 1 64 512] [--steps 2000]

For each learner shape and batch size B, a jitted `vmap(scan(step))` advances B runs (each
with its own hyperparameters and key) over a shared chunk of a binary stream; the full step
is timed (TD(lambda), RMSProp, normalisation included), float32, after a warm-up call that
compiles. The baseline, measured in the same run, is the same learner run one at a time:
batch 1 with its own jitted scan (no vmap). Printed as a Markdown table for docs/benchmarks.md.

`--processes P` also measures the machine's total: P worker processes, each pinned to its own
core with single-threaded XLA (what the orchestrator runs: one actor per CPU), each advancing
its own batch at the same time; their rates are summed.

`--baseline-rev REV` times the CCN shapes against learners/ccn.py as it was at git revision
REV (`git show REV:learners/ccn.py`, imported as a module of another name): in each pinned,
single-threaded process both programs (same shape, batch, hyperparameters and stream) are
timed in alternating calls, `--rounds` each; best and median wall time and the best CPU time
per process, summed over 1 and `--processes` processes, and their ratios, with the load:

    .venv/bin/python benchmarks/learners.py --baseline-rev 2b8e3ec --only "CCN 20:4" --batches 64 --processes 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `learners` package: look in the repository root instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "benchmarks"]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from environments.core import StreamStep  # noqa: E402
from learners import ccn, lru, rtu, runner, snap1, tbptt, uoro  # noqa: E402

SHAPES = {
    "CCN 20:4 (12 in)": (ccn, ccn.Config(12, 20, 4, 1_000_000), ccn.Hyper(0.01, 0.99, 0.99999, 0.01)),
    "columnar 7 (12 in)": (ccn, ccn.Config(12, 7, 7, None), ccn.Hyper(0.01, 0.99, 0.99999, 0.01)),
    "T-BPTT 10:5 (12 in)": (tbptt, tbptt.Config(12, 10, 5), tbptt.Hyper(1e-3, 0.99)),
    "T-BPTT 3:10 (12 in)": (tbptt, tbptt.Config(12, 3, 10), tbptt.Hyper(1e-3, 0.99)),
    "columnar 50 (100 in)": (ccn, ccn.Config(100, 50, 50, None), ccn.Hyper(0.01, 0.99, 0.99999, 0.01)),
    # ALGORITHMS.md section 9 learners at the trace-patterning budget (CCN 20:4: 18,488 flops per step)
    "RTU 27 (12 in)": (rtu, rtu.Config(12, 27), rtu.Hyper(1e-3, 0.99, 0.99999, 0.01)),
    "RTU 27 tanh (12 in)": (rtu, rtu.Config(12, 27, "tanh"), rtu.Hyper(1e-3, 0.99, 0.99999, 0.01)),
    "online LRU 27 (12 in)": (lru, lru.Config(12, 27), lru.Hyper(1e-3, 0.99, 0.99999, 0.01)),
    "SnAp-1 8 (12 in)": (snap1, snap1.Config(12, 8), snap1.Hyper(1e-3, 0.99)),  # 17,938 flops per step
    "UORO 9 (12 in)": (uoro, uoro.Config(12, 9), uoro.Hyper(1e-3, 0.99)),  # 19,802 flops per step
}


def binary_stream(steps: int, n_inputs: int, seed: int = 0) -> StreamStep:
    rng = np.random.default_rng(seed)
    observation = (rng.random((steps, n_inputs)) < 0.2).astype(np.float32)
    return StreamStep(
        jnp.asarray(observation),
        jnp.asarray(observation[:, 0]),
        jnp.full((steps,), 0.9, jnp.float32),
        jnp.zeros((steps,), jnp.float32),
    )


def batch_hypers(hyper, batch: int):
    """B copies of `hyper` with step sizes spread over a decade (every run distinct)."""
    fields = {name: jnp.full((batch,), value, jnp.float32) for name, value in hyper._asdict().items()}
    fields["step_size"] = hyper.step_size * jnp.logspace(-0.5, 0.5, batch, dtype=jnp.float32)
    return type(hyper)(**fields)


def time_call(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` (which must block until done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_batched(module, cfg, hyper, batch: int, steps: StreamStep, repeats: int) -> float:
    """learner-steps/s of a vmapped batch (BatchRunner: one compiled program for the batch)."""
    batch_runner = runner.BatchRunner(module, cfg, donate=False)
    hypers = batch_hypers(hyper, batch)
    carry = batch_runner.init(hypers, jax.random.split(jax.random.PRNGKey(0), batch))
    jax.block_until_ready(batch_runner.advance(hypers, carry, steps))  # compile

    seconds = time_call(lambda: jax.block_until_ready(batch_runner.advance(hypers, carry, steps)), repeats)
    return batch * steps.cumulant.shape[0] / seconds


def bench_single(module, cfg, hyper, steps: StreamStep, repeats: int) -> float:
    """learner-steps/s of one run with its own jitted scan (the naive baseline)."""
    fn = jax.jit(lambda carry: runner.scan_arrays(module, cfg, hyper, carry, steps))
    carry = runner.init_carry(module, cfg, hyper, jax.random.PRNGKey(0))
    jax.block_until_ready(fn(carry))
    seconds = time_call(lambda: jax.block_until_ready(fn(carry)), repeats)
    return steps.cumulant.shape[0] / seconds


def _worker(name: str, batch: int, steps: int, repeats: int, core: int, queue) -> None:
    """One pinned process: report its batched learner-steps/s for `name` (multiprocessing target)."""
    os.sched_setaffinity(0, {core})
    module, cfg, hyper = SHAPES[name]
    queue.put(bench_batched(module, cfg, hyper, batch, binary_stream(steps, cfg.n_inputs), repeats))


def bench_processes(name: str, batch: int, steps: int, repeats: int, processes: int) -> float:
    """Total learner-steps/s of `processes` pinned workers running at once (spawned, fresh JAX each)."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
    workers = [context.Process(target=_worker, args=(name, batch, steps, repeats, core % os.cpu_count(), queue))
               for core in range(processes)]
    for worker in workers:
        worker.start()
    rates = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return float(sum(rates))


def baseline_source(rev: str) -> str:
    """learners/ccn.py as it was at git revision `rev` (for --baseline-rev)."""
    import subprocess

    result = subprocess.run(["git", "show", f"{rev}:learners/ccn.py"], cwd=_ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"benchmarks/learners.py: --baseline-rev {rev!r}: git show failed: {result.stderr.strip()}")
    return result.stdout


def load_baseline(source: str, rev: str):
    """Import `source` (a past learners/ccn.py) as a module of its own name, beside the current one."""
    import importlib.util
    import tempfile

    name = f"ccn_baseline_{''.join(ch for ch in rev if ch.isalnum())}"
    path = Path(tempfile.mkdtemp(prefix="ccn-baseline-")) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def bench_interleaved(modules, name: str, batch: int, steps: StreamStep, rounds: int):
    """Per-module lists of (wall s, CPU s) of one chunk, the modules' calls alternating round by round.

    Every module gets the same shape, batch, hyperparameters and stream (its own compiled program);
    the order alternates between rounds, so load from other jobs falls on all of them alike.
    """
    _, cfg, hyper = SHAPES[name]
    programs = []
    for module in modules:
        module_cfg = module.Config(**dataclasses.asdict(cfg))
        batch_runner = runner.BatchRunner(module, module_cfg, donate=False)
        hypers = batch_hypers(module.Hyper(*hyper), batch)
        carry = batch_runner.init(hypers, jax.random.split(jax.random.PRNGKey(0), batch))
        jax.block_until_ready(batch_runner.advance(hypers, carry, steps))  # compile
        programs.append(lambda br=batch_runner, hy=hypers, ca=carry: jax.block_until_ready(br.advance(hy, ca, steps)))
    times = [[] for _ in modules]
    for round_ in range(rounds):
        order = range(len(modules)) if round_ % 2 == 0 else reversed(range(len(modules)))
        for index in order:
            wall, cpu = time.perf_counter(), time.process_time()
            programs[index]()
            times[index].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def _baseline_worker(name: str, batch: int, steps: int, rounds: int, source: str, rev: str, core: int, queue) -> None:
    """One pinned, single-threaded process timing this tree's CCN and the baseline's, interleaved."""
    os.sched_setaffinity(0, {core})
    baseline = load_baseline(source, rev)
    module = SHAPES[name][0]
    queue.put(bench_interleaved([module, baseline], name, batch, binary_stream(steps, SHAPES[name][1].n_inputs),
                                rounds))


def bench_baseline(name: str, batch: int, steps: int, rounds: int, source: str, rev: str, processes: int):
    """[(this tree, baseline)] timings of `processes` pinned workers running at once (one per core)."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
    workers = [context.Process(target=_baseline_worker,
                               args=(name, batch, steps, rounds, source, rev, core % os.cpu_count(), queue))
               for core in range(processes)]
    for worker in workers:
        worker.start()
    results = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return results


def print_baseline(name: str, batch: int, steps: int, rounds: int, rev: str, processes: int) -> None:
    """One table row: this tree against `rev`, `processes` pinned processes, summed over them."""
    load_before = os.getloadavg()[0]
    results = bench_baseline(name, batch, steps, rounds, baseline_source(rev), rev, processes)
    load_after = os.getloadavg()[0]
    rates = {}
    for which in (0, 1):  # this tree, baseline: per process best / median of wall and CPU time, summed
        per_process = [np.array(result[which]) for result in results]
        rates[which] = [sum(batch * steps / stat(times[:, col]) for times in per_process)
                        for stat, col in ((np.min, 0), (np.median, 0), (np.min, 1))]
    new, old = rates[0], rates[1]
    print(f"| {name} | {processes} x {batch} | {new[0]:,.0f} | {new[1]:,.0f} | {new[2]:,.0f} | {old[0]:,.0f} | "
          f"{old[1]:,.0f} | {old[2]:,.0f} | {new[0] / old[0]:.2f}x | {new[1] / old[1]:.2f}x | {new[2] / old[2]:.2f}x | "
          f"{load_before:.1f}-{load_after:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="substrings of learner names to run")
    parser.add_argument("--processes", type=int, default=0, help="also measure P pinned processes at once")
    parser.add_argument("--baseline-rev", metavar="REV",
                        help="time the CCN shapes against learners/ccn.py at git revision REV instead: both "
                             "interleaved in the same pinned single-threaded processes (1, and --processes if given)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per program (--baseline-rev)")
    args = parser.parse_args()
    if args.baseline_rev:
        main_baseline(args)
        return

    device = jax.devices()[0]
    print(f"# {time.strftime('%Y-%m-%d')}  jax {jax.__version__}  device {device.platform}:{device.device_kind}  "
          f"host {platform.processor() or platform.machine()} x{os.cpu_count()}")
    print("| learner | params | batch | learner-steps/s | ns / param-step | baseline (batch 1, own scan) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, (module, cfg, hyper) in SHAPES.items():
        if args.only and not any(s in name for s in args.only):
            continue
        steps = binary_stream(args.steps, cfg.n_inputs)
        params = module.cost(cfg).params
        baseline = bench_single(module, cfg, hyper, steps, args.repeats)
        for batch in args.batches:
            rate = bench_batched(module, cfg, hyper, batch, steps, args.repeats)
            ns_per_param_step = 1e9 / (rate * params)
            print(f"| {name} | {params} | {batch} | {rate:,.0f} | {ns_per_param_step:.2f} | {baseline:,.0f} | "
                  f"{rate / baseline:.1f}x |", flush=True)
            if args.processes and batch > 1:
                total = bench_processes(name, batch, args.steps, args.repeats, args.processes)
                print(f"| {name}, {args.processes} processes | {params} | {args.processes} x {batch} | {total:,.0f} | "
                      f"{1e9 / (total * params):.2f} | {baseline:,.0f} | {total / baseline:.1f}x |", flush=True)


def main_baseline(args) -> None:
    """--baseline-rev: the CCN shapes of SHAPES (or --only), this tree against REV, per batch size."""
    baseline_source(args.baseline_rev)  # fail early on a bad revision
    device = jax.devices()[0]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  jax {jax.__version__}  device {device.platform}:{device.device_kind}"
          f"  host {platform.processor() or platform.machine()} x{os.cpu_count()}  baseline learners/ccn.py at "
          f"{args.baseline_rev}  {args.rounds} interleaved rounds of {args.steps} steps, pinned single-threaded XLA")
    print(f"# uptime: {os.popen('uptime').read().strip()}")
    print(f"| learner | processes x batch | this tree: best | median | CPU-time best | {args.baseline_rev}: best | "
          f"median | CPU-time best | ratio best | ratio median | ratio CPU | load average (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (module, _, _) in SHAPES.items():
        if module is not ccn or (args.only and not any(s in name for s in args.only)):
            continue
        for batch in args.batches:
            for processes in sorted({1, args.processes or 1}):
                print_baseline(name, batch, args.steps, args.rounds, args.baseline_rev, processes)
    print(f"# uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
