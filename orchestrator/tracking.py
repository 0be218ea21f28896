"""Weights & Biases tracking of a sweep: one W&B run per finished batch, logged from the driver.

    tracker = Tracker.start("offline", results_root, sweep_name)   # None when disabled
    tracker.batch_done(batch, summary)   # the actor's reply (its `digest`); returns at once
    warnings = tracker.close()       # waits a bounded time for what is queued, never raises
    report = sync("sweeps/demo.toml", "results", "offline")   # `ccn wandb-sync`: what W&B missed

What a batch's W&B run holds (the same whichever path logs it):

- group = the sweep, job_type = the learner kind, config = the batch's static signature
  (learner, shape, task, steps, log_every, batch size);
- a `runs` table, one row per run: run_key, seed, hyperparameters, status, diverged_at_step,
  final_error (the last logged value of FINAL_ERROR_METRIC, msre_window; null for a diverged run);
- the batch's learning curve, compact: at each log point (`learner_step`), `error/min`,
  `error/median` and `error/max` of FINAL_ERROR_METRIC over the batch's complete runs, and
  `error/runs` (how many had a value there); the same as a `curves` table (step, min, median,
  max, runs);
- summary: run_count, diverged, best_final_error, median_final_error, wall_seconds.

Per-run curves are not sent to W&B: at 4,096 runs x 1,000 log points a batch would be 4M points
(W&B's charts sample a few hundred series at most). Every run's full curve is in the results'
metrics Parquet, which the analysis reads (docs/analysis.md).

Where it comes from: the actor that wrote the batch computes it from the tables it just wrote,
in memory (`batch_digest`: columnar, pyarrow.compute and numpy) and returns it in its reply
(`summary["digest"]`); the driver logs from that and never reads the batch's Parquet back. Only
with W&B on (`schedule.run_batches(digest=True)`): nothing else reads it, and it is not free
(seconds for a 4,096-run batch of 1,000 log points), so a W&B-off reply carries None.
`sync` (batches W&B missed, whose replies are gone) reads the batch's Parquet and builds the
same digest with the same function.

W&B never stops or slows the sweep: logging happens in one background thread, every error
becomes a warning, and `close` waits at most `timeout` seconds. Offline runs land in
`<root>/<sweep>/wandb/` (local results roots; else `./wandb-<sweep>`), ready for
`wandb sync <dir>/wandb/offline-run-*`.

What was logged is recorded in the results: after W&B has taken a batch's run (`finish`), a marker
`<root>/<sweep>/wandb/logged/<mode>/<batch_key>.json` (on the results' own filesystem, so an
object store too). `sync` (`ccn wandb-sync SPEC --results R`) logs every finished batch of the spec
that has no marker for that mode: the batches still queued when a driver died, or a sweep run
with W&B off. Logging is idempotent: a batch is logged once per mode, however often `sync` runs.
Each W&B run has an id of its own (the batch key's head and a random suffix), so a batch logged
again (its marker deleted) is a new run, never a collision with the earlier one.

Tracking is opt-in, the same for `ccn run` and `api.run_sweep`: `--wandb` / `wandb=`, else
$WANDB_MODE, else disabled (nothing is written or sent).

The API key is read by wandb itself from $WANDB_API_KEY (online mode only); this module never
reads, prints, logs or writes it.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

MODES = ("disabled", "offline", "online")
PROJECT_ENV = "WANDB_PROJECT"
DEFAULT_PROJECT = "ccn-sweeps"
FINAL_ERROR_METRIC = "msre_window"


def default_mode() -> str:
    """$WANDB_MODE when it names a mode (dryrun = offline), else disabled: tracking is opt-in (an API
    key alone never turns it on). The default of both `ccn run` and `api.run_sweep`."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    mode = "offline" if mode == "dryrun" else mode
    return mode if mode in MODES else "disabled"


def marker_path(store, mode: str, batch_key: str) -> str:
    """Where the record that W&B (in this mode) has a batch's run lives, on the results' filesystem."""
    return f"{store.base}/wandb/logged/{mode}/{batch_key}.json"


