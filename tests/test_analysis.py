"""analysis/: selection, compute matching, one reader, the spec's runs only, on synthetic Parquet results.

Interval coverage: tests/test_stats.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from analysis import comparison, difference_interval, format_table, frontier, load, select, write_report
from analysis.references import TaskLevels
from analysis.tables import across_tasks, table_decimals
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
    root, sweep: str, seeds, *, learners=LEARNERS, diverge=(), noise=0.01, rng_seed=0, task="t", task_params=None,
    blow_up=(), learner_settings=None,
) -> None:
    """Synthetic results in the documented layout: one runs and one metrics file per learner.

    diverge: (label, step_size, seed) triples whose run diverges at step 500.
    blow_up: (label, step_size, seed) triples whose final error is 1,000x the learner's (finite, complete).
    learner_settings: label -> the runs' `learner_settings` JSON text (a section 9 learner's settings).
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
                        "learner_settings": (learner_settings or {}).get(label),
                    }
                )  # fmt: skip
                end = final + noise * rng.standard_normal()
                end *= 1000 if (label, step_size, seed) in blow_up else 1
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


def test_paired_difference_removes_shared_seed_noise():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 10, size=10)  # per-seed difficulty, common to both learners
    a = {s: shared[s] + 1.0 for s in range(10)}
    b = {s: shared[s] for s in range(10)}
    paired = difference_interval(a, b)
    assert paired.paired and paired.n == 10
    assert paired.low == pytest.approx(1.0) and paired.high == pytest.approx(1.0)
    unpaired = difference_interval(a, {s + 100: v for s, v in b.items()})
    assert unpaired.paired is False and unpaired.high - unpaired.low > 1.0


def test_selection_picks_the_known_best_configuration(tmp_path):
    # columnar's alpha=0.1 would be best but one of its seeds diverged: not eligible
    learners = dict(LEARNERS, columnar=("ccn", "7:7:inf", 1000, 100, {0.1: 0.05, 0.01: 0.20, 0.001: 0.30}))
    write_sweep(tmp_path, "syn", range(5), learners=learners, diverge={("columnar", 0.1, 2)})
    winners = {w["learner_name"]: w for w in select(load(str(tmp_path), "syn"))}
    assert {name: w["config"] for name, w in winners.items()} == {
        name: f"step_size={BEST[name]}, lam=0.9, steps={STEPS}, log_every={LOG_EVERY}" for name in LEARNERS
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
    table = comparison(load(str(tmp_path), "syn"))
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
    table = comparison(results)
    assert all(row["stage"] == "evaluation" for row in table)
    assert all(row["error"].n == 5 and row["error"].mean == pytest.approx(0.9) for row in table)


def test_report_on_synthetic_results_says_selection_biased_and_lists_missing(tmp_path):
    write_sweep(tmp_path, "syn", range(3))
    (tmp_path / "syn" / "runs" / "learner=ccn" / "task=t" / "ccn.parquet").unlink()  # still running
    report = write_report(str(tmp_path), tmp_path / "out", "syn", levels={})
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
    levels = {"isi-20": TaskLevels("isi-20", 0.5, 0.4), "isi-40": TaskLevels("isi-40", 0.6, 0.45)}
    report = write_report(str(tmp_path), tmp_path / "out", "isi", along="isi_range", levels=levels)
    text = report.path.read_text()
    assert "## Final error against `isi_range`" in text and "![along_isi_range](along_isi_range.png)" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith(("| 20 ", "| 40 "))}
    assert set(rows) == {"20", "40"}
    assert "0.1000 [0.1000, 0.1000] (n=3)" in rows["20"]  # ccn's winner: 0.1
    assert "0.2000 [0.2000, 0.2000] (n=3)" in rows["40"]  # and 0.2
    assert "| predict 0 | predict mean |" in text and "| 20 | 0.5000 | 0.4000 |" in rows["20"]  # each task's levels
    assert (tmp_path / "out" / "along_isi_range.png").stat().st_size > 5_000
    report = write_report(str(tmp_path), tmp_path / "out2", "isi", along="gamma", levels=levels)
    assert "| 0.975 |" in report.path.read_text()
    with pytest.raises(ValueError, match="task parameter 'iti_range' is not a number .* in: isi-20"):
        write_report(str(tmp_path), tmp_path / "out3", "isi", along="iti_range", levels=levels)


