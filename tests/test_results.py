"""The results store: atomic exactly-once files, resume discovery, failures, the documented schema."""

from __future__ import annotations

import re
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from learners.compute import Cost
from orchestrator.execute import NOT_DIVERGED, runs_row
from orchestrator.plan import plan_batches
from orchestrator.results import ResultsStore
from orchestrator.schema import METRICS_SCHEMA, RUNS_SCHEMA, to_table
from orchestrator.spec import load_spec

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results-schema.md"

SPEC = """
name = "demo"
steps = 2000
seeds = [0, 1]
log_every = 1000

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "20:4:500"
step_size = [0.01, 0.003]

[[learners]]
kind = "tbptt"
shape = "10:5"
step_size = [1e-3, 3e-4]
"""


@pytest.fixture
def batches(tmp_path):
    path = tmp_path / "demo.toml"
    path.write_text(textwrap.dedent(SPEC))
    sweep = load_spec(path)
    return plan_batches(sweep.name, sweep.runs, workers=2)


def fake_tables(batch, diverged_seed: int | None = None, attempt: int = 1):
    """Rows as an executor would write them, with made-up numbers (no learning)."""
    cost = Cost(
        params=100, learning_params=50, flops_per_step=1000 * (1 + len(batch.runs[0].config)), paper_ops_per_step=500
    )
    runs, metrics = [], []
    for run in batch.runs:
        diverged = 1500 if run.seed == diverged_seed else NOT_DIVERGED
        runs.append(
            runs_row(
                run,
                batch,
                cost,
                diverged_at=diverged,
                wall_seconds=1.5,
                attempt=attempt,
                finished_at=datetime.now(UTC),
                host="test",
                device="cpu",
            )
        )
        for step in range(run.log_every, run.steps + 1, run.log_every):
            if diverged == NOT_DIVERGED or step < diverged:
                error = run.hyper_dict["step_size"] * (1 + run.seed) / step
                metrics.append(
                    {
                        "run_key": run.run_key,
                        "learner": run.learner,
                        "task": run.task.name,
                        "step": step,
                        "cumulative_flops": cost.flops_per_step * step,
                        "msre_window": error,
                        "msre_interval": error,
                    }
                )
    return to_table("runs", runs), to_table("metrics", metrics)


def write(store: ResultsStore, batch, **kwargs):
    runs, metrics = fake_tables(batch, **kwargs)
    store.write_batch(batch.learner, batch.task, batch.batch_key, runs, metrics)


def test_written_batches_are_discovered_as_completed(tmp_path, batches):
    store = ResultsStore(str(tmp_path / "results"), "demo")
    assert store.completed_runs() == {}
    write(store, batches[0])
    completed = store.completed_runs()
    assert set(completed) == {run.run_key for run in batches[0].runs}
    path = Path(store.batch_path("runs", batches[0].learner, batches[0].task, batches[0].batch_key))
    assert path.is_file() and path.parent.name == f"task={batches[0].task}"
    assert path.parent.parent.name == f"learner={batches[0].learner}"


def test_rewriting_a_batch_leaves_exactly_one_row_per_run(tmp_path, batches):
    store = ResultsStore(str(tmp_path / "results"), "demo")
    for attempt in (1, 2, 2):
        write(store, batches[0], attempt=attempt)
    table = store.dataset("runs").to_table()
    assert table.num_rows == len(batches[0].runs)
    assert store.duplicate_run_keys() == []
    assert set(table["attempt"].to_pylist()) == {2}
    metrics = store.dataset("metrics").to_table()
    assert metrics.num_rows == len(batches[0].runs) * 2


@pytest.mark.parametrize("root", ["results", "runs/results", "metrics/x/runs"])
def test_temporary_and_orphan_files_are_invisible_and_removed(tmp_path, batches, root):
    # a results root below a folder named `runs` or `metrics` once made every metrics file look orphaned
    store = ResultsStore(str(tmp_path / root), "demo")
    write(store, batches[0])
    runs_path = Path(store.batch_path("runs", batches[0].learner, batches[0].task, batches[0].batch_key))
    (runs_path.parent / f".{runs_path.name}.abc.tmp").write_bytes(b"half a file")
    # a batch killed between its metrics file and its runs file leaves an orphan metrics file
    orphan_runs, orphan_metrics = fake_tables(batches[1])
    orphan = store.batch_path("metrics", batches[1].learner, batches[1].task, batches[1].batch_key)
    Path(orphan).parent.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(orphan_metrics, orphan)
    assert set(store.completed_runs()) == {run.run_key for run in batches[0].runs}
    assert store.remove_orphans() == 2
    assert not Path(orphan).exists() and not list(runs_path.parent.glob(".*.tmp"))
    assert store.dataset("metrics").to_table().num_rows == len(batches[0].runs) * 2
    assert store.batches_without_metrics() == []
    Path(store.batch_path("metrics", batches[0].learner, batches[0].task, batches[0].batch_key)).unlink()
    assert store.batches_without_metrics() == [batches[0].batch_key]  # `ccn status` warns about it


def test_failure_records_are_superseded_by_a_later_success(tmp_path, batches):
    store = ResultsStore(str(tmp_path / "results"), "demo")
    keys = [run.run_key for run in batches[0].runs]
    store.record_failure(batches[0].batch_key, keys, attempts=3, error="RuntimeError: boom")
    [failure] = store.failures()
    assert failure["run_keys"] == sorted(keys) and failure["error"] == "RuntimeError: boom"
    write(store, batches[0])
    assert store.failures() == []


def test_a_filesystem_uri_root_works_like_a_path(tmp_path, batches):
    store = ResultsStore(f"file://{tmp_path}/uri-results", "demo")
    write(store, batches[0])
    assert set(ResultsStore(str(tmp_path / "uri-results"), "demo").completed_runs()) == {
        run.run_key for run in batches[0].runs
    }


def test_tables_of_another_schema_are_refused(tmp_path, batches):
    store = ResultsStore(str(tmp_path / "results"), "demo")
    runs, metrics = fake_tables(batches[0])
    with pytest.raises(ValueError, match="schema"):
        store.write_batch("ccn", "x", "k", runs.drop_columns(["seed"]), metrics)
    with pytest.raises(ValueError, match="not_a_column"):
        to_table("runs", [{"not_a_column": 1}])


def _documented_columns(section: str) -> list[tuple[str, str]]:
    text = DOCS.read_text().split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", text, flags=re.MULTILINE)


@pytest.mark.parametrize(("section", "schema"), [("runs", RUNS_SCHEMA), ("metrics", METRICS_SCHEMA)])
def test_docs_list_exactly_the_schema_columns_in_order(section, schema):
    documented = _documented_columns(section)
    assert documented == [(field.name, str(field.type)) for field in schema]


def test_every_duckdb_example_in_the_docs_runs_on_real_files(tmp_path, batches):
    store = ResultsStore(str(tmp_path / "results"), "demo")
    for batch in batches:
        write(store, batch, diverged_seed=1 if batch is batches[0] else None)
    queries = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert len(queries) >= 4
    for query in queries:
        rows = duckdb.sql(query.replace("'results/demo/", f"'{tmp_path}/results/demo/")).fetchall()
        assert rows, query
    best = duckdb.sql(queries[2].replace("'results/demo/", f"'{tmp_path}/results/demo/")).fetchall()
    assert {row[0] for row in best} == {"ccn", "tbptt"}
