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
    workers: int | None  # None: one actor per batch (an elastic cluster)
    accelerator: str
    batch_size: int | None = None  # the batch size asked for (None: automatic)
    resumable: list[tuple[list[str], int]] = dataclasses.field(default_factory=list)  # checkpoints' (runs, size)

    def recut(self, *, workers: int | None, accelerator: str, max_batch: int | None = None) -> SweepPlan:
        """The same runs cut into batches for other workers, without reading the results again
        (max_batch: the automatic batch cap, e.g. a GPU actor's share when actors share a GPU)."""
        batches = plan_batches(
            self.sweep.name, self.todo, workers=workers, batch_size=self.batch_size, accelerator=accelerator,
            resumable=self.resumable, max_batch=max_batch,
        )
        return dataclasses.replace(self, batches=batches, workers=workers, accelerator=accelerator)

    def describe(self) -> str:
        signatures = len({batch.signature for batch in self.batches})
        sizes = sorted({batch.padded_size for batch in self.batches})
        return (
            f"sweep {self.sweep.name!r}: {len(self.sweep.runs)} runs, {len(self.done)} already done, "
            f"{len(self.todo)} to run in {len(self.batches)} batches (sizes {sizes or '-'}) of "
            f"{signatures} compiled programs on "
            + (f"{self.workers} {self.accelerator} workers" if self.workers else f"one {self.accelerator} actor each")
        )

    def describe_cost(self) -> str:
        """The sweep's learner-steps, FLOPs and estimated core-hours, in all and still to run (orchestrator.cost).

        Rates measured by the CPU batches of the sweeps under the results root where they ran the
        shape, else the learner benchmarks (docs/benchmarks.md); the last line says which.
        """
        from orchestrator import cost

        rates = cost.measured_rates(self.results, device="cpu")
        total, todo = cost.estimate(self.sweep.runs, rates), cost.estimate(self.todo, rates)
        return "\n".join(
            [
                f"  learner-steps: {cost.format_count(total.learner_steps)} in all, "
                f"{cost.format_count(todo.learner_steps)} to run",
                f"  FLOPs: {cost.format_count(total.flops)} in all, {cost.format_count(todo.flops)} to run",
                f"  estimated compute: {cost.format_hours(todo.core_hours)} to run "
                f"({cost.format_hours(total.core_hours)} for the whole sweep), one CPU core per actor",
                f"  throughput source: {total.source}",
            ]
        )


def plan_sweep(
    spec: str | Path | Sweep,
    results: str = DEFAULT_RESULTS,
    *,
    workers: int | None = 1,
    accelerator: str = "cpu",
    batch_size: int | None = None,
) -> SweepPlan:
    """Validate the spec, read what is done from the results, and batch the rest."""
    sweep = _sweep(spec)
    return _read_plan(sweep, results, ResultsStore(results, sweep.name), batch_size).recut(
        workers=workers, accelerator=accelerator
    )


def _read_plan(sweep: Sweep, results: str, store: ResultsStore, batch_size: int | None) -> SweepPlan:
    """What the results hold, read once: the runs done and the checkpoints' headers (no batches cut yet)."""
    completed = store.completed_runs()
    done = {run.run_key: completed[run.run_key] for run in sweep.runs if run.run_key in completed}
    todo = [run for run in sweep.runs if run.run_key not in done]
    return SweepPlan(
        sweep, results, done, todo, [], workers=1, accelerator="cpu",
        batch_size=batch_size or sweep.batch_size, resumable=resumable_batches(store),
    )


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
    preempted: int = 0  # times a batch went back to the queue because its actor or node was lost (no try used)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted and not self.stopped


def results_for_cluster(results: str, address: str | None) -> str:
    """A relative --results folder, with --address, as an absolute path resolved here on the driver.

    Every actor writes the results itself: a relative folder would be resolved against each
    actor's own working folder. The absolute path must be writable on every node (one machine, or
    a shared file system); a URI (s3://...) is passed on as it is.
    """
    if address is None or "://" in results or Path(results).expanduser().is_absolute():
        return results
    resolved = str(Path(results).expanduser().resolve())
    print(
        f"ccn: --results {results!r} is relative; the cluster's actors write to {resolved} "
        "(every node must reach it: one machine or a shared file system; else give a URI such as s3://...)",
        file=sys.stderr,
    )
    return resolved


