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
"""

from __future__ import annotations

import argparse
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
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    workers = [context.Process(target=_worker, args=(name, batch, steps, repeats, core % os.cpu_count(), queue))
               for core in range(processes)]
    for worker in workers:
        worker.start()
    rates = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return float(sum(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="substrings of learner names to run")
    parser.add_argument("--processes", type=int, default=0, help="also measure P pinned processes at once")
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