def logged_batches(store, mode: str) -> set[str]:
    """The batch keys already logged to W&B in this mode (their markers)."""
    import pyarrow.fs as pafs

    folder = f"{store.base}/wandb/logged/{mode}"
    try:
        infos = store.filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return set()
    return {
        info.base_name[: -len(".json")]
        for info in infos
        if info.type == pafs.FileType.File and info.base_name.endswith(".json")
    }


def _write_marker(store, mode: str, batch_key: str, record: dict[str, Any]) -> None:
    path = marker_path(store, mode, batch_key)
    store.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with store.filesystem.open_output_stream(path) as handle:
        handle.write(json.dumps(record, sort_keys=True).encode())


def wandb_dir(results_root: str, sweep: str) -> str:
    """Where W&B writes its run folders: inside the results tree when the root is local."""
    if "://" in results_root and not results_root.startswith("file://"):
        return os.path.abspath(f"wandb-{sweep}")
    base = results_root.removeprefix("file://")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), sweep, "wandb")


def batch_config(batch) -> dict[str, Any]:
    """The batch's static signature as a W&B config."""
    run = batch.runs[0]
    return {
        "sweep": batch.sweep,
        "batch_key": batch.batch_key,
        "learner": run.learner,
        "learner_name": run.learner_name,
        **{f"learner.{name}": value for name, value in run.config_dict.items()},
        "task": run.task.name,
        "task_kind": run.task.kind,
        **{f"task.{name}": value for name, value in dict(run.task.params).items()},
        "steps": run.steps,
        "log_every": run.log_every,
        "batch_size": len(batch.runs),
        "padded_size": batch.padded_size,
    }


@dataclass(frozen=True)
class BatchDigest:
    """What W&B logs of one batch, computed where the batch's tables are (module docstring).

    runs: a pyarrow table, one row per run: run_key, seed, status, diverged_at_step, final_error.
    curve: a pyarrow table, one row per log point with a value: step, min, median, max, runs
    (FINAL_ERROR_METRIC over the batch's complete runs). Small enough for an actor's reply.
    """

    runs: Any
    curve: Any
    wall_seconds: float | None = None
    metric: str = FINAL_ERROR_METRIC


