"""Weights & Biases tracking of a sweep: one W&B run per finished batch, logged from the driver.

    tracker = Tracker.start("offline", results_root, sweep_name)   # None when disabled
    tracker.batch_done(batch)        # after the batch's files are written; returns at once
    warnings = tracker.close()       # waits a bounded time for what is queued, never raises
    report = sync("sweeps/demo.toml", "results", "offline")   # `ccn wandb-sync`: what W&B missed

Each batch becomes one W&B run: group = the sweep, job_type = the learner kind, config = the
batch's static signature (learner, shape, task, steps, log_every), a `runs` table (run_key,
seed, hyperparameters, status, final_error = msre_window at the last step) and the learning
curves (`curves` table, plus one logged series per run: `error/<run_key[:12]>` by step).

W&B never stops or slows the sweep: logging happens in one background thread that reads the
batch's Parquet files back from the results, every error becomes a warning, and `close` waits at
most `timeout` seconds. Offline runs land in `<root>/<sweep>/wandb/` (local results roots; else
`./wandb-<sweep>`), ready for `wandb sync <dir>/wandb/offline-run-*`.

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

    def batch_done(self, batch) -> None:
        """Queue a finished (written) batch for logging; returns at once."""
        self._queue.put(batch)

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
            batch = self._queue.get()
            if batch is None:
                return
            key = str(getattr(batch, "batch_key", "?"))
            try:
                run_id = self._log(batch)
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

    def _read(self, batch):
        store = self.store
        tables = {}
        for table in ("runs", "metrics"):
            path = store.batch_path(table, batch.learner, batch.task, batch.batch_key)
            import pyarrow.parquet as pq

            with store.filesystem.open_input_file(path) as handle:
                tables[table] = pq.read_table(handle).to_pylist()
        return tables["runs"], tables["metrics"]

    def _log(self, batch) -> str:
        """Log one batch as a new W&B run; returns the run's id."""
        import wandb

        runs, metrics = self._read(batch)
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
            curves: dict[str, list[tuple[int, float | None]]] = {}
            for row in sorted(metrics, key=lambda r: (r["run_key"], r["step"])):
                curves.setdefault(row["run_key"], []).append((row["step"], row.get(FINAL_ERROR_METRIC)))
            summary_columns = ["run_key", "seed", *hyper_names, "status", "diverged_at_step", "final_error"]
            summary_rows = []
            for row in runs:
                curve = curves.get(row["run_key"], [])
                final = curve[-1][1] if row["status"] == "complete" and curve else None
                summary_rows.append(
                    [
                        row["run_key"],
                        row["seed"],
                        *(row.get(n) for n in hyper_names),
                        row["status"],
                        row["diverged_at_step"],
                        final,
                    ]
                )
            run.log({"runs": wandb.Table(columns=summary_columns, data=summary_rows)})
            run.log(
                {
                    "curves": wandb.Table(
                        columns=["run_key", "step", FINAL_ERROR_METRIC],
                        data=[[key, step, value] for key, curve in curves.items() for step, value in curve],
                    )
                }
            )
            steps = sorted({step for curve in curves.values() for step, _ in curve})
            by_step = {key: dict(curve) for key, curve in curves.items()}
            for step in steps:
                values = {
                    f"error/{key[:12]}": by_step[key][step] for key in by_step if by_step[key].get(step) is not None
                }
                run.log({"learner_step": step, **values})
            finals = [r[-1] for r in summary_rows if r[-1] is not None]
            run.summary["run_count"] = len(runs)
            run.summary["diverged"] = sum(r["status"] == "diverged" for r in runs)
            run.summary["best_final_error"] = min(finals) if finals else None
            run.summary["wall_seconds"] = runs[0]["wall_seconds"] if runs else None
        finally:
            run.finish()
        return run.id


@dataclass(frozen=True)
class FinishedBatch:
    """A batch whose files are in the results, rebuilt from them and the spec (what `_log` reads)."""

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