def test_across_tasks_errors_are_in_units_of_each_tasks_predict_mean_level(tmp_path):
    # two games ten times apart in scale: raw errors cannot be averaged, errors / predict-mean can
    write_sweep(tmp_path, "games", range(3), noise=0.0, task="pong")
    scale = {"columnar": 10, "tbptt": 3, "ccn": 10}  # on breakout T-BPTT does relatively better
    breakout = {
        name: (kind, shape, flops, ops, {alpha: scale[name] * error for alpha, error in errors.items()})
        for name, (kind, shape, flops, ops, errors) in LEARNERS.items()
    }
    write_sweep(tmp_path, "games", range(3), noise=0.0, learners=breakout, task="breakout")
    levels = {"pong": TaskLevels("pong", 0.6, 0.5), "breakout": TaskLevels("breakout", 6.0, 5.0)}
    rows = across_tasks(comparison(load(str(tmp_path), "games")), levels)
    by_name = {row["learner_name"]: row for row in rows}
    assert [row["learner_name"] for row in rows] == ["ccn", "tbptt", "columnar"]
    assert by_name["ccn"]["ratios"] == pytest.approx({"pong": 0.2, "breakout": 0.2})  # 0.1 / 0.5, 1.0 / 5
    assert by_name["tbptt"]["normalised"].mean == pytest.approx((0.25 / 0.5 + 0.75 / 5) / 2)
    assert by_name["tbptt"]["normalised"].n == 3 and by_name["tbptt"]["values"] == pytest.approx({0: 0.325, 1: 0.325,
                                                                                                 2: 0.325})
    assert by_name["columnar"]["versus_best"].mean == pytest.approx(0.4 - 0.2)
    assert by_name["ccn"]["versus_best"].n == 0  # the best
    assert by_name["ccn"]["lowest"] == ["pong"] and by_name["tbptt"]["lowest"] == ["breakout"]
    assert by_name["ccn"]["below"] == ["breakout", "pong"]
    text = write_report(str(tmp_path), tmp_path / "out", "games", levels=levels).path.read_text()
    assert "## Across tasks: error relative to predicting the mean return" in text
    row = ("| tbptt (selection, biased) | 2:4 | 2 | 0.325 [0.325, 0.325] (n=3) | +0.125 [+0.125, +0.125] | 1 of 2 | "
           "2 of 2 | 0.150 | 0.500 |")
    assert row in text  # the per-task columns in task order: breakout, pong
    assert "![across_tasks](across_tasks.png)" in text
    assert (tmp_path / "out" / "across_tasks.png").stat().st_size > 5_000
    one_task = across_tasks(comparison(load(str(tmp_path), "games")), {"pong": levels["pong"]})
    assert one_task == []  # one task with a known level: nothing to average
    write_sweep(tmp_path, "one", range(3), noise=0.0)
    single = write_report(str(tmp_path), tmp_path / "out1", "one", levels=levels)
    assert "## Across tasks" not in single.path.read_text()


def test_every_runs_column_has_exactly_one_role_and_config_is_made_of_the_setting_columns(tmp_path):
    # one definition (orchestrator.schema): a new runs column must be given a role, and analysis builds
    # `config` from exactly the setting columns (hyperparameters and the run length)
    from orchestrator import schema

    roles = (schema.IDENTITY_COLUMNS, schema.SHAPE_COLUMNS, schema.SETTING_COLUMNS, schema.OUTCOME_COLUMNS)
    assert sorted(c for role in roles for c in role) == sorted(schema.RUNS_SCHEMA.names)
    assert set(schema.SETTING_COLUMNS) == (
        set(schema.LEARNER_SETTING_COLUMNS) - set(schema.SHAPE_COLUMNS)
    ) | {"steps", "log_every", "learner_settings"}  # learner_settings: JSON of settings without a column
    write_sweep(tmp_path, "syn", [0])
    results = load(str(tmp_path), "syn")
    assert results.setting_columns == schema.SETTING_COLUMNS
    query = "SELECT DISTINCT config FROM runs WHERE learner_name = 'tbptt' AND step_size = 0.01"
    [(config,)] = results.sql(query).fetchall()
    assert config == f"step_size=0.01, lam=0.9, steps={STEPS}, log_every={LOG_EVERY}"


