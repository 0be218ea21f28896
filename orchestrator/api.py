"""The Python API behind the `ccn` CLI: scripts and notebooks call these directly.

    from orchestrator import api
    report = api.run_sweep("sweeps/demo.toml", results="results")   # resumable; exactly-once rows
    status = api.sweep_status("sweeps/demo.toml", results="results")
    table = api.compare("sweeps/demo.toml", results="results")       # best setting per learner

Every function validates the spec first (SpecError lists every problem) and touches nothing
before that. The results alone say what is done: rerunning a sweep runs only what is missing.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from orchestrator.checkpoint import resumable_batches
from orchestrator.plan import Batch, plan_batches
from orchestrator.results import ResultsStore, RunRecord
from orchestrator.runs import Run
from orchestrator.spec import Sweep, load_spec

DEFAULT_RESULTS = "results"
WANDB_MODES = ("disabled", "offline", "online")
STAGES = ("select", "evaluate")


def _sweep(spec: str | Path | Sweep) -> Sweep:
    return spec if isinstance(spec, Sweep) else load_spec(spec)


@dataclasses.dataclass
class SweepPlan:
    """What a run of the sweep would do now: the runs still missing, cut into batches."""

    sweep: Sweep
    results: str
    done: dict[str, RunRecord]  # run_key -> record, for this spec's runs already in the results
    todo: list[Run]
    batches: list[Batch]
    workers: int
    accelerator: str

    def describe(self) -> str:
        signatures = len({batch.signature for batch in self.batches})
        sizes = sorted({batch.padded_size for batch in self.batches})
        return (
            f"sweep {self.sweep.name!r}: {len(self.sweep.runs)} runs, {len(self.done)} already done, "
            f"{len(self.todo)} to run in {len(self.batches)} batches (sizes {sizes or '-'}) of "
            f"{signatures} compiled programs on {self.workers} {self.accelerator} workers"
        )


def plan_sweep(
    spec: str | Path | Sweep,
    results: str = DEFAULT_RESULTS,
    *,
    workers: int = 1,
    accelerator: str = "cpu",
    batch_size: int | None = None,
) -> SweepPlan:
    """Validate the spec, read what is done from the results, and batch the rest."""
    sweep = _sweep(spec)
    store = ResultsStore(results, sweep.name)
    completed = store.completed_runs()
    done = {run.run_key: completed[run.run_key] for run in sweep.runs if run.run_key in completed}
    todo = [run for run in sweep.runs if run.run_key not in done]
    batches = plan_batches(
        sweep.name,
        todo,
        workers=workers,
        batch_size=batch_size or sweep.batch_size,
        accelerator=accelerator,
        resumable=resumable_batches(store),
    )
    return SweepPlan(sweep, results, done, todo, batches, workers, accelerator)


@dataclasses.dataclass
class SweepReport:
    """The result of `run_sweep`: counts over the whole sweep after this invocation."""

    sweep: str
    results: str
    total: int
    already_done: int
    ran: int
    diverged: int
    failed: int
    interrupted: bool
    seconds: float
    workers: int
    actors_used: int
    failures: list[dict[str, Any]]
    busiest_actor_compute_seconds: float = 0.0  # executor time (compile + chunks) of the busiest actor
    node_batches: dict[str, int] = dataclasses.field(default_factory=dict)  # Ray node id -> batches finished
    resumed_batches: int = 0  # batches that continued from a checkpoint
    stopped: str | None = None  # why the sweep stopped with runs left (its actors cannot start)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted and not self.stopped


def run_sweep(
    spec: str | Path | Sweep,
    results: str = DEFAULT_RESULTS,
    *,
    address: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    max_attempts: int | None = None,
    wandb: str | None = "disabled",
    compilation_cache_dir: str | None = None,
    progress: bool | TextIO = True,
    stage: str = "select",
) -> SweepReport:
    """Run every run of the spec that the results do not hold yet, on Ray.

    stage: "select" runs the spec's grid; "evaluate" runs each learner's winner on fresh seeds
    (`evaluation_sweep`), into the results folder `<name>.evaluation`.

    address: a Ray cluster (HOST:PORT, ray://HOST:PORT or "auto"); None starts an embedded local
    Ray with `workers` CPUs (default: all cores) and stops it at the end. batch_size overrides the
    automatic batch size (and the spec's). wandb: disabled | offline | online, or None for
    tracking.default_mode() (orchestrator.tracking; W&B errors are warnings). progress: True
    (stderr), False, or a text stream.
    Raises SpecError (bad spec) or schedule.ClusterError (unreachable cluster) before any compute.
    """
    import time

    from orchestrator import schedule, tracking
    from orchestrator.execute import default_compilation_cache_dir
    from orchestrator.progress import Progress

    wandb = wandb or tracking.default_mode()
    if wandb not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {', '.join(WANDB_MODES)}, got {wandb!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    sweep = _sweep(spec)
    if stage == "evaluate":
        sweep = evaluation_sweep(sweep, results)
    if address:
        schedule.check_address(address)
    started = time.perf_counter()
    store = ResultsStore(results, sweep.name)
    store.remove_orphans()
    preview = plan_sweep(sweep, results, batch_size=batch_size)
    outcome = schedule.SweepOutcome()
    if preview.todo:
        import ray

        we_started = schedule.connect(address, workers)
        try:
            actors = schedule.cluster_workers()
            if workers and not address:
                actors = dataclasses.replace(actors, cpu=min(actors.cpu, workers))
            plan = plan_sweep(
                sweep, results, workers=actors.planned, accelerator=actors.accelerator, batch_size=batch_size
            )
            stream = progress if hasattr(progress, "write") else sys.stderr
            display = Progress(len(plan.todo), sum(b.learner_steps for b in plan.batches), stream) if progress else None
            if display:
                merging = f"; {actors.gpu} GPU workers merge them" if actors.gpu and actors.accelerator == "cpu" else ""
                display.message(plan.describe() + merging)
            tracker = tracking.Tracker.start(wandb, results, sweep.name)
            if tracker and display:
                display.message(f"W&B: {wandb}, runs in {tracker.dir}")
            outcome = schedule.run_batches(
                plan.batches,
                results,
                sweep.name,
                workers=actors,
                max_attempts=max_attempts or sweep.max_attempts,
                compilation_cache_dir=compilation_cache_dir or default_compilation_cache_dir(),
                checkpoint_every=sweep.checkpoint_every,
                progress=display,
                on_batch_done=tracker.batch_done if tracker else None,
            )
            if tracker:
                tracker.close(timeout=5.0 if outcome.interrupted else 60.0)
            if display:
                display.close()
        finally:
            if we_started:
                ray.shutdown()
    return SweepReport(
        sweep=sweep.name,
        results=results,
        total=len(sweep.runs),
        already_done=len(preview.done),
        ran=outcome.runs_done,
        diverged=outcome.runs_diverged + sum(r.status == "diverged" for r in preview.done.values()),
        failed=outcome.runs_failed,
        interrupted=outcome.interrupted,
        seconds=time.perf_counter() - started,
        workers=outcome.workers,
        actors_used=len(outcome.actor_compute_seconds),
        failures=outcome.failed_batches,
        busiest_actor_compute_seconds=max(outcome.actor_compute_seconds.values(), default=0.0),
        node_batches=dict(outcome.node_batches),
        resumed_batches=outcome.resumed_batches,
        stopped=outcome.stopped,
    )


# -- the evaluation stage -------------------------------------------------------------------


def evaluation_sweep(spec: str | Path | Sweep, results: str = DEFAULT_RESULTS, criterion: str = "final_error") -> Sweep:
    """The evaluation stage of a finished selection sweep: each learner's winner on fresh seeds.

    Winners are chosen by analysis.select (docs/analysis.md) from the selection results alone; the
    seeds are `sweep.evaluation_seed_list` (after the largest selection seed, so disjoint from them).
    The returned Sweep is named `<name>.evaluation`: its results live beside the selection's.
    Raises ValueError when the selection stage is not finished or has no eligible winner.
    """
    import analysis

    sweep = _sweep(spec)
    missing = plan_sweep(sweep, results).todo
    if missing:
        raise ValueError(
            f"sweep {sweep.name!r}: {len(missing)} selection runs are not done yet; "
            f"finish them first (ccn run {sweep.path}) so the winners are chosen on every seed"
        )
    by_key = {run.run_key: run for run in sweep.runs}
    runs = []
    for winner in analysis.select(analysis.load(results, sweep.name), criterion):
        chosen = next((by_key[key] for key in winner["run_keys"] if key in by_key), None)
        if chosen is not None:
            runs += [dataclasses.replace(chosen, seed=seed) for seed in sweep.evaluation_seed_list]
    if not runs:
        raise ValueError(
            f"sweep {sweep.name!r}: no learner has a setting that finished every seed; nothing to evaluate"
        )
    return dataclasses.replace(
        sweep, name=sweep.name + analysis.EVALUATION_SUFFIX, seeds=sweep.evaluation_seed_list, runs=tuple(runs)
    )


@dataclasses.dataclass
class SweepStatus:
    """Done / missing / diverged / failed runs of a spec, from the results alone."""

    sweep: str
    total: int
    complete: int
    diverged: int
    failed: int
    missing: int
    failures: list[dict[str, Any]]  # failure records touching this spec's missing runs
    duplicates: list[str]  # run keys with more than one row (should always be empty)
    by_group: list[dict[str, Any]]  # per task and learner
    batches_without_metrics: list[str] = dataclasses.field(default_factory=list)  # should always be empty

    @property
    def done(self) -> int:
        return self.complete + self.diverged

    def describe(self) -> str:
        lines = [
            f"sweep {self.sweep!r}: {self.total} runs: {self.done} done ({self.complete} complete, "
            f"{self.diverged} diverged), {self.missing} missing, {self.failed} failed"
        ]
        width = max((len(g["task"]) + len(g["learner"]) for g in self.by_group), default=10) + 3
        for group in self.by_group:
            label = f"{group['task']} / {group['learner']}"
            lines.append(
                f"  {label:<{width}} {group['done']:>5}/{group['total']:<5} done  {group['diverged']:>4} diverged"
                f"  {group['missing']:>5} missing  {group['failed']:>4} failed"
            )
        for failure in self.failures:
            lines.append(
                f"  failed batch {failure['batch_key'][:12]} after {failure['attempts']} tries: {failure['error']}"
            )
        if self.duplicates:
            lines.append(f"  WARNING: {len(self.duplicates)} runs have more than one row (two drivers at once?)")
        if self.batches_without_metrics:
            lines.append(
                f"  WARNING: {len(self.batches_without_metrics)} batches have a runs file but no metrics file "
                f"(deleted outside ccn?); delete their runs files to rerun them: "
                + ", ".join(key[:12] for key in self.batches_without_metrics)
            )
        return "\n".join(lines)


def sweep_status(spec: str | Path | Sweep, results: str = DEFAULT_RESULTS) -> SweepStatus:
    """What the results hold for the spec's runs (reads only the results)."""
    sweep = _sweep(spec)
    store = ResultsStore(results, sweep.name)
    completed = store.completed_runs()
    failures = store.failures()
    failed_keys = {key for failure in failures for key in failure["run_keys"]} - completed.keys()
    spec_keys = {run.run_key for run in sweep.runs}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for run in sweep.runs:
        group = groups.setdefault(
            (run.task.name, run.learner_name),
            {
                "task": run.task.name,
                "learner": run.learner_name,
                "total": 0,
                "done": 0,
                "diverged": 0,
                "missing": 0,
                "failed": 0,
            },
        )
        group["total"] += 1
        record = completed.get(run.run_key)
        if record is not None:
            group["done"] += 1
            group["diverged"] += record.status == "diverged"
        elif run.run_key in failed_keys:
            group["failed"] += 1
        else:
            group["missing"] += 1
    total = lambda key: sum(group[key] for group in groups.values())  # noqa: E731
    return SweepStatus(
        sweep=sweep.name,
        total=len(sweep.runs),
        complete=total("done") - total("diverged"),
        diverged=total("diverged"),
        failed=total("failed"),
        missing=total("missing"),
        failures=[f for f in failures if spec_keys & (set(f["run_keys"]) - completed.keys())],
        duplicates=store.duplicate_run_keys(),
        by_group=list(groups.values()),
        batches_without_metrics=store.batches_without_metrics(),
    )


def compare(spec: str | Path | Sweep, results: str = DEFAULT_RESULTS, metric: str = "msre_window") -> list[dict]:
    """The best hyperparameter setting of each learner shape on each task, by final `metric`.

    For every (task, learner name, shape) and every setting of its hyperparameters, the final
    logged `metric` is averaged over seeds; the setting with the lowest mean among those with no
    diverged seed wins. Rows: task, learner, shape, flops_per_step, setting, seeds, mean,
    standard error, diverged (runs of that learner shape that diverged), settings (how many).
    """
    import duckdb

    from orchestrator.schema import LEARNER_SETTING_COLUMNS, METRIC_COLUMNS

    if metric not in METRIC_COLUMNS:
        raise ValueError(f"unknown metric {metric!r}; the results hold {', '.join(METRIC_COLUMNS)}")
    sweep = _sweep(spec)
    store = ResultsStore(results, sweep.name)
    runs_data, metrics_data = store.dataset("runs"), store.dataset("metrics")
    if runs_data is None:
        return []
    runs_table = runs_data.to_table()  # noqa: F841 - queried by DuckDB by name
    metrics_table = metrics_data.to_table(columns=["run_key", "step", metric]) if metrics_data else None  # noqa: F841
    spec_keys = [run.run_key for run in sweep.runs]  # noqa: F841
    hyper = [
        c
        for c in LEARNER_SETTING_COLUMNS
        if c not in ("total_columns", "columns_per_stage", "steps_per_stage", "truncation", "hidden", "dtype")
    ]
    final = (
        f"(SELECT run_key, arg_max({metric}, step) AS final FROM metrics_table GROUP BY run_key)"
        if metrics_data is not None
        else "(SELECT NULL::VARCHAR AS run_key, NULL::DOUBLE AS final)"
    )
    rows = duckdb.sql(
        f"""
        SELECT r.task, r.learner_name, r.shape, r.flops_per_step, r.status, r.seed,
               {", ".join(f"r.{c}" for c in hyper)}, f.final
        FROM runs_table r LEFT JOIN {final} f USING (run_key)
        WHERE r.run_key IN (SELECT unnest($keys))
        """,
        params={"keys": spec_keys},
    ).fetchall()
    groups: dict[tuple, dict[tuple, list]] = {}
    for row in rows:
        task, learner, shape, flops, status, seed, *settings, final = row
        setting = tuple((name, value) for name, value in zip(hyper, settings, strict=True) if value is not None)
        groups.setdefault((task, learner, shape, flops), {}).setdefault(setting, []).append((status, final))
    table = []
    for (task, learner, shape, flops), settings in sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][3] or 0)
    ):
        varying = {name for name in hyper if len({dict(s).get(name) for s in settings}) > 1} or {"step_size"}
        best = None
        for setting, outcomes in settings.items():
            values = [final for status, final in outcomes if status == "complete" and final is not None]
            if len(values) != len(outcomes) or not values:
                continue
            mean = sum(values) / len(values)
            if best is None or mean < best[1]:
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                best = (setting, mean, sd / math.sqrt(len(values)), len(values))
        diverged = sum(status == "diverged" for outcomes in settings.values() for status, _ in outcomes)
        table.append(
            {
                "task": task,
                "learner": learner,
                "shape": shape,
                "flops_per_step": flops,
                "setting": ", ".join(
                    f"{n}={v:g}" if isinstance(v, float) else f"{n}={v}"
                    for n, v in (best[0] if best else ())
                    if n in varying
                )
                or "-",
                "seeds": best[3] if best else 0,
                "mean": best[1] if best else None,
                "stderr": best[2] if best else None,
                "diverged": diverged,
                "settings": len(settings),
            }
        )
    return table


def format_comparison(table: list[dict], metric: str = "msre_window") -> str:
    """A plain-text table of `compare`'s rows."""
    if not table:
        return "no results yet"
    header = ["task", "learner", "shape", "flops/step", "best setting", "seeds", f"final {metric}", "diverged"]
    body = [
        [
            row["task"],
            row["learner"],
            row["shape"],
            f"{row['flops_per_step']:,}",
            row["setting"],
            str(row["seeds"]),
            "-" if row["mean"] is None else f"{row['mean']:.5f} ± {row['stderr']:.5f}",
            str(row["diverged"]),
        ]
        for row in table
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
