"""Scaling of one sweep over the nodes of a local multi-node Ray cluster: learner-steps/s of the
same sweep on 1, 2 and 3 worker nodes (each node the same CPUs), and the scheduling overhead.

    python benchmarks/scaling.py [--nodes 1,2,3] [--cpus-per-node 1] [--runs 192] [--steps 80000]
                                 [--batch-size 16] [--shape 7:7:inf] [--quick]

The cluster: `cluster.local.up(workers=N, cpus_per_node=C)` (what `ccn cluster up` starts), a
fresh one for each node count, stopped with `cluster.local.down` before the next (and on any
error, Ctrl-C or SIGTERM). It is chosen over `ray.cluster_utils.Cluster` because its nodes are
real separate `ray start` processes, each with its own raylet, CPUs and worker pool, attached to
over a real address exactly as `ccn run --address` does; `cluster_utils` starts its nodes from
the driver's process and is Ray's testing tool. The head declares 0 CPUs, so every actor runs
on a worker node (one actor per CPU: N x C actors). The nodes' workers run at niceness 0 (as an
embedded `ccn run` does; Ray's default is 15), unless $RAY_worker_niceness says otherwise.

The sweep: the paper's trace patterning, one learner shape (default columnar 7:7:inf), eight
step sizes x runs/8 seeds, `steps` steps each, cut into runs/batch_size batches of one static
signature (so one compiled program). The default 12 batches give 12, 6 and 4 batches per actor
on 1, 2 and 3 nodes. Every node count runs the identical sweep into fresh results.

Compilation: every actor of every sweep uses one persistent JAX compilation cache in a temporary
folder, warmed first by a one-chunk sweep of the same program (same batch size and log interval,
so the same compiled chunk) on the first cluster; the actors of the measured sweeps then load the
program from the cache (tracing and loading: a few seconds for the first batch of each actor),
which counts as their compute.

Definitions (printed with the figures):
  wall             seconds of api.run_sweep(spec, address=...): attach to the cluster, plan, start
                   the actors, run and write every batch, stop the actors, detach
  learner-steps    runs x steps (no padding: --runs must be a multiple of --batch-size)
  speed-up         learner-steps/s over the smallest node count's (normally 1 node)
  actor compute    the sum over batches of each batch's executor seconds (program load or compile,
                   every chunk, metrics), measured inside the actors: the `wall_seconds` the
                   batches wrote to the results (what SweepOutcome.actor_compute_seconds sums)
  overhead/batch   (wall x actors - actor compute) / batches: everything that is not compute,
                   per batch (actor start and JAX import, Ray scheduling, Parquet writes, idle
                   actors at the end when the batches do not divide evenly)
  start-up         seconds from the run_sweep call to the first batch starting in an actor
  compiled         programs the sweep added to the persistent cache (0: every actor loaded them)
  concurrency      from the batches' start and end times (finished_at - wall_seconds): the mean
                   number of batches computing between the first start and the last end, and the
                   most at any moment (should be the number of actors)
Cluster start-up is reported separately (a cluster is normally already up).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# Keep this file's own folder off the import path (benchmarks/orchestrator.py shadows the package).
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

STEP_SIZES = [0.03, 0.01, 0.003, 0.001, 0.0003, 0.0001, 0.00003, 0.00001]
QUICK = {"runs": 16, "steps": 20_000, "batch_size": 4, "nodes": "1,2"}
FULL = {"runs": 192, "steps": 80_000, "batch_size": 16, "nodes": "1,2,3"}


def machine() -> str:
    import jax
    import ray

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{model} ({platform.machine()}), {usable} usable cores of {os.cpu_count()}; "
        f"jax {jax.__version__} ({jax.default_backend()}), ray {ray.__version__}, python {platform.python_version()}; "
        f"load average {load}"
    )


def write_spec(
    path: Path, name: str, step_sizes: list[float], seeds: int, steps: int, log_every: int, shape: str, batch_size: int
) -> Path:
    """A sweep of len(step_sizes) x seeds runs of one static signature."""
    path.write_text(
        textwrap.dedent(f"""
        name = "{name}"
        steps = {steps}
        seeds = {seeds}
        log_every = {log_every}
        batch_size = {batch_size}
        [[tasks]]
        kind = "trace_patterning"
        variant = "paper"
        [[learners]]
        kind = "ccn"
        shape = "{shape}"
        step_size = {step_sizes}
        """)
    )
    return path


def batch_intervals(results: str, sweep: str) -> list[tuple[float, float]]:
    """(start, end) epoch seconds of each batch's executor run, from the `runs` rows it wrote."""
    from orchestrator.results import ResultsStore

    data = ResultsStore(results, sweep).dataset("runs")
    if data is None:
        return []
    table = data.to_table(columns=["batch_key", "wall_seconds", "finished_at"])
    batches = {}
    for key, wall, finished in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
        batches[key] = (finished.timestamp() - wall, finished.timestamp())
    return sorted(batches.values())