def batch_digest(runs, metrics, metric: str = FINAL_ERROR_METRIC, *, dense: bool | None = None) -> BatchDigest:
    """A batch's `BatchDigest` from its runs and metrics tables (pyarrow), columnar: no row objects.

    final_error: the run's value of `metric` at its last logged step (null for a run that is not
    complete, or whose last value is null). The curve's statistics are exact (median: the mean
    of the two middle values for an even count). The runs of a batch log at the same steps, so
    the values are laid out as a [log points, runs] grid and reduced along its axes (no sort of
    the values); a sparse layout (a grid much larger than the rows) is sorted instead. dense:
    force one way (None: choose).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = runs["run_key"].combine_chunks() if isinstance(runs["run_key"], pa.ChunkedArray) else runs["run_key"]
    count = len(keys)
    complete = pc.fill_null(pc.equal(runs["status"], "complete"), False).to_numpy(zero_copy_only=False)
    position = pc.fill_null(pc.index_in(metrics["run_key"], value_set=keys), -1).to_numpy(zero_copy_only=False)
    steps = metrics["step"].to_numpy().astype(np.int64, copy=False)
    values = metrics[metric].cast(pa.float64()).to_numpy(zero_copy_only=False)  # null -> NaN
    known = position >= 0
    position, steps, values = position[known], steps[known], values[known]
    unique, step_index = np.unique(steps, return_inverse=True)
    if dense is None:
        dense = len(unique) * count <= 4 * len(steps) + (1 << 20)
    statistics = _grid_statistics if dense else _sorted_statistics
    final, (curve_steps, low, middle, high, counts) = statistics(count, complete, position, unique, step_index, values)
    final[~complete] = np.nan
    curve = pa.table(
        {
            "step": pa.array(curve_steps, pa.int64()),
            "min": pa.array(low, pa.float64()),
            "median": pa.array(middle, pa.float64()),
            "max": pa.array(high, pa.float64()),
            "runs": pa.array(counts, pa.int64()),
        }
    )
    summary = pa.table(
        {
            "run_key": keys,
            "seed": runs["seed"],
            "status": runs["status"],
            "diverged_at_step": runs["diverged_at_step"],
            "final_error": pa.array(final, pa.float64(), mask=np.isnan(final)),
        }
    )
    wall = runs["wall_seconds"][0].as_py() if count and "wall_seconds" in runs.column_names else None
    return BatchDigest(summary, curve, wall, metric)


def _grid_statistics(count, complete, position, unique, step_index, values):
    """Final values and the curve from a [log points, runs] grid of the values (NaN: none)."""
    import numpy as np

    grid = np.full((len(unique), count), np.nan)
    grid[step_index, position] = values
    logged = np.zeros(grid.shape, bool)
    logged[step_index, position] = True
    final = np.full(count, np.nan)
    if len(unique):
        last = len(unique) - 1 - np.argmax(logged[::-1], axis=0)  # each run's last logged step
        final = np.where(logged.any(axis=0), grid[last, np.arange(count)], np.nan)
    curves = grid[:, complete]
    counts = np.count_nonzero(~np.isnan(curves), axis=1)
    curves, curve_steps, counts = curves[counts > 0], unique[counts > 0], counts[counts > 0]
    if not len(counts):
        return final, (curve_steps, np.zeros(0), np.zeros(0), np.zeros(0), counts)
    return final, (curve_steps, np.nanmin(curves, 1), np.nanmedian(curves, 1), np.nanmax(curves, 1), counts)


def _sorted_statistics(count, complete, position, unique, step_index, values):
    """The same as _grid_statistics by sorting the rows (for layouts whose grid would be mostly empty)."""
    import numpy as np

    final = np.full(count, np.nan)
    if len(position):
        order = _sort_by(position, step_index)  # by run, then step: each run's last row ends its group
        by_run = position[order]
        last = order[np.append(by_run[1:] != by_run[:-1], True)]
        final[position[last]] = values[last]
    usable = complete[position] & ~np.isnan(values)
    curve_steps, curve_values = step_index[usable], values[usable]
    order = _sort_by(curve_steps, curve_values)  # by step, then value
    curve_steps, curve_values = curve_steps[order], curve_values[order]
    indexes, starts, counts = np.unique(curve_steps, return_index=True, return_counts=True)
    middle = (curve_values[starts + (counts - 1) // 2] + curve_values[starts + counts // 2]) / 2
    low, high = curve_values[starts], curve_values[starts + counts - 1]
    return final, (unique[indexes], low, middle, high, counts)


def _sort_by(first, then):
    """The order that sorts by `first`, ties by `then` (np.lexsort's), as two stable numpy sorts."""
    import numpy as np

    by_then = np.argsort(then, kind="stable")
    return by_then[np.argsort(first[by_then], kind="stable")]


class Tracker:
    """Logs finished batches to W&B in a background thread; see the module docstring."""

    def __init__(self, mode: str, results_root: str, sweep: str, *, project: str | None = None):
        if mode not in MODES or mode == "disabled":
            raise ValueError(f"Tracker mode must be offline or online, got {mode!r}")
        self.mode = mode
        self.results_root = results_root
        self.sweep = sweep
        self.project = project or os.environ.get(PROJECT_ENV) or DEFAULT_PROJECT
        self.dir = wandb_dir(results_root, sweep)
        self.warnings: list[str] = []
        self.logged: list[str] = []  # batch keys logged
        self._store = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="ccn-wandb", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, mode: str | None, results_root: str, sweep: str) -> Tracker | None:
        """A tracker for `mode` (None: default_mode()), or None when disabled."""
        mode = mode or default_mode()
        if mode == "disabled":
            return None
        return cls(mode, results_root, sweep)

    def batch_done(self, batch, summary: dict[str, Any] | None = None) -> None:
        """Queue a finished (written) batch for logging; returns at once.

        summary: the actor's reply (schedule.BatchWorker.run_batch); its `digest` is what is
        logged. Without one (`sync`), the batch's Parquet is read back and digested the same way.
        """
        self._queue.put((batch, (summary or {}).get("digest")))

    def close(self, timeout: float = 60.0) -> list[str]:
        """Wait at most `timeout` seconds for the queued batches; returns the warnings."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._warn(f"W&B logging did not finish within {timeout:.0f}s; the rest is skipped")
        return list(self.warnings)

    # -- the background thread ------------------------------------------------------------
    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(f"ccn: W&B: {message}", RuntimeWarning, stacklevel=2)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, digest = item
            key = str(getattr(batch, "batch_key", "?"))
            try:
                run_id = self._log(batch, digest if digest is not None else self._read(batch))
                self.logged.append(key)
            except Exception as error:  # noqa: BLE001 - W&B must never stop the sweep
                self._warn(f"batch {key[:12]} not logged: {type(error).__name__}: {error}")
                continue
            try:
                record = {"batch_key": key, "run_id": run_id, "mode": self.mode, "project": self.project}
                _write_marker(self.store, self.mode, key, {**record, "logged_at": time.time()})
            except Exception as error:  # noqa: BLE001
                self._warn(f"batch {key[:12]} logged, but not recorded as logged: {type(error).__name__}: {error}")

    @property
    def store(self):
        from orchestrator.results import ResultsStore

        if self._store is None:
            self._store = ResultsStore(self.results_root, self.sweep)
        return self._store

    def _read(self, batch) -> BatchDigest:
        """The batch's digest from its Parquet files (the `sync` path: no actor reply to log from)."""
        import pyarrow.parquet as pq

        store = self.store
        tables = {}
        for table in ("runs", "metrics"):
            path = store.batch_path(table, batch.learner, batch.task, batch.batch_key)
            with store.filesystem.open_input_file(path) as handle:
                tables[table] = pq.read_table(handle)
        return batch_digest(tables["runs"], tables["metrics"])

    def _log(self, batch, digest: BatchDigest) -> str:
        """Log one batch's digest as a new W&B run; returns the run's id."""
        import numpy as np
        import wandb

        os.makedirs(self.dir, exist_ok=True)
        settings = wandb.Settings(
            mode=self.mode,
            console="off",
            x_disable_stats=True,
            x_disable_meta=True,
            disable_git=True,
            disable_code=True,
            save_code=False,
            disable_job_creation=True,
            silent=True,
            init_timeout=30,
        )
        run = wandb.init(
            project=self.project,
            group=self.sweep,
            job_type=batch.learner,
            name=f"{self.sweep}-{batch.batch_key[:12]}",
            id=f"{batch.batch_key[:16]}-{secrets.token_hex(4)}",  # a new run each time: never a collision
            dir=self.dir,
            config=batch_config(batch),
            settings=settings,
            reinit="create_new",
        )
        try:
            hyper_names = sorted(dict(batch.runs[0].hyper_dict))
            hypers = {run_.run_key: dict(run_.hyper_dict) for run_ in batch.runs}
            columns = digest.runs.to_pydict()
            finals = columns["final_error"]
            summary_rows = [
                [key, seed, *(hypers.get(key, {}).get(name) for name in hyper_names), status, diverged_at, final]
                for key, seed, status, diverged_at, final in zip(
                    columns["run_key"],
                    columns["seed"],
                    columns["status"],
                    columns["diverged_at_step"],
                    finals,
                    strict=True,
                )
            ]
            summary_columns = ["run_key", "seed", *hyper_names, "status", "diverged_at_step", "final_error"]
            run.log({"runs": wandb.Table(columns=summary_columns, data=summary_rows)})
            curve_columns = ["step", "min", "median", "max", "runs"]
            curve = [digest.curve[name].to_pylist() for name in curve_columns]
            points = [list(point) for point in zip(*curve, strict=True)]
            run.log({"curves": wandb.Table(columns=curve_columns, data=points)})
            run.define_metric("error/*", step_metric="learner_step")
            for step, low, middle, high, count in points:
                run.log(
                    {"learner_step": step, "error/min": low, "error/median": middle, "error/max": high,
                     "error/runs": count}
                )  # fmt: skip
            values = sorted(value for value in finals if value is not None)
            run.summary["run_count"] = len(summary_rows)
            run.summary["diverged"] = sum(status == "diverged" for status in columns["status"])
            run.summary["best_final_error"] = values[0] if values else None
            run.summary["median_final_error"] = float(np.median(values)) if values else None
            run.summary["wall_seconds"] = digest.wall_seconds
        finally:
            run.finish()
        return run.id


