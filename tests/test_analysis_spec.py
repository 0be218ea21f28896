"""analysis reads exactly the spec's runs, with one reader, and `ccn compare` uses the analysis rule.

Results are written as the executor writes them (runs_row, ResultsStore.write_batch), for real
specs, with made-up errors (no learning): seconds, no Ray.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow.parquet as pq
import pytest

import analysis
from learners.compute import Cost
from orchestrator import api, cli
from orchestrator.execute import NOT_DIVERGED, runs_row
from orchestrator.plan import plan_batches
from orchestrator.results import ResultsStore
from orchestrator.schema import to_table
from orchestrator.spec import load_spec

SPEC = """
name = "edit"
steps = {steps}
log_every = 500
seeds = [0, 1]
evaluation_seeds = 2

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "3:3:inf"
step_size = [0.1, 0.01]
"""
COST = Cost(params=10, learning_params=5, flops_per_step=1000, paper_ops_per_step=100)
# final error by (steps, step_size): at 1,000 steps alpha = 0.1 wins, at 2,000 steps alpha = 0.01;
# averaged over both lengths (the old grouping) alpha = 0.1 would win (0.225 against 0.35)
ERROR = {(1000, 0.1): 0.05, (1000, 0.01): 0.5, (2000, 0.1): 0.4, (2000, 0.01): 0.2}


def write_results(root, sweep, *, truncated=(), batch_size=None) -> None:
    """Every run of `sweep` written through the results store; truncated: (step_size, seed) pairs
    whose metrics stop at the first log point (a run without its final metrics)."""
    store = ResultsStore(str(root), sweep.name)
    for batch in plan_batches(sweep.name, sweep.runs, workers=1, batch_size=batch_size):
        runs, metrics = [], []
        for run in batch.runs:
            runs.append(
                runs_row(
                    run, batch, COST, diverged_at=NOT_DIVERGED, wall_seconds=1.0, attempt=1,
                    finished_at=datetime.now(UTC), host="test", device="cpu",
                )
            )  # fmt: skip
            alpha = run.hyper_dict["step_size"]
            final = ERROR[(run.steps, alpha)] + 0.01 * run.seed
            for step in range(run.log_every, run.steps + 1, run.log_every):
                if (alpha, run.seed) in truncated and step > run.log_every:
                    break
                value = final * (1 + (run.steps - step) / run.steps) if step < run.steps else final
                if (alpha, run.seed) in truncated:
                    value = 0.0  # the lowest error of all, at a step before the end
                metrics.append(
                    {"run_key": run.run_key, "learner": run.learner, "task": run.task.name, "step": step,
                     "cumulative_flops": COST.flops_per_step * step, "msre_window": value}
                )  # fmt: skip
        tables = to_table("runs", runs), to_table("metrics", metrics)
        store.write_batch(batch.learner, batch.task, batch.batch_key, *tables)


@pytest.fixture
def two_versions(tmp_path):
    """One results root holding the sweep `edit` at steps = 1000 (with its evaluation stage), then
    the same spec edited to steps = 2000 (selection only)."""
    old, new = tmp_path / "old.toml", tmp_path / "edit.toml"
    old.write_text(SPEC.format(steps=1000))
    new.write_text(SPEC.format(steps=2000))
    root = tmp_path / "results"
    write_results(root, load_spec(old))
    write_results(root, api.evaluation_sweep(old, str(root)))
    write_results(root, load_spec(new))
    return {"old": old, "new": new, "root": str(root), "folder": tmp_path}


def test_analysis_given_the_spec_reads_exactly_its_runs(two_versions):
    new = load_spec(two_versions["new"])
    results = analysis.load(two_versions["root"], spec=two_versions["new"])
    assert results.sweep == "edit" and results.excluded_runs == 4 + 2  # the old selection and evaluation runs
    assert {key for (key,) in results.sql("SELECT run_key FROM runs").fetchall()} == {r.run_key for r in new.runs}
    assert not results.has_evaluation  # the old evaluation runs are not this spec's
    [winner] = analysis.select(results)
    assert "step_size=0.01," in winner["config"] and winner["config"].endswith("steps=2000, log_every=500")
    assert winner["seeds"] == 2 and set(winner["run_keys"]) <= {r.run_key for r in new.runs}
    # the same with the run keys given directly
    by_keys = analysis.load(two_versions["root"], "edit", run_keys=[r.run_key for r in new.runs])
    assert analysis.select(by_keys)[0]["run_keys"] == winner["run_keys"]


def test_without_a_spec_runs_of_different_lengths_are_never_averaged(two_versions):
    results = analysis.load(two_versions["root"], "edit")
    assert results.excluded_runs == 0 and results.spec is None
    settings = analysis.settings(results)
    assert len(settings) == 4 and all(s["runs"] == 2 for s in settings)  # (steps, step_size): 2 seeds each
    winners = {w["steps"]: w for w in analysis.select(results)}
    assert set(winners) == {1000, 2000}
    assert "step_size=0.1," in winners[1000]["config"] and "step_size=0.01," in winners[2000]["config"]
    assert winners[2000]["setting"].startswith("steps=2000, log_every=500")  # the table tells them apart
    steps_of = dict(results.sql("SELECT run_key, steps FROM runs").fetchall())
    for steps, winner in winners.items():
        assert winner["seeds"] == 2 and {steps_of[key] for key in winner["run_keys"]} == {steps}
    for row in analysis.comparison(results):
        assert row["error"].n == 2


def test_the_evaluation_stage_chooses_among_the_spec_runs_only(two_versions):
    evaluation = api.evaluation_sweep(two_versions["new"], two_versions["root"])
    assert {(run.hyper_dict["step_size"], run.steps) for run in evaluation.runs} == {(0.01, 2000)}
    assert sorted(run.seed for run in evaluation.runs) == [2, 3]


def test_report_given_the_spec_says_what_it_left_out(two_versions, capsys):
    root, folder = two_versions["root"], two_versions["folder"]
    assert cli.main(["report", root, "--spec", str(two_versions["new"]), "--out", str(folder / "r")]) == 0
    printed = capsys.readouterr().out
    assert "note: 6 runs in the sweep's folders are not runs of" in printed and "Student t" in printed
    text = (folder / "r" / "report.md").read_text()
    assert "Runs read: exactly those of the spec" in text and "steps=1000" not in text
    assert cli.main(["report", root, "--sweep", "edit", "--out", str(folder / "all")]) == 0
    assert "several lengths (steps=1000, log_every=500; steps=2000, log_every=500)" in capsys.readouterr().out
    assert cli.main(["report", root, "--spec", str(two_versions["new"]), "--sweep", "x", "--out", str(folder)]) == 2
    assert "the spec's sweep is 'edit', not 'x'" in capsys.readouterr().err


def test_compare_is_the_analysis_selection_rule(tmp_path, capsys):
    # alpha = 0.01's seed 1 lacks its final metrics: analysis does not count it as finished, so the
    # setting is not eligible (the old `ccn compare` took its last logged value, 0.0, and chose it)
    spec = tmp_path / "edit.toml"
    spec.write_text(SPEC.format(steps=2000))
    root = str(tmp_path / "results")
    assert api.compare(spec, root) == []
    write_results(tmp_path / "results", load_spec(spec), truncated={(0.01, 1)})
    table = api.compare(spec, root)
    expected = analysis.select(analysis.load(root, spec=spec))
    assert [(r["task"], r["learner_name"], r["shape"], r["config"]) for r in table] == [
        (w["task"], w["learner_name"], w["shape"], w["config"]) for w in expected
    ]
    assert "step_size=0.1," in table[0]["config"]
    assert table[0]["error"].n == 2 and table[0]["error"].mean == pytest.approx(0.405)
    assert cli.main(["compare", str(spec), "--results", root]) == 0
    printed = capsys.readouterr().out
    assert "step_size=0.1" in printed and "final error [95% t CI]" in printed and "Student t" in printed


def test_one_reader_reads_old_schema_files_with_the_current_schema(tmp_path):
    spec = tmp_path / "edit.toml"
    spec.write_text(SPEC.format(steps=1000))
    write_results(tmp_path / "results", load_spec(spec), batch_size=2)
    files = sorted((tmp_path / "results" / "edit" / "runs").rglob("*.parquet"))
    assert len(files) == 2
    # the file listed first is a schema-1 file: no `node`, no `resumed_from_step`
    first = pq.read_table(files[0])
    pq.write_table(first.drop_columns(["node", "resumed_from_step"]), files[0])
    second = pq.read_table(files[1])
    second = second.set_column(second.schema.get_field_index("node"), "node", [["node-a"] * second.num_rows])
    pq.write_table(second, files[1])
    results = analysis.load(str(tmp_path / "results"), "edit")
    assert {"node", "resumed_from_step"} <= set(results.runs().columns)
    assert results.sql("SELECT count(node), count(*) FROM runs").fetchall() == [(second.num_rows, 4)]


def test_names_come_from_the_spec_so_splitting_a_learner_block_needs_no_rerun(tmp_path):
    """Runs written under one unnamed block (`columnar`, two step sizes) are read as two learners once the spec splits
    the block into two named ones: names are labels, not identity, so the run keys are the same."""
    one = tmp_path / "edit.toml"
    one.write_text(SPEC.format(steps=1000))
    root = str(tmp_path / "results")
    write_results(tmp_path / "results", load_spec(one))
    split = tmp_path / "split" / "edit.toml"
    split.parent.mkdir()
    block = SPEC.format(steps=1000).split("[[learners]]")[0]
    split.write_text(
        block
        + '[[learners]]\nkind = "ccn"\nname = "ccn-fast"\nshape = "3:3:inf"\nstep_size = 0.1\n'
        + '[[learners]]\nkind = "ccn"\nname = "ccn-slow"\nshape = "3:3:inf"\nstep_size = 0.01\n'
    )
    assert {r.run_key for r in load_spec(split).runs} == {r.run_key for r in load_spec(one).runs}
    written = analysis.load(root, "edit")
    assert {w["learner_name"] for w in analysis.select(written)} == {"columnar"}  # as the runs were written
    relabelled = analysis.load(root, spec=split)
    winners = {w["learner_name"]: w for w in analysis.select(relabelled)}
    assert set(winners) == {"ccn-fast", "ccn-slow"} and relabelled.excluded_runs == 0
    assert "step_size=0.1," in winners["ccn-fast"]["config"] and "step_size=0.01," in winners["ccn-slow"]["config"]
    # the evaluation stage then runs both learners' winners, under the spec's names
    evaluation = api.evaluation_sweep(split, root)
    assert sorted((r.learner_name, r.hyper_dict["step_size"], r.seed) for r in evaluation.runs) == [
        ("ccn-fast", 0.1, 2), ("ccn-fast", 0.1, 3), ("ccn-slow", 0.01, 2), ("ccn-slow", 0.01, 3)
    ]
    write_results(tmp_path / "results", evaluation)
    table = analysis.comparison(analysis.load(root, spec=split))
    assert {(row["learner_name"], row["stage"], row["error"].n) for row in table} == {
        ("ccn-fast", "evaluation", 2), ("ccn-slow", "evaluation", 2)
    }
