"""Load a sweep's Parquet results (docs/results-schema.md) into DuckDB relations.

    from analysis import load
    results = load("results", "demo")          # a folder or a pyarrow filesystem URI
    results = load("results", spec="sweeps/demo.toml")   # exactly that spec's runs (both stages)
    results.runs()                             # runs + `stage` + `config` (hyperparameters as text)
    results.curves()                           # runs joined with metrics: one row per run per log point
    results.summary()                          # one row per run: final_error, auc

Reads only the Parquet files (every file with the current schema of orchestrator.schema, which also
says which columns make a setting), never the orchestrator's state: results copied from any cluster
work, and so does a sweep that is still running. Given a spec, it reads exactly that spec's runs.
Evaluation runs (`ccn run SPEC --stage evaluate`) live in the sibling sweep folder
`<sweep>.evaluation`; they get `stage = 'evaluation'`, the others 'selection'.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.schema import RUN_LENGTH_COLUMNS, SETTING_COLUMNS, TABLES
from orchestrator.spec import EVALUATION_SUFFIX, is_safe_path_component

STAGES = ("selection", "evaluation")


class NoRunsError(ValueError):
    """The results hold no runs (of the spec, when one is given) for this sweep yet."""


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(root)


def _read_table(fs: pafs.FileSystem, path: str, table: str) -> pa.Table | None:
    """Every committed Parquet file under `path` (hidden temporaries skipped) read with the current
    schema of `table` (orchestrator.schema), or None if none.

    Every file is read with that one schema, whatever its own version: a column an older file lacks
    (e.g. `node` in a schema-1 file) is null in its rows, never dropped for the whole table.
    """
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    readable = [file for file in _parquet_files(fs, path) if _readable(fs, file)]
    if not readable:
        return None
    return ds.dataset(readable, schema=TABLES[table], filesystem=fs, format="parquet").to_table()


def _parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """The committed Parquet files under `path` (hidden temporaries and set-aside files skipped)."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File
        and info.base_name.endswith(".parquet")
        and not info.base_name.startswith((".", "_"))
    )


def _readable(fs: pafs.FileSystem, file: str) -> bool:
    """Whether a file's Parquet footer reads; an unreadable one (empty, truncated, garbage: a writer
    killed on an object store) is skipped with one warning line, so a report never stops on it."""
    try:
        with fs.open_input_file(file) as handle:
            pq.ParquetFile(handle).metadata  # noqa: B018 - reading the footer is the check
    except (OSError, pa.ArrowInvalid) as error:
        print(f"ccn: warning: skipped {file}: not a readable Parquet file ({error}); "
              "`ccn status` on the sweep sets it aside and its batch reruns", file=sys.stderr)
        return False
    return True


def spec_run_keys(spec) -> dict[str, frozenset[str]]:
    """stage -> the run keys a spec (a path or an orchestrator Sweep) can have in the results.

    selection: the spec's runs; evaluation: any of its settings on its evaluation seeds (the
    evaluation stage runs the winners, a subset of these).
    """
    from orchestrator.spec import load_spec

    sweep = load_spec(spec) if isinstance(spec, str | os.PathLike) else spec
    settings = {}  # one run per setting (everything but the seed)
    for run in sweep.runs:
        settings.setdefault(repr(dataclasses.replace(run, seed=0, learner_name="")), run)
    evaluation = {
        dataclasses.replace(run, seed=seed).run_key for run in settings.values() for seed in sweep.evaluation_seed_list
    }
    return {"selection": frozenset(run.run_key for run in sweep.runs), "evaluation": frozenset(evaluation)}


def spec_labels(spec) -> dict[str, str]:
    """run_key -> the learner's name in the spec (`name`, else its kind), for every run key the spec can
    have in the results (both stages). A name is a label, not part of a run's identity: renaming a learner
    block (or splitting one block into named ones) relabels finished runs without rerunning them."""
    from orchestrator.spec import load_spec

    sweep = load_spec(spec) if isinstance(spec, str | os.PathLike) else spec
    labels = {run.run_key: run.learner_name for run in sweep.runs}
    for run in sweep.runs:
        for seed in sweep.evaluation_seed_list:
            labels.setdefault(dataclasses.replace(run, seed=seed).run_key, run.learner_name)
    return labels


def _relabel(table: pa.Table | None, labels: dict[str, str] | None) -> pa.Table | None:
    """`table` with its learner_name column taken from `labels` (run_key -> name) where it has the key."""
    if table is None or not labels or "learner_name" not in table.column_names:
        return table
    names = [labels.get(key, name) for key, name in zip(table["run_key"].to_pylist(),
                                                        table["learner_name"].to_pylist(), strict=True)]
    index = table.column_names.index("learner_name")
    return table.set_column(index, table.schema.field(index), pa.array(names, table.schema.field(index).type))


def _only(table: pa.Table | None, keys: frozenset[str] | None) -> tuple[pa.Table | None, int]:
    """The rows of `table` whose run_key is in `keys` (all when keys is None), and how many were left out."""
    if table is None or keys is None:
        return table, 0
    kept = table.filter(pc.is_in(table["run_key"], value_set=pa.array(sorted(keys), pa.string())))
    return kept, table.num_rows - kept.num_rows


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
    setting_columns: tuple[str, ...]  # the columns that make up `config` (schema.SETTING_COLUMNS)
    has_evaluation: bool
    in_progress_runs: int  # metric rows without a runs row: runs of a batch being written
    failures: list[dict]  # failed batches (failures/*.json) of both stages
    spec: str | None = None  # the spec whose runs were read (None: every run in the sweep's folders)
    excluded_runs: int = 0  # runs rows in the folders that are not the spec's (an earlier edit of it)

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


