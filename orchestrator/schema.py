"""The results schema: the one place that knows the columns of the `runs` and `metrics` tables.

Documented in docs/results-schema.md (a test checks the two agree). Columns are only ever added;
every addition bumps SCHEMA_VERSION. Every file of a sweep has exactly these columns (a column
that does not apply to a learner, e.g. `hidden` for a CCN, is null), so readers need no
schema merging. `learner` and `task` are also the hive partition keys of the file paths.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator.learner_kinds import LEARNER_KINDS
from orchestrator.task_kinds import TASK_KINDS

SCHEMA_VERSION = 3
STATUSES = ("complete", "diverged")

_ARROW_TYPES = {float: pa.float64(), int: pa.int64(), str: pa.string(), bool: pa.bool_()}
# The learners whose shape fields and settings have typed columns (schema versions 1-3). Registering
# another learner does not change the schema: its settings without a column of their own go to
# `learner_settings` (JSON); a later schema version may add columns for them.
TYPED_LEARNERS = ("ccn", "tbptt")


def _learner_setting_fields() -> list[pa.Field]:
    """Shape, static and hyperparameter columns of the TYPED_LEARNERS (union by name).

    A setting without a column (an external learner's, or of a type without one) goes to the
    `learner_settings` JSON column instead (execute.runs_row)."""
    seen: dict[str, pa.Field] = {}
    for kind in (LEARNER_KINDS[name] for name in TYPED_LEARNERS):
        for name in kind.shape_fields:
            seen.setdefault(name, pa.field(name, pa.int64()))
        for field in kind.fields:
            if field.type in _ARROW_TYPES:
                seen.setdefault(field.name, pa.field(field.name, _ARROW_TYPES[field.type]))
    return list(seen.values())


def _metric_names() -> list[str]:
    return list(dict.fromkeys(name for kind in TASK_KINDS.values() for name in kind.metrics))


LEARNER_SETTING_COLUMNS = tuple(field.name for field in _learner_setting_fields())
METRIC_COLUMNS = tuple(_metric_names())

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_key", pa.string(), nullable=False),  # sha256 of the run's canonical JSON
        pa.field("sweep", pa.string(), nullable=False),
        pa.field("learner", pa.string(), nullable=False),  # learner kind: ccn | tbptt (partition key)
        pa.field("learner_name", pa.string()),  # label: columnar | constructive | ccn | tbptt | name = "..."
        pa.field("shape", pa.string()),  # "20:4:50000", "10:5"
        *_learner_setting_fields(),  # every shape field and hyperparameter, typed; null where n/a
        pa.field("task", pa.string(), nullable=False),  # task name (partition key)
        pa.field("task_kind", pa.string()),
        pa.field("task_params", pa.string()),  # JSON object of the task's parameters
        pa.field("n_inputs", pa.int64()),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("steps", pa.int64()),
        pa.field("log_every", pa.int64()),
        pa.field("params", pa.int64()),
        pa.field("learning_params", pa.int64()),
        pa.field("flops_per_step", pa.int64()),
        pa.field("paper_ops_per_step", pa.int64()),
        pa.field("status", pa.string(), nullable=False),  # complete | diverged
        pa.field("diverged_at_step", pa.int64()),  # first step with a non-finite prediction or state
        pa.field("batch_key", pa.string()),  # the file this row lives in
        pa.field("batch_size", pa.int64()),  # runs vmapped together (before padding)
        pa.field("wall_seconds", pa.float64()),  # wall time of the whole batch (compile included, all attempts)
        pa.field("attempt", pa.int64()),  # 1 for a first try
        pa.field("host", pa.string()),
        pa.field("device", pa.string()),  # e.g. "cpu", "cuda:0 NVIDIA H100"
        pa.field("package_version", pa.string()),
        pa.field("schema_version", pa.int64()),
        pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
        # schema version 2
        pa.field("node", pa.string()),  # the Ray node id that ran the batch (null outside Ray)
        pa.field("resumed_from_step", pa.int64()),  # the checkpoint's step this attempt resumed from; null: step 0
        # schema version 3
        pa.field("learner_settings", pa.string()),  # JSON of the settings without a column of their own; null: none
        pa.field("cost_source", pa.string()),  # analytic (the learner's cost) | measured (XLA's cost analysis)
    ],
    metadata={"ccn_sweeps.table": "runs", "ccn_sweeps.schema_version": str(SCHEMA_VERSION)},
)

METRICS_SCHEMA = pa.schema(
    [
        pa.field("run_key", pa.string(), nullable=False),
        pa.field("learner", pa.string(), nullable=False),  # partition key
        pa.field("task", pa.string(), nullable=False),  # partition key
        pa.field("step", pa.int64(), nullable=False),  # steps taken when the metrics were read
        pa.field("cumulative_flops", pa.int64()),  # flops_per_step * step
        *(pa.field(name, pa.float64()) for name in METRIC_COLUMNS),  # null where the task has none
    ],
    metadata={"ccn_sweeps.table": "metrics", "ccn_sweeps.schema_version": str(SCHEMA_VERSION)},
)

TABLES = {"runs": RUNS_SCHEMA, "metrics": METRICS_SCHEMA}

# -- column roles of the runs table: the one definition analysis and `ccn compare` use -------------
SHAPE_COLUMNS = tuple(dict.fromkeys(name for learner in TYPED_LEARNERS for name in LEARNER_KINDS[learner].shape_fields))
RUN_LENGTH_COLUMNS = ("steps", "log_every")
# a setting (`config` in analysis): the hyperparameters and the run length; runs of two settings are never averaged
SETTING_COLUMNS = (*(c for c in LEARNER_SETTING_COLUMNS if c not in SHAPE_COLUMNS), "learner_settings",
                   *RUN_LENGTH_COLUMNS)
# a learner of the selection rule: its settings compete; the run length is part of it, so runs of
# different lengths (an edited `steps`) never compete either
LEARNER_COLUMNS = ("task", "learner", "learner_name", "shape", *RUN_LENGTH_COLUMNS)
IDENTITY_COLUMNS = ("run_key", "sweep", "learner", "learner_name", "shape", "task", "task_kind", "task_params",
                    "n_inputs", "seed")  # fmt: skip
# measured or recorded about a run, never part of its setting
OUTCOME_COLUMNS = ("params", "learning_params", "flops_per_step", "paper_ops_per_step", "status", "diverged_at_step",
                   "batch_key", "batch_size", "wall_seconds", "attempt", "host", "device", "package_version",
                   "schema_version", "finished_at", "node", "resumed_from_step", "cost_source")  # fmt: skip
COLUMN_ROLES = {  # runs column -> identity | shape | setting | outcome
    **dict.fromkeys(IDENTITY_COLUMNS, "identity"),
    **dict.fromkeys(SHAPE_COLUMNS, "shape"),
    **dict.fromkeys(SETTING_COLUMNS, "setting"),
    **dict.fromkeys(OUTCOME_COLUMNS, "outcome"),
}
# every runs column has exactly one role (tests/test_analysis.py checks it: give a new column its role here)


def to_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) -> an Arrow table of exactly the schema of `name`; unknown keys are an error."""
    schema = TABLES[name]
    unknown = {key for row in rows for key in row} - set(schema.names)
    if unknown:
        raise ValueError(f"{name} rows have columns the schema lacks: {sorted(unknown)} (add them to schema.py)")
    return pa.Table.from_pydict({f.name: [row.get(f.name) for row in rows] for f in schema}, schema=schema)


def metrics_table(run_keys, learners, tasks, run_index, step, cumulative_flops, metrics) -> pa.Table:
    """The metrics table, built column by column from arrays (no dict per row): exactly the schema of
    `to_table("metrics", rows)`.

    run_keys / learners / tasks: one string per run of the batch; run_index [rows] ints into them;
    step, cumulative_flops [rows] ints; metrics: name -> [rows] floats, non-finite values null (a
    metric column not given is null). Unknown metric names are an error.
    """
    unknown = set(metrics) - set(METRIC_COLUMNS)
    if unknown:
        raise ValueError(f"metrics columns the schema lacks: {sorted(unknown)} (add them to schema.py)")
    index = pa.array(np.asarray(run_index, np.int64))
    rows = len(index)
    columns = {
        "run_key": pa.array(list(run_keys), pa.string()).take(index),
        "learner": pa.array(list(learners), pa.string()).take(index),
        "task": pa.array(list(tasks), pa.string()).take(index),
        "step": pa.array(np.asarray(step, np.int64)),
        "cumulative_flops": pa.array(np.asarray(cumulative_flops, np.int64)),
    }
    for name in METRIC_COLUMNS:
        if name not in metrics:
            columns[name] = pa.nulls(rows, pa.float64())
            continue
        values = np.asarray(metrics[name], np.float64)
        columns[name] = pa.array(values, pa.float64(), mask=~np.isfinite(values))
    return pa.Table.from_arrays([columns[field.name] for field in METRICS_SCHEMA], schema=METRICS_SCHEMA)
