"""Orchestrator throughput: a sweep of many short runs, batched on Ray actors, against
(a) the same runs as one Ray task per run with one compilation each (the per-trial pattern of
general tuners) and (b) the pure batch compute time. All measured in this script.

    python benchmarks/orchestrator.py [--runs 256] [--steps 100000] [--shape 7:7:inf] [--workers 2]
                                      [--per-run-sample 16] [--full]

Definitions (printed with the figures):
  sweep            wall time of api.run_sweep on a running local Ray, cold compilation cache:
                   planning, actor start, one compilation per actor, the batches, Parquet writes
  actor compute    per actor, the sum of its batches' executor time (compile + chunks), measured
                   inside the actors; the busiest actor bounds any schedule of these batches
  pure compute     the same batches split over `workers` plain processes (no Ray, no files), each
                   compiling once: the time the batch programs alone take on this machine now
  overhead         sweep / pure compute - 1 (what orchestration adds: Ray actors, scheduling,
                   Parquet writes, resume discovery); also sweep / busiest actor compute - 1
  per-run pattern  one Ray task per run (a fresh worker process, one compilation, B = 1); a sample
                   of runs is timed and scaled to all runs unless --full
Ray's own start-up is reported separately (a cluster is normally already up).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# This file is named like the package it measures: keep its own folder off the import path.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from cluster.loopback import keep_loopback  # noqa: E402
from orchestrator.schedule import CPU_ACTOR_XLA_FLAGS  # noqa: E402

os.environ.setdefault("XLA_FLAGS", CPU_ACTOR_XLA_FLAGS)  # measure in-process compute as the actors run it


def write_spec(folder: Path, runs: int, steps: int, shape: str) -> Path:
    step_sizes = [0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 0.0001, 0.00003]
    if runs % len(step_sizes):
        raise SystemExit(f"--runs must be a multiple of {len(step_sizes)}")
    path = folder / "bench.toml"
    path.write_text(
        textwrap.dedent(f"""
        name = "bench"
        steps = {steps}
        seeds = {runs // len(step_sizes)}
        log_every = {min(steps, 10_000)}
        [[tasks]]
        kind = "trace_patterning"
        [[learners]]
        kind = "ccn"
        shape = "{shape}"
        step_size = {step_sizes}
        """)
    )
    return path


def one_run_per_task(batches, sample: int, workers: int) -> float:
    """Wall time of `sample` runs as one Ray task each (fresh process, own compilation)."""
    import ray

    from orchestrator.plan import Batch

    @ray.remote(num_cpus=1, max_calls=1, runtime_env={"env_vars": {"XLA_FLAGS": CPU_ACTOR_XLA_FLAGS}})
    def run_one(batch):
        from orchestrator.execute import BatchExecutor

        runs, metrics = BatchExecutor(None).tables(batch)
        return runs.num_rows

    runs = [run for batch in batches for run in batch.runs][:sample]
    started = time.perf_counter()
    done = sum(ray.get([run_one.remote(Batch(sweep="bench", runs=(run,), padded_size=1)) for run in runs]))
    assert done == len(runs)
    return time.perf_counter() - started


def _run_share(batches) -> list[float]:
    """Run batches in this process with one executor; seconds per batch (the first compiles)."""
    from orchestrator.execute import BatchExecutor

    executor = BatchExecutor(None)
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        executor.run(batch)
        seconds.append(time.perf_counter() - started)
    return seconds


def plain_processes(batches, workers: int) -> tuple[float, float, float]:
    """The batches split over `workers` plain processes (no Ray, no files): (wall, first, warm) seconds."""
    import multiprocessing
    import statistics
    from concurrent.futures import ProcessPoolExecutor

    shares = [batches[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(int).result()  # processes up before the clock starts (as the Ray cluster is)
        started = time.perf_counter()
        seconds = list(pool.map(_run_share, shares))
        wall = time.perf_counter() - started
    warm = [s for share in seconds for s in share[1:]]
    return wall, statistics.mean(share[0] for share in seconds), statistics.median(warm) if warm else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--shape", default="7:7:inf")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--per-run-sample", type=int, default=16, help="runs timed for the per-run pattern")
    parser.add_argument("--full", action="store_true", help="time every run in the per-run pattern")
    arguments = parser.parse_args()

    import duckdb
    import ray

    from orchestrator import api

    folder = Path(tempfile.mkdtemp(prefix="ccn-bench-"))
    try:
        spec = write_spec(folder, arguments.runs, arguments.steps, arguments.shape)
        learner_steps = arguments.runs * arguments.steps
        print(
            f"{arguments.runs} runs of {arguments.shape} x {arguments.steps:,} steps "
            f"({learner_steps / 1e6:.1f}M learner-steps) on {arguments.workers} CPU workers"
        )

        started = time.perf_counter()
        os.environ.setdefault("RAY_worker_niceness", "0")  # actors at the same priority as this process
        keep_loopback()  # 127.0.0.1 only, like the embedded `ccn run`
        ray.init(
            address="local",
            num_cpus=arguments.workers,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        ray_start = time.perf_counter() - started

        plan = api.plan_sweep(spec, str(folder / "results"), workers=arguments.workers)
        started = time.perf_counter()
        report = api.run_sweep(
            spec, str(folder / "results"), progress=False, compilation_cache_dir=str(folder / "jax_cache")
        )
        sweep_seconds = time.perf_counter() - started
        assert report.ok and report.ran == arguments.runs, report

        per_batch = duckdb.sql(f"""
            SELECT DISTINCT batch_key, wall_seconds FROM read_parquet('{folder}/results/bench/runs/**/*.parquet')
            """).fetchall()
        actor_total = sum(seconds for _, seconds in per_batch)
        batches = len(per_batch)
        busiest = report.busiest_actor_compute_seconds

        pool_seconds, first_batch, warm_batch = plain_processes(plan.batches, arguments.workers)

        sample = arguments.runs if arguments.full else min(arguments.per_run_sample, arguments.runs)
        sample_seconds = one_run_per_task(plan.batches, sample, arguments.workers)
        per_run_all = sample_seconds * arguments.runs / sample
        ray.shutdown()

        timed = "all runs" if arguments.full else f"{sample} runs timed ({sample_seconds:.1f} s), scaled"
        rows = [
            ("Ray start-up (separate)", f"{ray_start:.1f} s", ""),
            (
                "sweep, end to end",
                f"{sweep_seconds:.1f} s",
                f"{learner_steps / sweep_seconds / 1e6:.2f}M learner-steps/s",
            ),
            ("  batches", f"{batches} x {plan.batches[0].padded_size}", "runs per compiled batch"),
            ("  actor compute, all batches", f"{actor_total:.1f} s", "compile + chunks, inside the actors"),
            ("  actor compute, busiest actor", f"{busiest:.1f} s", ""),
            ("  orchestration overhead", f"{100 * (sweep_seconds / busiest - 1):.1f} %", "sweep / busiest actor - 1"),
            ("pure batch compute", f"{pool_seconds:.1f} s", f"same batches in {arguments.workers} plain processes"),
            ("  a batch: first (compiles), warm", f"{first_batch:.1f} s, {warm_batch:.1f} s", ""),
            ("  overhead vs pure compute", f"{100 * (sweep_seconds / pool_seconds - 1):.1f} %", "sweep / pure - 1"),
            ("one Ray task per run", f"{per_run_all:.1f} s", timed),
            ("  speedup of the batched sweep", f"{per_run_all / sweep_seconds:.1f} x", ""),
        ]
        print()
        for label, value, note in rows:
            print(f"{label:<36}{value:>16}   {note}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