def run_sweep(
    spec: str | Path | Sweep,
    results: str = DEFAULT_RESULTS,
    *,
    address: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    max_attempts: int | None = None,
    wandb: str | None = None,
    compilation_cache_dir: str | None = None,
    progress: bool | TextIO = True,
    stage: str = "select",
    max_actors: int | None = None,
    takeover: bool = False,
    lease_expiry: float | None = None,
    actors_per_gpu: int | None = None,
) -> SweepReport:
    """Run every run of the spec that the results do not hold yet, on Ray.

    stage: "select" runs the spec's grid; "evaluate" runs each learner's winner on fresh seeds
    (`evaluation_sweep`), into the results folder `<name>.evaluation`.

    address: a Ray cluster (HOST:PORT, ray://HOST:PORT or "auto"); None starts an embedded local
    Ray with `workers` CPUs (default: all cores) and stops it at the end. max_actors: the most
    actors the sweep holds at once (default: on a cluster, one per queued batch, so an autoscaler
    grows the cluster to fit the sweep; on the embedded Ray, one per CPU); on a cluster it also
    sizes the batches (each of max_actors actors gets work). actors_per_gpu: GPU actors sharing
    each GPU (default schedule.DEFAULT_ACTORS_PER_GPU; docs/cluster.md). batch_size overrides the
    automatic batch size (and the spec's). wandb: disabled | offline | online, or None (the
    default, as for `ccn run`) for tracking.default_mode(): $WANDB_MODE, else disabled
    (orchestrator.tracking; W&B errors are warnings). progress: True
    (stderr), False, or a text stream.
    Raises SpecError (bad spec) or schedule.ClusterError (unreachable cluster) before any compute.

    One driver per sweep (orchestrator.lease): the sweep's lease `<results>/<sweep>/_driver` is
    taken before anything is touched; lease.LeaseHeld when another driver holds it. takeover:
    replace the lease of a dead driver (heartbeat older than its expiry: lease_expiry seconds,
    default $CCN_LEASE_EXPIRY or 60). lease.LeaseLost when the lease cannot be kept (e.g. the
    results became read-only): the sweep stops, what was written stays.
    """
    import threading
    import time

    results = results_for_cluster(results, address)

    from orchestrator import interrupts, schedule, tracking
    from orchestrator.execute import default_compilation_cache_dir
    from orchestrator.lease import Lease, LeaseLost
    from orchestrator.progress import Progress

    wandb = wandb or tracking.default_mode()
    if wandb not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {', '.join(WANDB_MODES)}, got {wandb!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    actors_per_gpu = schedule.check_actors_per_gpu(
        schedule.DEFAULT_ACTORS_PER_GPU if actors_per_gpu is None else actors_per_gpu
    )
    sweep = _sweep(spec)
    if stage == "evaluate":
        sweep = evaluation_sweep(sweep, results)
    if address:
        schedule.check_address(address)
    started = time.perf_counter()
    store = ResultsStore(results, sweep.name)
    lease = Lease(store, expiry=lease_expiry, retry_hint=_takeover_hint(sweep, results, stage))
    try:  # holding the sweep's lease: no other driver cleans up or writes this sweep now
        lease.acquire(takeover)  # inside the try: a Ctrl-C right after it wrote the lease still releases it
        lease.keep_alive(interrupt_main=threading.current_thread() is threading.main_thread())
        store.remove_orphans()
        preview = _read_plan(sweep, results, store, batch_size)  # the results are read here only
        interrupts.check()
        outcome = schedule.SweepOutcome()
        if preview.todo:
            import ray

            we_started = schedule.connect(address, workers)
            try:
                # attached to a cluster (which may autoscale): actors follow the queue, up to
                # max_actors; the embedded Ray: one per CPU. The plan never counts nodes alive now.
                actors = schedule.cluster_workers(max_actors, elastic=bool(address), actors_per_gpu=actors_per_gpu)
                if workers and not address:
                    actors = dataclasses.replace(actors, cpu=min(actors.cpu, workers))
                plan = preview.recut(
                    workers=actors.planned,
                    accelerator=actors.accelerator,
                    max_batch=actors.gpu_batch_limit if actors.accelerator == "gpu" else None,
                )
                stream = progress if hasattr(progress, "write") else sys.stderr
                steps = sum(b.learner_steps for b in plan.batches)
                display = Progress(len(plan.todo), steps, stream) if progress else None
                if display:
                    merging = actors.gpu and actors.accelerator == "cpu"
                    merging = f"; {actors.gpu} GPU workers merge them" if merging else ""
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
                    digest=tracker is not None,  # only W&B reads the actors' digests
                )
                if tracker:
                    tracker.close(timeout=5.0 if outcome.interrupted else 60.0)
                if display:
                    display.close()
            finally:
                if we_started:
                    ray.shutdown()
        report = SweepReport(
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
            preempted=outcome.preempted,
        )
        if outcome.failed_batches or outcome.interrupted:
            lease.verify()  # batches that failed because the results became unwritable: say so
    except KeyboardInterrupt:
        if lease.lost:  # the heartbeat thread stopped the sweep: the lease could not be kept
            raise LeaseLost(lease.lost) from None
        raise
    finally:
        interrupts.shielded(lease.release)  # a Ctrl-C landing in the release does not leave the lease behind
    if lease.lost:
        raise LeaseLost(lease.lost)
    return report


def _takeover_hint(sweep: Sweep, results: str, stage: str) -> str:
    """The command that takes a dead driver's lease over."""
    options = (f" --results {results}" if results != DEFAULT_RESULTS else "") + (
        " --stage evaluate" if stage == "evaluate" else ""
    )
    return f"ccn run {sweep.path or 'SPEC'}{options} --takeover"


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
    for winner in analysis.select(analysis.load(results, sweep.name, spec=sweep), criterion):
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


def compare(spec: str | Path | Sweep, results: str = DEFAULT_RESULTS, criterion: str = "final_error") -> list[dict]:
    """Each learner's best setting on each task, by the analysis selection rule (docs/analysis.md).

    One implementation with `ccn report`: analysis.load reads exactly the spec's runs (selection
    and evaluation), analysis.comparison picks each learner's winner (analysis.select) and gives
    its final error over seeds with a 95% Student t interval. criterion: final_error | auc.
    Rows: analysis.comparison's; [] when the results hold none of the spec's runs yet.
    """
    import analysis

    sweep = _sweep(spec)
    try:
        loaded = analysis.load(results, sweep.name, spec=sweep)
    except analysis.NoRunsError:
        return []
    return analysis.comparison(loaded, criterion)


def format_comparison(table: list[dict]) -> str:
    """A plain-text table of `compare`'s rows (analysis.format_table), with a line saying which intervals."""
    import analysis

    return analysis.format_table(table)
