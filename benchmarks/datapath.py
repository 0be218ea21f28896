"""Data path: one large batch from the device to Parquet, at two logging intervals (issue 15, item 4).

    python benchmarks/datapath.py [--runs 4096] [--steps 200000 400000] [--log-every 1000 100000]
                                  [--checkpoint-every 100000] [--step-size 0.001] [--quick]

One batch of `--runs` runs of columnar 7:7 (`ccn`, shape "7:7:inf") on trace patterning (the
paper variant), run through the public executor API as a CPU actor runs it
(`orchestrator.execute.BatchExecutor().tables(batch, checkpoints=store, checkpoint_every=...)`,
then `ResultsStore.write_batch`, on one core: XLA_FLAGS as the CPU actors', pinned), for every
`--steps` x `--log-every`, each in a fresh process (its own peak memory and CPU clocks),
one after the other. --quick: 64 runs, 20,000 and 40,000 steps, log_every 1,000 vs 10,000,
a checkpoint every 10,000 steps (a smoke test; explicit flags override it).

Columns (one row per configuration):
  wall s            executor (compile + chunks + checkpoints) and the Parquet write, end to end
  compile s         JAX tracing, lowering and XLA compilation (jax.monitoring), inside wall
  Msteps/s          learner-steps per second of wall time
  round trips       the executor's host round-trip counter (`host_round_trips` or `round_trips`;
                    n/a where the executor has none)
  host CPU s        CPU seconds of the driver's main thread: Python and host work outside the
                    compiled programs (XLA runs them on its own threads; compilation too, but
                    tracing and lowering count here)
  process CPU s     CPU seconds of the whole process (the compiled programs included)
  results B         bytes of the batch's runs + metrics Parquet files
  ckpts, ckpt B     checkpoints written and their bytes (each .ckpt as written, plus any
                    metric segments written beside it), read from the results folder
  B/ckpt            checkpoint bytes per checkpoint: constant over --steps when checkpoint
                    bytes grow linearly with a run's length
  peak RSS MB       the process's peak resident memory (ru_maxrss: JAX's runtime included;
                    `base` is the RSS before the batch starts)
Then the wall-time ratio of the smallest to the largest log_every (target: <= 1.10) and, per
log_every, bytes per checkpoint at each length (linear growth: the same at every length).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# benchmarks/orchestrator.py is named like the package measured here: keep this folder off the import path.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

SHAPE = "7:7:inf"
QUICK = {"runs": 64, "steps": [20_000, 40_000], "log_every": [1_000, 10_000], "checkpoint_every": 10_000}
DEFAULTS = {"runs": 4096, "steps": [200_000, 400_000], "log_every": [1_000, 100_000], "checkpoint_every": 100_000}
LINEAR_TOLERANCE = 1.10  # bytes per checkpoint may differ this much between lengths and still count as linear
WALL_TARGET = 1.10  # issue 15: log_every 1,000 costs at most 10% more wall time than 100,000
MARK = "DATAPATH-RESULT "  # a child's one line of results on stdout
COLUMNS = ("steps", "log_every", "wall s", "compile s", "Msteps/s", "round trips", "host CPU s", "process CPU s",
           "results B", "ckpts", "ckpt B", "B/ckpt", "peak RSS MB", "base RSS MB")


def write_spec(folder: Path, runs: int, steps: int, log_every: int, checkpoint_every: int, step_size: float) -> Path:
    path = folder / f"datapath-{steps}-{log_every}.toml"
    path.write_text(textwrap.dedent(f"""
        name = "datapath"
        steps = {steps}
        seeds = {runs}
        log_every = {log_every}
        checkpoint_every = {checkpoint_every}
        batch_size = {runs}

        [[tasks]]
        kind = "trace_patterning"

        [[learners]]
        kind = "ccn"
        shape = "{SHAPE}"
        step_size = {step_size!r}
        """))
    return path


def child(config: dict) -> dict:
    """Run one configuration in this process; the measurements as a dict."""
    if config.get("core") is not None:  # one core, as a CPU actor (schedule.claim_core; no lock taken here)
        os.sched_setaffinity(0, {config["core"]})
    import jax.monitoring

    from orchestrator.execute import BatchExecutor
    from orchestrator.plan import plan_batches
    from orchestrator.results import ResultsStore
    from orchestrator.spec import load_spec

    compile_seconds = [0.0]

    def on_duration(event: str, duration: float, **_):
        if event.startswith("/jax/core/compile/"):
            compile_seconds[0] += duration

    jax.monitoring.register_event_duration_secs_listener(on_duration)

    class MeasuredStore(ResultsStore):
        """A real results store that notes the size of every checkpoint file it writes."""

        checkpoints, checkpoint_bytes = 0, 0

        def write_checkpoint(self, batch_key, data):
            written = super().write_checkpoint(batch_key, data)
            if written:
                self.checkpoints += 1
                self.checkpoint_bytes += self.filesystem.get_file_info(self.checkpoint_path(batch_key)).size
            return written

        def write_segment(self, batch_key, name, *args, **kwargs):  # metric segments beside a checkpoint
            written = super().write_segment(batch_key, name, *args, **kwargs)
            if written:
                self.checkpoint_bytes += self.filesystem.get_file_info(self.segment_path(batch_key, name)).size
            return written

    folder = Path(config["folder"])
    sweep = load_spec(Path(config["spec"]))
    [batch] = plan_batches(sweep.name, sweep.runs, workers=1, batch_size=len(sweep.runs))
    store = MeasuredStore(str(folder / "results"), sweep.name)
    executor = BatchExecutor(None)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
    runs, metrics = executor.tables(batch, checkpoints=store, checkpoint_every=sweep.checkpoint_every)
    store.write_batch(batch.learner, batch.task, batch.batch_key, runs, metrics)
    wall, thread, process = (time.perf_counter() - wall, time.thread_time() - thread, time.process_time() - process)
    results_bytes = sum(
        store.filesystem.get_file_info(store.batch_path(table, batch.learner, batch.task, batch.batch_key)).size
        for table in ("runs", "metrics")
    )
    trips = getattr(executor, "host_round_trips", getattr(executor, "round_trips", None))
    return {
        "steps": batch.runs[0].steps,
        "log_every": batch.runs[0].log_every,
        "runs": len(batch.runs),
        "wall": wall,
        "compile": compile_seconds[0],
        "host_cpu": thread,
        "process_cpu": process,
        "round_trips": trips if isinstance(trips, int) else None,
        "results_bytes": results_bytes,
        "checkpoints": store.checkpoints,
        "checkpoint_bytes": store.checkpoint_bytes,
        "metric_rows": metrics.num_rows,
        "diverged": sum(status == "diverged" for status in runs.column("status").to_pylist()),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "base_rss": base_rss * 1024,
    }


def run_child(spec: Path, folder: Path, core: int | None) -> dict:
    """One configuration in a fresh process (as a CPU actor: single-threaded XLA, pinned to `core`)."""
    from orchestrator.schedule import CPU_ACTOR_XLA_FLAGS

    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", CPU_ACTOR_XLA_FLAGS)
    env.setdefault("JAX_PLATFORMS", "cpu")
    config = json.dumps({"spec": str(spec), "folder": str(folder), "core": core})
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", config],
        capture_output=True, text=True, env=env,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(MARK)]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"datapath: the configuration {spec.name} failed (exit {completed.returncode})")
    return json.loads(lines[-1][len(MARK):])


def format_row(result: dict) -> list[str]:
    per_checkpoint = result["checkpoint_bytes"] / result["checkpoints"] if result["checkpoints"] else None
    return [
        f"{result['steps']:,}",
        f"{result['log_every']:,}",
        f"{result['wall']:.2f}",
        f"{result['compile']:.2f}",
        f"{result['runs'] * result['steps'] / result['wall'] / 1e6:.2f}",
        "n/a" if result["round_trips"] is None else f"{result['round_trips']:,}",
        f"{result['host_cpu']:.2f}",
        f"{result['process_cpu']:.2f}",
        f"{result['results_bytes']:,}",
        f"{result['checkpoints']}",
        f"{result['checkpoint_bytes']:,}",
        "n/a" if per_checkpoint is None else f"{per_checkpoint:,.0f}",
        f"{result['peak_rss'] / 2**20:.0f}",
        f"{result['base_rss'] / 2**20:.0f}",
    ]


def summary(results: list[dict]) -> list[str]:
    """The wall-time ratios and the checkpoint-growth verdict."""
    lines = []
    intervals = sorted({r["log_every"] for r in results})
    lengths = sorted({r["steps"] for r in results})
    by = {(r["steps"], r["log_every"]): r for r in results}
    if len(intervals) > 1:
        small, large = intervals[0], intervals[-1]
        for steps in lengths:
            a, b = by[(steps, small)], by[(steps, large)]
            ratio = a["wall"] / b["wall"]
            steady = (a["wall"] - a["compile"]) / max(b["wall"] - b["compile"], 1e-9)
            verdict = "meets" if ratio <= WALL_TARGET else "misses"
            lines.append(
                f"wall ratio log_every {small:,} / {large:,} at {steps:,} steps: {ratio:.3f} "
                f"(without compilation {steady:.3f}); {verdict} the target <= {WALL_TARGET:.2f}"
            )
    for log_every in intervals:
        sizes = [(steps, by[(steps, log_every)]) for steps in lengths]
        per = [(steps, r["checkpoint_bytes"] / r["checkpoints"]) for steps, r in sizes if r["checkpoints"]]
        text = ", ".join(f"{value:,.0f} at {steps:,} steps" for steps, value in per)
        if len(per) < 2:
            lines.append(f"bytes per checkpoint, log_every {log_every:,}: {text or 'no checkpoints'} "
                         "(linearity: needs checkpoints at two lengths)")
            continue
        growth = max(value for _, value in per) / min(value for _, value in per)
        verdict = "linearly with steps" if growth <= LINEAR_TOLERANCE else "faster than linearly with steps"
        lines.append(f"bytes per checkpoint, log_every {log_every:,}: {text}: x{growth:.2f}; "
                     f"checkpoint bytes grow {verdict}")
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, help=f"runs in the batch (default {DEFAULTS['runs']})")
    parser.add_argument("--steps", type=int, nargs="+", help=f"run lengths (default {DEFAULTS['steps']})")
    parser.add_argument("--log-every", type=int, nargs="+", help=f"logging intervals (default {DEFAULTS['log_every']})")
    parser.add_argument("--checkpoint-every", type=int,
                        help=f"steps between checkpoints (default {DEFAULTS['checkpoint_every']})")
    parser.add_argument("--step-size", type=float, default=0.001, help="every run's step size (default 0.001)")
    parser.add_argument("--core", type=int, help="the core to pin each configuration to (default: the lowest "
                        "this process may use; -1: not pinned)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke-test configuration: {QUICK}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    base = QUICK if arguments.quick else DEFAULTS
    for name, value in base.items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, value)
    if arguments.child is None:
        problems = [f"--{name.replace('_', '-')}: must be positive, got {value}"
                    for name in ("runs", "checkpoint_every")
                    if (value := getattr(arguments, name)) <= 0]
        problems += [f"--{name.replace('_', '-')}: must be positive, got {value}"
                     for name in ("steps", "log_every") for value in getattr(arguments, name) if value <= 0]
        if arguments.core is not None and arguments.core != -1 and arguments.core not in os.sched_getaffinity(0):
            problems.append(f"--core: {arguments.core} is not one of this process's cores "
                            f"{sorted(os.sched_getaffinity(0))} (or -1: not pinned)")
        if problems:
            parser.error("; ".join(problems))
    return arguments


def main(argv: list[str] | None = None) -> None:
    arguments = parse(argv)
    if arguments.child is not None:
        print(MARK + json.dumps(child(json.loads(arguments.child))), flush=True)
        return

    from orchestrator.spec import SpecError, load_spec

    folder = Path(tempfile.mkdtemp(prefix="ccn-datapath-"))
    try:
        configurations = []
        for steps in arguments.steps:
            for log_every in arguments.log_every:
                spec = write_spec(folder, arguments.runs, steps, log_every, arguments.checkpoint_every,
                                  arguments.step_size)
                try:
                    load_spec(spec)  # every configuration is checked before any runs
                except SpecError as error:
                    raise SystemExit(f"datapath: steps {steps:,}, log_every {log_every:,}: {error}") from None
                configurations.append(spec)
        core = arguments.core if arguments.core is not None else min(os.sched_getaffinity(0))
        core = None if core < 0 else core
        load = os.getloadavg()
        print(f"one batch of {arguments.runs:,} runs of columnar {SHAPE} (ccn) on trace_patterning (paper), "
              f"checkpoint every {arguments.checkpoint_every:,} steps, step size {arguments.step_size:g}; "
              f"each configuration in a fresh process, " + ("unpinned" if core is None else f"pinned to core {core}")
              + f"; load average {load[0]:.2f} {load[1]:.2f} (1, 5 min)")
        results = []
        for spec in configurations:
            results.append(run_child(spec, folder / spec.stem, core))
            shutil.rmtree(folder / spec.stem, ignore_errors=True)
        rows = [list(COLUMNS)] + [format_row(result) for result in results]
        widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
        print()
        for index, row in enumerate(rows):
            print("| " + " | ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) + " |")
            if index == 0:
                print("|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|")
        print()
        for result in results:
            if result["diverged"]:
                print(f"note: {result['diverged']} runs diverged at steps {result['steps']:,}, log_every "
                      f"{result['log_every']:,} (they log no more rows)")
        for line in summary(results):
            print(line)
        load = os.getloadavg()
        print(f"load average at the end: {load[0]:.2f} {load[1]:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