def test_a_table_uses_one_number_format_and_shows_the_reference_levels(tmp_path):
    """Errors of very different sizes (0.01867 and a difference of 1.3e-05) share one fixed-point format."""
    close = {
        "columnar": ("ccn", "7:7:inf", 1000, 100, {0.01: 0.01867}),
        "tbptt": ("tbptt", "2:4", 1100, 110, {0.01: 0.0186830}),  # 1.3e-05 worse: same compute group
        "ccn": ("ccn", "20:4:100", 5000, 400, {0.01: 0.0050}),
    }
    write_sweep(tmp_path, "fmt", range(3), learners=close, noise=0.0)
    table = comparison(load(str(tmp_path), "fmt"))
    levels = {"t": TaskLevels("t", 0.0202, 0.0188, source="a test")}
    text = format_table(table, levels)
    assert not re.search(r"\de-\d", text), text  # no scientific notation anywhere
    lines = text.splitlines()
    columns = ("final error", "vs predict-mean", "vs group best", "at equal total FLOPs")
    starts = [lines[0].index(column) for column in columns]
    spans = [(start, end) for start, end in zip(starts, [*starts[1:], None], strict=True) if start != starts[1]]
    cells = [row[start:end] for row in lines[2:5] for start, end in spans]  # the error columns
    numbers = [n for cell in cells for n in re.findall(r"[-+]?\d+\.\d+", cell)]
    assert len(numbers) >= 12 and {len(n.split(".")[1]) for n in numbers} == {5}, numbers
    assert "0.01867 [0.01867, 0.01867]" in text and "+0.00001 [+0.00001, +0.00001]" in text
    assert "reference levels: t: predict 0 = 0.02020, predict the mean return = 0.01880" in text
    standing = {line.split()[2]: line for line in text.splitlines()[2:5]}
    assert "not below" not in standing["ccn"] and "below (0.27x)" in standing["ccn"]  # 0.005 / 0.0188
    assert "below (0.99x)" in standing["columnar"]  # zero-width interval, just below the level


def test_each_task_of_a_table_keeps_its_own_number_format(tmp_path):
    # Atari games differ 100-fold in scale: one format for both printed Pong's errors as 0.00 [0.00, 0.00]
    small = {name: (kind, shape, flops, ops, {alpha: error / 50 for alpha, error in errors.items()})
             for name, (kind, shape, flops, ops, errors) in LEARNERS.items()}  # fmt: skip
    large = {name: (kind, shape, flops, ops, {alpha: error * 20 for alpha, error in errors.items()})
             for name, (kind, shape, flops, ops, errors) in LEARNERS.items()}  # fmt: skip
    write_sweep(tmp_path, "scales", range(3), noise=0.0, learners=small, task="pong")
    write_sweep(tmp_path, "scales", range(3), noise=0.0, learners=large, task="qbert")
    levels = {"pong": TaskLevels("pong", 0.08, 0.055), "qbert": TaskLevels("qbert", 12.0, 4.0)}
    report = write_report(str(tmp_path), tmp_path / "out", "scales", levels=levels)
    text = report.path.read_text()
    pong = next(line for line in text.splitlines() if line.startswith("| pong | 1 | ccn | 20:4:100 |"))
    qbert = next(line for line in text.splitlines() if line.startswith("| qbert | 1 | ccn | 20:4:100 |"))
    assert "| 0.00200 [0.00200, 0.00200] |" in pong  # 0.1 / 50, four digits of the task's largest number
    assert "| 2.00 [2.00, 2.00] |" in qbert  # 0.1 x 20: four digits of 12.00, qbert's predict-0 level
    assert "Reference levels, pong: predict 0 = 0.08000" in text
    assert "Reference levels, qbert: predict 0 = 12.00" in text
    assert "ccn 20:4:100, 0.00200 [0.00200, 0.00200]" in report.verdict  # the verdict too
    printed = format_table(report.table, levels)
    assert "0.00200 [0.00200, 0.00200]" in printed and "2.00 [2.00, 2.00]" in printed


def test_the_verdict_names_which_learners_are_selection_biased_when_others_had_one_setting(tmp_path):
    mixed = {name: (kind, shape, flops, ops, errors if name == "tbptt" else {0.01: errors[0.01]})
             for name, (kind, shape, flops, ops, errors) in LEARNERS.items()}  # fmt: skip
    write_sweep(tmp_path, "mixed", range(3), noise=0.0, learners=mixed)
    report = write_report(str(tmp_path), tmp_path / "out", "mixed", levels={"t": TaskLevels("t", 0.5, 0.45)})
    assert "t (selection seeds; biased for tbptt 2:4 (several settings): run the evaluation stage):" in report.verdict
    write_sweep(tmp_path, "single", range(3), noise=0.0, learners={k: v for k, v in mixed.items() if k != "tbptt"})
    report = write_report(str(tmp_path), tmp_path / "out2", "single", levels={"t": TaskLevels("t", 0.5, 0.45)})
    assert "t (one setting per learner, unbiased):" in report.verdict