@dataclass(frozen=True)
class FinishedBatch:
    """A batch whose files are in the results, rebuilt from them and the spec (what `_read` reads)."""

    sweep: str
    batch_key: str
    runs: tuple  # the spec's runs in it (orchestrator.spec.Run)
    padded_size: int | None = None

    @property
    def learner(self) -> str:
        return self.runs[0].learner

    @property
    def task(self) -> str:
        return self.runs[0].task.name


@dataclass
class SyncReport:
    """What `sync` did: batches logged now, already logged before, and warnings."""

    sweep: str
    mode: str
    logged: list[str] = field(default_factory=list)
    already: int = 0
    failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dir: str = ""

    def describe(self) -> str:
        text = (
            f"sweep {self.sweep!r}: W&B {self.mode}: {len(self.logged)} batches logged now, "
            f"{self.already} were already logged"
        )
        if self.failed:
            text += f", {len(self.failed)} failed (rerun to retry)"
        return text + (f"; runs in {self.dir}" if self.logged and self.mode == "offline" else "")


def finished_batches(sweep, results: str) -> list[FinishedBatch]:
    """Every batch of the sweep with files in the results, in batch-key order."""
    from orchestrator.results import ResultsStore

    done = ResultsStore(results, sweep.name).completed_runs()
    by_batch: dict[str, list] = {}
    for run in sweep.runs:
        record = done.get(run.run_key)
        if record is not None and record.batch_key:
            by_batch.setdefault(record.batch_key, []).append(run)
    return [FinishedBatch(sweep.name, key, tuple(runs)) for key, runs in sorted(by_batch.items())]