def concurrency(intervals: list[tuple[float, float]]) -> tuple[float, int]:
    """(mean batches computing between the first start and the last end, most at any moment)."""
    if not intervals:
        return 0.0, 0
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    busy = sum(end - start for start, end in intervals)
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in events:  # an end sorts before a start at the same instant
        running += change
        most = max(most, running)
    return (busy / span if span > 0 else float(len(intervals))), most


def cache_entries(cache: str) -> int:
    """Programs in the persistent compilation cache (JAX also keeps an access-time file per entry)."""
    folder = Path(cache)
    return sum(not path.name.endswith("-atime") for path in folder.iterdir()) if folder.is_dir() else 0


def clean_ray_env() -> None:
    """Ray lets $RAY_ADDRESS override an explicit address, and an earlier in-process ray.init may leave
    RAY_AUTH_MODE=token behind; the local cluster runs without token authentication."""
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_AUTH_MODE", None)


def measure(
    nodes: int, arguments, folder: Path, spec: Path, cache: str, warmup: Path | None, learner_steps: int
) -> dict:
    import ray

    from cluster import local
    from orchestrator import api

    state = folder / f"cluster-{nodes}.json"
    row: dict = {"nodes": nodes}
    try:
        clean_ray_env()
        started = time.perf_counter()
        # no token auth (auth=False): this process attaches in-process, in the mode of its first ray.init
        cluster = local.up(nodes, arguments.cpus_per_node, state=state, temp_dir=folder / f"ray-{nodes}", auth=False)
        row["cluster_up"] = time.perf_counter() - started
        print(f"{nodes} node(s) up at {cluster.address} in {row['cluster_up']:.1f} s", flush=True)

        if warmup is not None:
            clean_ray_env()
            started = time.perf_counter()
            report = api.run_sweep(
                warmup,
                str(folder / "warmup-results"),
                address=cluster.address,
                batch_size=arguments.batch_size,
                compilation_cache_dir=cache,
                progress=False,
            )
            assert report.ok and report.ran == arguments.batch_size, report
            print(
                f"  compilation cache warmed in {time.perf_counter() - started:.1f} s "
                f"({cache_entries(cache)} programs)",
                flush=True,
            )

        results = str(folder / f"results-{nodes}")
        cached = cache_entries(cache)
        clean_ray_env()
        started_epoch, started = time.time(), time.perf_counter()
        report = api.run_sweep(
            spec,
            results,
            address=cluster.address,
            batch_size=arguments.batch_size,
            compilation_cache_dir=cache,
            progress=sys.stderr if arguments.progress else False,
        )
        wall = time.perf_counter() - started
        if report.interrupted:
            raise KeyboardInterrupt
        assert report.ok and report.ran == arguments.runs, report

        intervals = batch_intervals(results, "scaling")
        compute = [end - start for start, end in intervals]
        actors = report.actors_used
        mean_running, most_running = concurrency(intervals)
        row.update(
            wall=wall,
            actors=actors,
            workers=report.workers,
            batches=len(intervals),
            learner_steps=learner_steps,
            rate=learner_steps / wall,
            compute=sum(compute),
            busiest=report.busiest_actor_compute_seconds,
            batch_first=max(compute[: max(1, actors)]),  # the first batch per actor loads the program
            batch_median=statistics.median(compute[actors:] or compute),
            overhead_per_batch=(wall * actors - sum(compute)) / len(intervals),
            startup=min(start for start, _ in intervals) - started_epoch,
            mean_running=mean_running,
            most_running=most_running,
            compiled=cache_entries(cache) - cached,
        )
        print(
            f"  sweep: {wall:.1f} s, {row['rate'] / 1e6:.3f}M learner-steps/s on {actors} actors "
            f"({len(intervals)} batches, mean {mean_running:.2f} / most {most_running} computing at once; "
            f"{row['compiled']} programs compiled, not from the cache)",
            flush=True,
        )
        return row
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if state.exists():
            started = time.perf_counter()
            local.down(state)
            print(f"  {nodes} node(s) down in {time.perf_counter() - started:.1f} s", flush=True)


