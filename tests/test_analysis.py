"""analysis/: bootstrap coverage, selection, compute matching, on synthetic Parquet results."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from analysis import bootstrap_ci, bootstrap_difference, comparison, frontier, load, select, write_report
from orchestrator.schema import to_table

STEPS, LOG_EVERY = 1000, 250
# learner label -> (kind, shape, flops_per_step, paper_ops_per_step, {step_size: true final error})
LEARNERS = {
    "columnar": ("ccn", "7:7:inf", 1000, 100, {0.1: 0.50, 0.01: 0.20, 0.001: 0.30}),
    "tbptt": ("tbptt", "2:4", 1100, 110, {0.1: 0.40, 0.01: 0.35, 0.001: 0.25}),
    "ccn": ("ccn", "20:4:100", 5000, 400, {0.1: 0.15, 0.01: 0.10, 0.001: 0.12}),
}
BEST = {"columnar": 0.01, "tbptt": 0.001, "ccn": 0.01}


def write_sweep(
    root, sweep: str, seeds, *, learners=LEARNERS, diverge=(), noise=0.01, rng_seed=0, task="t", task_params=None
) -> None:
    """Synthetic results in the documented layout: one runs and one metrics file per learner.

    diverge: (label, step_size, seed) triples whose run diverges at step 500.
    """
    rng = np.random.default_rng(rng_seed)
    for label, (kind, shape, flops, paper_ops, errors) in learners.items():
        runs, metrics = [], []
        for step_size, final in errors.items():
            for seed in seeds:
                key = f"{sweep}-{task}-{label}-{step_size}-{seed}"
                diverged = (label, step_size, seed) in diverge
                runs.append(
                    {
                        "run_key": key, "sweep": sweep, "learner": kind, "learner_name": label, "shape": shape,
                        "step_size": step_size, "lam": 0.9, "task": task, "task_kind": "trace_patterning",
                        "task_params": json.dumps(task_params or {}),
                        "seed": seed, "steps": STEPS, "log_every": LOG_EVERY, "flops_per_step": flops,
                        "paper_ops_per_step": paper_ops, "status": "diverged" if diverged else "complete",
                        "diverged_at_step": 500 if diverged else None,
                    }
                )  # fmt: skip
                end = final + noise * rng.standard_normal()
                for step in range(LOG_EVERY, STEPS + 1, LOG_EVERY):
                    if diverged and step >= 500:
                        break
                    metrics.append(
                        {
                            "run_key": key, "learner": kind, "task": task, "step": step,
                            "cumulative_flops": flops * step, "msre_window": end * (1 + (STEPS - step) / STEPS),
                        }
                    )  # fmt: skip
        for table, rows in (("runs", runs), ("metrics", metrics)):
            folder = root / sweep / table / f"learner={kind}" / f"task={task}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(to_table(table, rows), folder / f"{label}.parquet")


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # 1,000 repetitions of 20 normal draws; percentile intervals of small samples under-cover a bit,
    # so the tolerance is 0.90..0.975 (binomial sd at 1,000 repetitions is 0.007).
    rng = np.random.default_rng(1)
    covered = 0
    for repetition in range(1000):
        sample = rng.normal(3.0, 2.0, size=20)
        interval = bootstrap_ci(sample, resamples=2000, seed=repetition)
        covered += interval.low <= 3.0 <= interval.high
    assert 0.90 <= covered / 1000 <= 0.975


def test_bootstrap_is_seeded_and_reports_its_seed_count():
    values = [1.0, 2.0, 4.0]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values).n == 3 and bootstrap_ci(values).mean == pytest.approx(7 / 3)


def test_paired_difference_removes_shared_seed_noise():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 10, size=10)  # per-seed difficulty, common to both learners
    a = {s: shared[s] + 1.0 for s in range(10)}
    b = {s: shared[s] for s in range(10)}
    paired = bootstrap_difference(a, b)
    assert paired.paired and paired.n == 10
    assert paired.low == pytest.approx(1.0) and paired.high == pytest.approx(1.0)
    unpaired = bootstrap_difference(a, {s + 100: v for s, v in b.items()})
    assert unpaired.paired is False and unpaired.high - unpaired.low > 1.0


def test_selection_picks_the_known_best_configuration(tmp_path):
    # columnar's alpha=0.1 would be best but one of its seeds diverged: not eligible
    learners = dict(LEARNERS, columnar=("ccn", "7:7:inf", 1000, 100, {0.1: 0.05, 0.01: 0.20, 0.001: 0.30}))
    write_sweep(tmp_path, "syn", range(5), learners=learners, diverge={("columnar", 0.1, 2)})
    winners = {w["learner_name"]: w for w in select(load(str(tmp_path), "syn"))}
    assert {name: w["config"] for name, w in winners.items()} == {
        name: f"step_size={BEST[name]}, lam=0.9" for name in LEARNERS
    }
    assert all(w["seeds"] == 5 and w["candidates"] == 3 for w in winners.values())


def test_selection_by_area_under_the_curve(tmp_path):
    write_sweep(tmp_path, "syn", range(3))
    winners = {w["learner_name"]: w for w in select(load(str(tmp_path), "syn"), "auc")}
    assert winners["tbptt"]["config"].startswith("step_size=0.001")
    with pytest.raises(ValueError, match="criterion"):
        select(load(str(tmp_path), "syn"), "median")


def test_compute_matched_table_pairs_learners_with_equal_flops(tmp_path):
    write_sweep(tmp_path, "syn", range(4))
    table = comparison(load(str(tmp_path), "syn"), resamples=500)
    group = {row["learner_name"]: row["group"] for row in table}
    # columnar (1000) and tbptt (1100) are within 15%; ccn (5000) is alone
    assert group["columnar"] == group["tbptt"] != group["ccn"]
    by_name = {row["learner_name"]: row for row in table}
    assert by_name["columnar"]["versus_best"].n == 0  # it is the best of its group
    tbptt_minus_columnar = by_name["tbptt"]["versus_best"]
    assert tbptt_minus_columnar.paired and tbptt_minus_columnar.n == 4
    assert tbptt_minus_columnar.mean == pytest.approx(0.05, abs=0.03)
    assert all(row["stage"] == "selection" for row in table)  # no evaluation stage: biased
    # equal total compute: the cheapest learner's 1000 * 1000 FLOPs; ccn reaches 200 steps < 250: none
    assert by_name["ccn"]["budget_flops"] == 1_000_000 and by_name["ccn"]["at_budget"].n == 0
    assert by_name["tbptt"]["at_budget"].n == 4  # its log point at step 750 (825,000 FLOPs)
    paper = {
        r["learner_name"]: r["group"] for r in comparison(load(str(tmp_path), "syn"), group_by="paper_ops_per_step")
    }
    assert paper["columnar"] == paper["tbptt"] != paper["ccn"]
    assert [(p["learner_name"], p["flops_per_step"]) for p in frontier(table)] == [
        ("ccn", 5000),
        ("columnar", 1000),
        ("tbptt", 1100),
    ]


def test_comparison_reports_evaluation_runs_only_when_there_are_some(tmp_path):
    write_sweep(tmp_path, "syn", range(3), noise=0.0)
    # evaluation of each winner on fresh seeds, where the truth is worse (selection was lucky)
    winners = {
        name: ("ccn" if name != "tbptt" else "tbptt", s, f, p, {BEST[name]: 0.9})
        for name, (_, s, f, p, _) in LEARNERS.items()
    }
    write_sweep(tmp_path, "syn.evaluation", range(10, 15), learners=winners, noise=0.0)
    results = load(str(tmp_path), "syn")
    assert results.has_evaluation
    table = comparison(results, resamples=200)
    assert all(row["stage"] == "evaluation" for row in table)
    assert all(row["error"].n == 5 and row["error"].mean == pytest.approx(0.9) for row in table)


def test_report_on_synthetic_results_says_selection_biased_and_lists_missing(tmp_path):
    write_sweep(tmp_path, "syn", range(3))
    (tmp_path / "syn" / "runs" / "learner=ccn" / "task=t" / "ccn.parquet").unlink()  # still running
    report = write_report(str(tmp_path), tmp_path / "out", "syn", resamples=200)
    text = report.path.read_text()
    assert report.biased and "selection-biased" in text
    assert "metrics but no runs row" in text
    assert "![frontier_t](frontier_t.png)" in text


def test_load_names_the_sweeps_when_it_cannot_choose(tmp_path):
    write_sweep(tmp_path, "a", [0])
    write_sweep(tmp_path, "b", [0])
    with pytest.raises(ValueError, match="sweeps found: a, b"):
        load(str(tmp_path))
    assert load(str(tmp_path), "a").sweep == "a"
    assert load(f"file://{tmp_path}", "b").sql("SELECT count(*) FROM runs").fetchall()[0][0] == 9


def test_cli_report_without_results_is_one_clear_error(tmp_path, capsys):
    from orchestrator import cli

    assert cli.main(["report", str(tmp_path), "--sweep", "nothing", "--out", str(tmp_path / "out")]) == 2
    assert "nothing: no runs yet" in capsys.readouterr().err


def test_evaluation_seeds_follow_the_largest_selection_seed_and_must_be_positive(tmp_path):
    from orchestrator.spec import SpecError, load_spec

    base = 'name = "s"\nsteps = 100\nseeds = [4, 0, 9]\n{extra}\n[[tasks]]\nkind = "trace_patterning"\n' \
        '[[learners]]\nkind = "ccn"\nshape = "3:3:inf"\nstep_size = 0.01\n'  # fmt: skip
    spec = tmp_path / "s.toml"
    spec.write_text(base.format(extra="evaluation_seeds = 3"))
    assert load_spec(spec).evaluation_seed_list == (10, 11, 12)
    spec.write_text(base.format(extra=""))
    assert len(load_spec(spec).evaluation_seed_list) == 5
    spec.write_text(base.format(extra="evaluation_seeds = 0"))
    with pytest.raises(SpecError, match="evaluation_seeds"):
        load_spec(spec)


def test_report_along_a_task_parameter_tabulates_and_plots_error_against_it(tmp_path):
    # two ISIs: the longer one is harder for every learner (errors scaled by 2)
    write_sweep(tmp_path, "isi", range(3), noise=0.0, task="isi-20", task_params={"isi_range": [16, 24], "gamma": 0.95})
    harder = {
        name: (kind, shape, flops, ops, {alpha: 2 * error for alpha, error in errors.items()})
        for name, (kind, shape, flops, ops, errors) in LEARNERS.items()
    }
    write_sweep(tmp_path, "isi", range(3), noise=0.0, learners=harder, task="isi-40",
                task_params={"isi_range": [32, 48], "gamma": 0.975})
    report = write_report(str(tmp_path), tmp_path / "out", "isi", resamples=200, along="isi_range")
    text = report.path.read_text()
    assert "## Final error against `isi_range`" in text and "![along_isi_range](along_isi_range.png)" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith(("| 20 ", "| 40 "))}
    assert set(rows) == {"20", "40"}
    assert "0.1 [0.1, 0.1] (n=3)" in rows["20"] and "0.2 [0.2, 0.2] (n=3)" in rows["40"]  # ccn's winner: 0.10, 0.20
    assert (tmp_path / "out" / "along_isi_range.png").stat().st_size > 5_000
    report = write_report(str(tmp_path), tmp_path / "out2", "isi", resamples=200, along="gamma")
    assert "| 0.975 |" in report.path.read_text()
    with pytest.raises(ValueError, match="task parameter 'iti_range' is not a number .* in: isi-20"):
        write_report(str(tmp_path), tmp_path / "out3", "isi", resamples=200, along="iti_range")


def test_every_runs_column_is_either_bookkeeping_or_a_learner_setting():
    # a column added to the runs schema must not silently become part of `config` (splitting seeds)
    from analysis.results import _NOT_SETTING
    from orchestrator.schema import LEARNER_SETTING_COLUMNS, RUNS_SCHEMA

    shape_fields = {"total_columns", "columns_per_stage", "steps_per_stage", "truncation", "hidden"}
    settings = set(LEARNER_SETTING_COLUMNS) - shape_fields
    assert set(RUNS_SCHEMA.names) - _NOT_SETTING == settings