def load(root: str, sweep: str | None = None, *, spec=None, run_keys=None) -> Results:
    """Read `<root>/<sweep>` (and `<root>/<sweep>.evaluation` if present) into DuckDB.

    sweep: None picks the spec's sweep, or else the only sweep under root (an error lists them when
    there are several). spec (a path or an orchestrator Sweep) or run_keys (an iterable): read
    exactly those runs, leaving out rows of other runs in the same folders (e.g. left from an
    earlier edit of the spec with other `steps`); their count is `excluded_runs`. With a spec, the
    learners' names are the spec's (spec_labels), whatever names the runs were written with.
    Raises NoRunsError (a ValueError) when there are no runs to read.
    """
    root = str(root)
    allowed: dict[str, frozenset[str] | None] = dict.fromkeys(STAGES)
    spec_name, labels = None, None
    if spec is not None and run_keys is not None:
        raise ValueError("give load() a spec or run_keys, not both")
    if spec is not None:
        from orchestrator.spec import load_spec

        spec = load_spec(spec) if isinstance(spec, str | os.PathLike) else spec
        if sweep is not None and sweep != spec.name:
            raise ValueError(f"{spec.path}: the spec's sweep is {spec.name!r}, not {sweep!r} (--sweep)")
        sweep, spec_name = spec.name, str(spec.path or spec.name)
        allowed, labels = spec_run_keys(spec), spec_labels(spec)
    elif run_keys is not None:
        allowed = dict.fromkeys(STAGES, frozenset(run_keys))
        spec_name = f"{len(allowed['selection'])} given run keys"
    if sweep is None:
        sweeps = list_sweeps(root)
        if len(sweeps) != 1:
            found = ", ".join(sweeps) or "none"
            raise ValueError(f"{root}: name the sweep to report (--sweep NAME); sweeps found: {found}")
        sweep = sweeps[0]
    if not is_safe_path_component(sweep) or sweep.endswith(EVALUATION_SUFFIX):
        raise ValueError(
            f"{sweep!r} is not a sweep name: one folder name under {root} (name the selection sweep; "
            f"its {EVALUATION_SUFFIX!r} folder is read with it)"
        )
    fs, base = _filesystem(root)
    connection = duckdb.connect()
    runs_parts, metrics_parts = [], []
    failures: list[dict] = []
    excluded = 0
    for stage, folder in zip(STAGES, (sweep, sweep + EVALUATION_SUFFIX), strict=True):
        runs_table, left_out = _only(_read_table(fs, f"{base}/{folder}/runs", "runs"), allowed[stage])
        runs_table = _relabel(runs_table, labels)  # the spec's names win over the ones the runs were written with
        metrics_table, _ = _only(_read_table(fs, f"{base}/{folder}/metrics", "metrics"), allowed[stage])
        excluded += left_out
        failures += [
            f
            for f in _read_failures(fs, f"{base}/{folder}/failures", stage)
            if allowed[stage] is None or allowed[stage] & set(f.get("run_keys", []))
        ]
        if runs_table is None or runs_table.num_rows == 0:
            if stage == "selection":
                of_spec = f" of {spec_name}" if spec_name else ""
                of_spec += f" ({left_out} other runs are)" if left_out else ""
                raise NoRunsError(
                    f"{root}/{sweep}: no runs{of_spec} yet (no Parquet rows under runs/); "
                    f"sweeps found: {', '.join(list_sweeps(root)) or 'none'}"
                )
            continue
        connection.register(f"runs_{stage}", runs_table)
        runs_parts.append(f"SELECT '{stage}' AS stage, * FROM runs_{stage}")
        if metrics_table is not None:
            connection.register(f"metrics_{stage}", metrics_table)
            metrics_parts.append(f"SELECT '{stage}' AS stage, * FROM metrics_{stage}")
    setting = SETTING_COLUMNS
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
        connection.register("metrics_empty", TABLES["metrics"].empty_table())
        connection.execute("CREATE TABLE metrics AS SELECT NULL::VARCHAR AS stage, * FROM metrics_empty LIMIT 0")
    identity = "r.stage, r.run_key, r.task, r.learner, r.learner_name, r.shape, r.config, r.seed, r.status, " \
        "r.steps, r.log_every, r.flops_per_step, r.paper_ops_per_step, r.cost_source"  # fmt: skip
    hyperparameters = ", ".join(f"r.{c}" for c in setting if c not in RUN_LENGTH_COLUMNS)
    connection.execute(
        f"""CREATE VIEW curves AS
        SELECT {identity}, m.step, m.cumulative_flops, m.msre_window
        FROM runs r JOIN metrics m ON m.run_key = r.run_key AND m.stage = r.stage"""
    )
    connection.execute(
        f"""CREATE VIEW summary AS
        SELECT {identity}, {hyperparameters},
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
        spec=spec_name,
        excluded_runs=excluded,
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