def table(rows: list[dict], cpus_per_node: int) -> str:
    base = rows[0]
    header = [
        "nodes",
        "actors",
        "batches",
        "wall s",
        "learner-steps",
        "learner-steps/s",
        "speed-up",
        "actor compute s",
        "overhead s / batch",
        "start-up s",
        "batch s (first, median)",
        "batches at once (mean, most)",
        "cluster up s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            f"{row['nodes']} x {cpus_per_node} CPU",
            str(row["actors"]),
            str(row["batches"]),
            f"{row['wall']:.1f}",
            f"{row['learner_steps'] / 1e6:.1f}M",
            f"{row['rate']:,.0f}",
            f"{row['rate'] / base['rate']:.2f}x",
            f"{row['compute']:.1f}",
            f"{row['overhead_per_batch']:.2f}",
            f"{row['startup']:.1f}",
            f"{row['batch_first']:.1f}, {row['batch_median']:.1f}",
            f"{row['mean_running']:.2f}, {row['most_running']}",
            f"{row['cluster_up']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # stop like Ctrl-C: every `finally` below stops its cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default=None, help=f"comma-separated node counts (default {FULL['nodes']})")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--runs", type=int, default=None, help=f"multiple of 8 and of --batch-size ({FULL['runs']})")
    parser.add_argument("--steps", type=int, default=None, help=f"steps per run ({FULL['steps']:,})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"runs per batch ({FULL['batch_size']})")
    parser.add_argument("--shape", default="7:7:inf", help="CCN shape (7:7:inf: columnar 7)")
    parser.add_argument("--quick", action="store_true", help=f"tiny smoke check: {QUICK}")
    parser.add_argument("--progress", action="store_true", help="show the sweep's progress line")
    arguments = parser.parse_args()
    defaults = QUICK if arguments.quick else FULL
    for name in ("runs", "steps", "batch_size", "nodes"):
        if getattr(arguments, name) is None:
            setattr(arguments, name, defaults[name])
    node_counts = [int(part) for part in str(arguments.nodes).split(",") if part.strip()]
    if not node_counts or min(node_counts) < 1 or arguments.cpus_per_node < 1:
        raise SystemExit("--nodes must list positive node counts and --cpus-per-node must be at least 1")
    if arguments.runs % len(STEP_SIZES) or arguments.runs % arguments.batch_size:
        raise SystemExit(f"--runs must be a multiple of {len(STEP_SIZES)} and of --batch-size (no padded runs)")
    log_every = min(arguments.steps, 10_000)
    if arguments.steps % log_every:
        raise SystemExit(f"--steps must be a multiple of {log_every}")
    batches = arguments.runs // arguments.batch_size
    for nodes in node_counts:
        actors = nodes * arguments.cpus_per_node
        if batches % actors:
            print(f"note: {batches} batches do not divide over {actors} actors; the idle tail counts as overhead")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if max(node_counts) * arguments.cpus_per_node > cores:
        print(
            f"note: {max(node_counts) * arguments.cpus_per_node} actors on {cores} cores: beyond {cores} actors "
            "the nodes share cores, so no speed-up is expected there"
        )

    os.environ.setdefault("RAY_worker_niceness", "0")  # the nodes inherit it: actors at normal priority
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    signal.signal(signal.SIGTERM, _terminate)

    learner_steps = arguments.runs * arguments.steps
    print(f"machine: {machine()}")
    print(
        f"sweep: {arguments.runs} runs of ccn {arguments.shape} x {arguments.steps:,} steps of trace patterning "
        f"({learner_steps / 1e6:.1f}M learner-steps), {batches} batches of {arguments.batch_size}; "
        f"nodes {node_counts} x {arguments.cpus_per_node} CPU",
        flush=True,
    )

    folder = Path(tempfile.mkdtemp(prefix="ccn-scaling-"))
    rows: list[dict] = []
    try:
        spec = write_spec(
            folder / "scaling.toml",
            "scaling",
            STEP_SIZES,
            arguments.runs // len(STEP_SIZES),
            arguments.steps,
            log_every,
            arguments.shape,
            arguments.batch_size,
        )
        # one batch of the same size, one chunk: the same compiled programs as the sweep's batches
        warmup = write_spec(
            folder / "warmup.toml",
            "warmup",
            STEP_SIZES[:1],
            arguments.batch_size,
            log_every,
            log_every,
            arguments.shape,
            arguments.batch_size,
        )
        cache = str(folder / "jax_cache")
        for index, nodes in enumerate(node_counts):
            rows.append(measure(nodes, arguments, folder, spec, cache, warmup if index == 0 else None, learner_steps))
    except KeyboardInterrupt:
        print("interrupted; every cluster started here is stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print()
    print(table(rows, arguments.cpus_per_node))
    print()
    print(
        "overhead s / batch = (wall x actors - actor compute) / batches; start-up: run_sweep call to the first "
        "batch computing; batch s: executor seconds of one batch (the first per actor loads the program)"
    )


if __name__ == "__main__":
    main()
