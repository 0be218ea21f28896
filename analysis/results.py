"""Load a sweep's Parquet results (docs/results-schema.md) into DuckDB relations.

    from analysis import load
    results = load("results", "demo")          # a folder or a pyarrow filesystem URI
    results.runs()                             # runs + `stage` + `config` (hyperparameters as text)
    results.curves()                           # runs joined with metrics: one row per run per log point
    results.summary()                          # one row per run: final_error, auc

Reads only the Parquet files, never the orchestrator: results copied from any cluster work, and so
does a sweep that is still running. Evaluation runs (`ccn run SPEC --stage evaluate`) live in the
sibling sweep folder `<sweep>.evaluation`; they get `stage = 'evaluation'`, the others 'selection'.
"""

from __future__ import annotations

import dataclasses
import json
import os

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

EVALUATION_SUFFIX = ".evaluation"
STAGES = ("selection", "evaluation")
# Runs columns that are not part of a learner's hyperparameter setting (everything else is).
_NOT_SETTING = {
    "run_key", "sweep", "learner", "learner_name", "shape", "task", "task_kind", "task_params", "n_inputs",
    "seed", "steps", "log_every", "params", "learning_params", "flops_per_step", "paper_ops_per_step", "status",
    "diverged_at_step", "batch_key", "batch_size", "wall_seconds", "attempt", "host", "device",
    "package_version", "schema_version", "finished_at", "node", "resumed_from_step",
    # shape fields: already in `shape`
    "total_columns", "columns_per_stage", "steps_per_stage", "truncation", "hidden",
}  # fmt: skip


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(root)


def _read_table(fs: pafs.FileSystem, path: str) -> pa.Table | None:
    """Every committed Parquet file under `path` (hidden temporaries skipped), or None if none."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning=None)
    return dataset.to_table() if dataset.files else None


def list_sweeps(root: str) -> list[str]:
    """Sweep folders (with a `runs` table) under a results root, evaluation folders excluded."""
    fs, base = _filesystem(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    names = [
        info.base_name for info in fs.get_file_info(pafs.FileSelector(base)) if info.type == pafs.FileType.Directory
    ]
    return sorted(
        name
        for name in names
        if not name.endswith(EVALUATION_SUFFIX)
        and fs.get_file_info(f"{base}/{name}/runs").type == pafs.FileType.Directory
    )


@dataclasses.dataclass
class Results:
    """A sweep's results in an in-memory DuckDB: tables `runs` and `metrics`, views on them."""

    root: str
    sweep: str
    connection: duckdb.DuckDBPyConnection
    setting_columns: tuple[str, ...]  # hyperparameter columns that make up `config`
    has_evaluation: bool
    in_progress_runs: int  # metric rows without a runs row: runs of a batch being written
    failures: list[dict]  # failed batches (failures/*.json) of both stages

    def sql(self, query: str, params: dict | None = None) -> duckdb.DuckDBPyRelation:
        return self.connection.sql(query, params=params)

    def runs(self) -> duckdb.DuckDBPyRelation:
        """One row per run: every runs column plus `stage` and `config` (hyperparameters as text)."""
        return self.sql("SELECT * FROM runs")

    def curves(self) -> duckdb.DuckDBPyRelation:
        """One row per run per log point: run identity with step, cumulative_flops and the metrics."""
        return self.sql("SELECT * FROM curves")

    def summary(self) -> duckdb.DuckDBPyRelation:
        """One row per run: final_error (msre_window at the last step; null if diverged) and auc."""
        return self.sql("SELECT * FROM summary")