def sync(spec, results: str, mode: str | None = None, *, stage: str = "select", timeout: float = 600.0) -> SyncReport:
    """Log to W&B every finished batch of the spec that W&B (in this mode) has not had yet.

    mode: offline | online, or None for default_mode(). Idempotent: batches with a marker are
    skipped, and each batch logged gets one. Raises SpecError or ValueError (bad mode or stage,
    W&B disabled) before logging anything.
    """
    from orchestrator import api

    mode = mode or default_mode()
    if mode not in MODES:
        raise ValueError(f"wandb mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "disabled":
        raise ValueError("W&B is disabled ($WANDB_MODE or --wandb): pass --wandb offline or --wandb online")
    sweep = api._sweep(spec)
    if stage == "evaluate":
        sweep = api.evaluation_sweep(sweep, results)
    elif stage != "select":
        raise ValueError(f"stage must be one of {', '.join(api.STAGES)}, got {stage!r}")
    tracker = Tracker(mode, results, sweep.name)
    seen = logged_batches(tracker.store, mode)
    batches = finished_batches(sweep, results)
    todo = [batch for batch in batches if batch.batch_key not in seen]
    for batch in todo:
        tracker.batch_done(batch)
    warned = tracker.close(timeout=timeout)
    logged = list(tracker.logged)
    failed = [batch.batch_key for batch in todo if batch.batch_key not in logged]
    return SyncReport(sweep.name, mode, logged, len(batches) - len(todo), failed, warned, tracker.dir)