def test_selection_reads_settings_whose_values_hold_commas(tmp_path):
    """A section 9 learner's `learner_settings` is a JSON object ('{"activation": "tanh", "units": 27}'):
    its ', ' is not a separator of the config text (the first real RTU sweep crashed `select` on it)."""
    rtu = {"rtu": ("rtu", "27", 5000, 400, {0.01: 0.2, 0.001: 0.1})}
    settings = {"rtu": json.dumps({"activation": "tanh", "max_phase": 6.28, "units": 27})}
    write_sweep(tmp_path, "c", range(2), learners=rtu, noise=0.0, learner_settings=settings)
    [winner] = select(load(str(tmp_path), "c"))
    assert winner["setting"] == "step_size=0.001" and winner["candidates"] == 2
    assert 'learner_settings={"activation": "tanh", "max_phase": 6.28, "units": 27}' in winner["config"]


def test_seeds_that_blew_up_without_a_nan_are_counted_in_the_table_and_the_verdict(tmp_path):
    """A finite final error above 10x predict-0 is status `complete`, but the table and verdict say it blew up."""
    one = {"ccn": ("ccn", "20:4:100", 5000, 400, {0.01: 0.1}), "tbptt": ("tbptt", "2:4", 5000, 400, {0.01: 0.2})}
    write_sweep(tmp_path, "b", range(3), learners=one, noise=0.0, blow_up={("tbptt", 0.01, 1)})
    results = load(str(tmp_path), "b")
    table = comparison(results)
    levels = {"t": TaskLevels("t", 0.5, 0.3, source="a test")}  # 10 x 0.5 = 5 < 200 (the blown-up seed)
    text = format_table(table, levels)
    by_name = {line.split()[2]: line for line in text.splitlines()[2:4]}
    assert "3 (1 blew up)" in by_name["tbptt"] and "blew up" not in by_name["ccn"], text
    assert "blew up: a run whose final error is finite but above 10x the task's predict-0 level" in text
    assert {row["learner_name"]: row["error"].n for row in table} == {"ccn": 3, "tbptt": 3}  # still in the interval
    report = write_report(str(tmp_path), tmp_path / "out", "b", levels=levels)
    wild = r"blew up \(a finite final error above 10x predict 0, 5\.0*\) on some seeds: tbptt 2:4 \(1 of 3\)\."
    assert re.search(wild, report.verdict), report.verdict
    assert "| 3 (1 blew up) |" in report.path.read_text()
    # without reference levels nothing can be called blown up
    assert "blew up" not in format_table(table, {"t": TaskLevels("t", None, None, problem="no stream")})
    calm = {"t": TaskLevels("t", 50.0, 40.0, source="a test")}  # 200 < 10 x 50: within the task's scale
    assert "blew up" not in format_table(table, calm)


def test_the_verdict_names_the_best_at_equal_compute_by_how_much_and_who_did_not_learn(tmp_path):
    write_sweep(tmp_path, "v", range(4))  # columnar and tbptt share a compute group; ccn is alone
    levels = {"t": TaskLevels("t", 0.5, 0.3, source="a test")}
    report = write_report(str(tmp_path), tmp_path / "out", "v", levels=levels)
    by_name = {row["learner_name"]: row for row in report.table}
    gap = by_name["tbptt"]["versus_best"]
    decimals = table_decimals(report.table, levels)
    assert "at equal compute (1,000-1,100 FLOPs/step, 2 learners): columnar 7:7:inf is best" in report.verdict
    assert f"it beats the next best, tbptt 2:4 ({by_name['tbptt']['error'].mean:.{decimals}f}), by " \
        f"{gap.mean:.{decimals}f} [{gap.low:.{decimals}f}, {gap.high:.{decimals}f}] (paired" in report.verdict
    assert "alone at its compute per step" in report.verdict and "ccn 20:4:100" in report.verdict
    assert "lowest error overall: ccn 20:4:100" in report.verdict
    # every winner is below 0.3 (columnar 0.2, tbptt 0.25, ccn 0.1): none listed as not learning
    assert "every learner got below the predict-mean level (0.3000)" in report.verdict
    text = report.path.read_text()
    assert "## Verdict" in text and "Reference levels, t: predict 0 = 0.5000" in text
    levels = {"t": TaskLevels("t", 0.3, 0.22, source="a test")}  # now tbptt (0.25) is above the level
    verdict = write_report(str(tmp_path), tmp_path / "out2", "v", levels=levels).verdict
    assert "did not get below the predict-mean level (0.2200): tbptt 2:4." in verdict
    unknown = {"t": TaskLevels("t", None, None, problem="no stream")}
    assert "reference levels not available (no stream)" in write_report(
        str(tmp_path), tmp_path / "out3", "v", levels=unknown
    ).verdict


def test_load_refuses_a_sweep_name_that_is_not_one_folder(tmp_path):
    import analysis

    for name in ("../x", "a/b", "demo.evaluation"):
        with pytest.raises(ValueError, match="is not a sweep name"):
            analysis.load(str(tmp_path), name)