def load(root: str, sweep: str | None = None) -> Results:
    """Read `<root>/<sweep>` (and `<root>/<sweep>.evaluation` if present) into DuckDB.

    sweep: None picks the only sweep under root (an error lists them when there are several).
    """
    root = str(root)
    if sweep is None:
        sweeps = list_sweeps(root)
        if len(sweeps) != 1:
            found = ", ".join(sweeps) or "none"
            raise ValueError(f"{root}: name the sweep to report (--sweep NAME); sweeps found: {found}")
        sweep = sweeps[0]
    fs, base = _filesystem(root)
    connection = duckdb.connect()
    runs_parts, metrics_parts = [], []
    failures: list[dict] = []
    for stage, folder in zip(STAGES, (sweep, sweep + EVALUATION_SUFFIX), strict=True):
        runs_table = _read_table(fs, f"{base}/{folder}/runs")
        metrics_table = _read_table(fs, f"{base}/{folder}/metrics")
        failures += _read_failures(fs, f"{base}/{folder}/failures", stage)
        if runs_table is None:
            if stage == "selection":
                raise ValueError(
                    f"{root}/{sweep}: no runs yet (no Parquet files under runs/); "
                    f"sweeps found: {', '.join(list_sweeps(root)) or 'none'}"
                )
            continue
        connection.register(f"runs_{stage}", runs_table)
        runs_parts.append(f"SELECT '{stage}' AS stage, * FROM runs_{stage}")
        if metrics_table is not None:
            connection.register(f"metrics_{stage}", metrics_table)
            metrics_parts.append(f"SELECT '{stage}' AS stage, * FROM metrics_{stage}")
    columns = [c for c in connection.sql("SELECT * FROM runs_selection LIMIT 0").columns]
    setting = tuple(c for c in columns if c not in _NOT_SETTING)
    config = (
        "concat_ws(', ', "
        + ", ".join(f"CASE WHEN {c} IS NOT NULL THEN '{c}=' || CAST({c} AS VARCHAR) END" for c in setting)
        + ")"
    )
    connection.execute(
        f"CREATE TABLE runs AS SELECT *, {config} AS config FROM ({' UNION ALL BY NAME '.join(runs_parts)})"
    )
    if metrics_parts:
        connection.execute(f"CREATE TABLE metrics AS {' UNION ALL BY NAME '.join(metrics_parts)}")
    else:
        connection.execute(
            "CREATE TABLE metrics (stage VARCHAR, run_key VARCHAR, step BIGINT, cumulative_flops BIGINT, "
            "msre_window DOUBLE)"
        )
    identity = "r.stage, r.run_key, r.task, r.learner, r.learner_name, r.shape, r.config, r.seed, r.status, " \
        "r.steps, r.log_every, r.flops_per_step, r.paper_ops_per_step"  # fmt: skip
    connection.execute(
        f"""CREATE VIEW curves AS
        SELECT {identity}, m.step, m.cumulative_flops, m.msre_window
        FROM runs r JOIN metrics m ON m.run_key = r.run_key AND m.stage = r.stage"""
    )
    connection.execute(
        f"""CREATE VIEW summary AS
        SELECT {identity}, {", ".join(f"r.{c}" for c in setting)},
               CASE WHEN r.status = 'complete' AND f.last_step = r.steps THEN f.final_error END AS final_error,
               CASE WHEN r.status = 'complete' AND f.last_step = r.steps THEN f.msre_sum * r.log_every END AS auc
        FROM runs r LEFT JOIN (
            SELECT stage, run_key, max_by(msre_window, step) AS final_error, max(step) AS last_step,
                   sum(msre_window) AS msre_sum
            FROM metrics GROUP BY stage, run_key
        ) f ON f.run_key = r.run_key AND f.stage = r.stage"""
    )
    in_progress = connection.sql(
        "SELECT count(DISTINCT run_key) FROM metrics WHERE run_key NOT IN (SELECT run_key FROM runs)"
    ).fetchall()[0][0]
    return Results(
        root=root,
        sweep=sweep,
        connection=connection,
        setting_columns=setting,
        has_evaluation=len(runs_parts) > 1,
        in_progress_runs=in_progress,
        failures=failures,
    )


def _read_failures(fs: pafs.FileSystem, path: str, stage: str) -> list[dict]:
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    records = []
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.base_name.endswith(".json") and not info.base_name.startswith("."):
            with fs.open_input_stream(info.path) as stream:
                records.append({"stage": stage, **json.loads(stream.read())})
    return records
