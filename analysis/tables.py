"""Selection, compute-matched comparison, frontier, sensitivity and learning curves of a sweep.

Selection rule (`select`, the one rule: `ccn compare`, `ccn report` and the evaluation stage use it):
a learner is a (task, learner kind, learner name, shape, steps, log_every) (orchestrator.schema
LEARNER_COLUMNS): runs of different lengths never compete. For each of its settings (`config`:
the hyperparameters and the run length, schema SETTING_COLUMNS), the criterion (final_error by
default, or auc) is averaged over the selection seeds; a setting with a diverged or unfinished seed
is not eligible. The eligible setting with the lowest mean wins (ties: the first config in text
order). The comparison then uses the winner's evaluation runs (fresh seeds); without them its
numbers are selection-biased. Intervals: analysis.stats (Student t over seeds, paired by seed).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict

import numpy as np

from analysis.results import Results
from analysis.stats import (
    DESCRIPTION,
    EMPTY,
    Interval,
    curve_interval,
    decimals_for,
    difference_interval,
    mean_interval,
)
from orchestrator.schema import LEARNER_COLUMNS

CRITERIA = ("final_error", "auc")
LEARNER = LEARNER_COLUMNS  # task, learner, learner_name, shape, steps, log_every
COMPUTE_TOLERANCE = 0.15  # learners whose per-step compute is within 15% of a group's cheapest share it
BLOWN_UP_FACTOR = 10.0  # a finite final error above 10x the task's predict-0 level: the run blew up


def _rows(relation) -> list[dict]:
    columns = relation.columns
    return [dict(zip(columns, row, strict=True)) for row in relation.fetchall()]


def settings(results: Results, criterion: str = "final_error") -> list[dict]:
    """Every (learner, config) of the selection stage: seeds, mean criterion, diverged / unfinished seeds."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown selection criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    return _rows(
        results.sql(
            f"""
            SELECT task, learner, learner_name, shape, steps, log_every, config,
                   any_value(flops_per_step) AS flops_per_step,
                   any_value(cost_source) AS cost_source,
                   any_value(step_size) AS step_size,
                   count(*) AS runs, count({criterion}) AS seeds, avg({criterion}) AS mean,
                   count(*) FILTER (status = 'diverged') AS diverged,
                   list(seed ORDER BY seed) AS seed_list, list(run_key ORDER BY seed) AS run_keys
            FROM summary WHERE stage = 'selection'
            GROUP BY ALL ORDER BY task, learner_name, shape, steps, log_every, config
            """
        )
    )


def select(results: Results, criterion: str = "final_error") -> list[dict]:
    """The winning config of each learner by the selection rule (module docstring); one row each.

    Rows: task, learner, learner_name, shape, steps, log_every, flops_per_step, config (None: no eligible setting),
    mean (selection criterion), seeds, seed_list, run_keys, candidates (settings tried).
    """
    by_learner: dict[tuple, list[dict]] = defaultdict(list)
    for row in settings(results, criterion):
        by_learner[tuple(row[k] for k in LEARNER)].append(row)
    winners = []
    columns = results.setting_columns
    for key, rows in by_learner.items():
        eligible = [r for r in rows if r["seeds"] == r["runs"] and r["seeds"] > 0]
        best = min(eligible, key=lambda r: (r["mean"], r["config"]), default=None)
        pairs = [_pairs(r["config"], columns) for r in rows]
        varying = [k for k in pairs[0] if len({p.get(k) for p in pairs}) > 1] or ["step_size"]
        winners.append(
            {
                **dict(zip(LEARNER, key, strict=True)),
                "flops_per_step": rows[0]["flops_per_step"],
                "cost_source": rows[0]["cost_source"],  # measured: XLA's count (a learner without an analytic cost)
                "config": best["config"] if best else None,
                "setting": ", ".join(f"{k}={v}" for k, v in _pairs(best["config"], columns).items() if k in varying)
                if best
                else None,  # the config's hyperparameters that vary among this learner's settings
                "mean": best["mean"] if best else None,
                "seeds": best["seeds"] if best else 0,
                "seed_list": list(best["seed_list"]) if best else [],
                "run_keys": list(best["run_keys"]) if best else [],
                "candidates": len(rows),
                "criterion": criterion,
            }
        )
    lengths = defaultdict(set)  # several run lengths of one learner (results of several spec versions)
    for winner in winners:
        lengths[(winner["task"], winner["learner_name"], winner["shape"])].add((winner["steps"], winner["log_every"]))
    for winner in winners:
        if len(lengths[(winner["task"], winner["learner_name"], winner["shape"])]) > 1:
            length = f"steps={winner['steps']}, log_every={winner['log_every']}"
            winner["setting"] = length + (f", {winner['setting']}" if winner["setting"] else "")
    return winners


def _pairs(config: str, columns) -> dict[str, str]:
    """A `config` text ('step_size=0.001, lam=0.99, learner_settings={"a": 1, "b": 2}') as column -> value
    text. Split only before a setting column's name: a value may itself hold ', ' (a JSON object)."""
    names = "|".join(re.escape(c) for c in sorted(columns, key=len, reverse=True))
    return dict(part.split("=", 1) for part in re.split(rf", (?=(?:{names})=)", config) if part)


def _per_seed(results: Results, stage: str, winner: dict) -> dict[str, object]:
    """Per-seed final errors of a winner's runs in `stage`, with its compute and divergences."""
    rows = _rows(
        results.sql(
            """SELECT seed, final_error, status, flops_per_step, paper_ops_per_step, steps FROM summary
               WHERE stage = $stage AND task = $task AND learner = $learner AND learner_name = $name
                 AND shape = $shape AND config = $config ORDER BY seed""",
            params={k: winner[v] for k, v in _WINNER_PARAMS.items()} | {"stage": stage},
        )
    )
    return {
        "values": {r["seed"]: r["final_error"] for r in rows if r["final_error"] is not None},
        "runs": len(rows),
        "diverged": sum(r["status"] == "diverged" for r in rows),
        "flops_per_step": rows[0]["flops_per_step"] if rows else winner["flops_per_step"],
        "paper_ops_per_step": rows[0]["paper_ops_per_step"] if rows else None,
        "steps": rows[0]["steps"] if rows else None,
    }


_WINNER_PARAMS = {"task": "task", "learner": "learner", "name": "learner_name", "shape": "shape", "config": "config"}


def _budget_values(results: Results, stage: str, winner: dict, budget: int) -> dict[int, float]:
    """Per-seed msre_window at the last log point whose cumulative FLOPs are within `budget`."""
    rows = results.sql(
        """SELECT seed, max_by(msre_window, step) FROM curves
           WHERE stage = $stage AND task = $task AND learner = $learner AND learner_name = $name
             AND shape = $shape AND config = $config AND cumulative_flops <= $budget AND status = 'complete'
           GROUP BY seed""",
        params={k: winner[v] for k, v in _WINNER_PARAMS.items()} | {"stage": stage, "budget": budget},
    ).fetchall()
    return {seed: value for seed, value in rows if value is not None}


def comparison(
    results: Results,
    criterion: str = "final_error",
    *,
    group_by: str = "flops_per_step",
    tolerance: float = COMPUTE_TOLERANCE,
) -> list[dict]:
    """The compute-matched table: each learner's winner, evaluated on fresh seeds where possible.

    Rows (sorted by task, compute group, error): task, learner_name, shape, config, stage
    ('evaluation' or 'selection'), biased (selection numbers of a learner that had several settings),
    flops_per_step, paper_ops_per_step, group (compute group index within the task: per-step
    compute within `tolerance` of the group's cheapest, by `group_by`),
    error (Interval over seeds of the final error), versus_best (Interval of error minus the group's
    best learner's, paired by seed), budget_flops and at_budget (error at equal total compute: the
    cheapest learner's total FLOPs), seeds, diverged.
    """
    rows = []
    for winner in select(results, criterion):
        if winner["config"] is None:
            rows.append(
                {**winner, "stage": None, "biased": False, "error": EMPTY, "values": {}, "diverged": None,
                 "paper_ops_per_step": None}
            )
            continue
        stage = "selection"
        data = _per_seed(results, "evaluation", winner) if results.has_evaluation else {"runs": 0}
        if data["runs"]:
            stage = "evaluation"
        else:
            data = _per_seed(results, "selection", winner)
        rows.append(
            {
                **winner,
                "stage": stage,
                # a learner with one setting was not selected: its selection seeds are unbiased
                "biased": stage == "selection" and winner["candidates"] > 1,
                "values": data["values"],
                "seeds": len(data["values"]),
                "diverged": data["diverged"],
                "paper_ops_per_step": data["paper_ops_per_step"],
                "total_flops": (data["flops_per_step"] or 0) * (data["steps"] or 0),
                "error": mean_interval(list(data["values"].values())),
            }
        )
    for task in sorted({r["task"] for r in rows}):
        members = sorted((r for r in rows if r["task"] == task), key=lambda r: r[group_by] or 0)
        group, cheapest = -1, None
        for row in members:
            if cheapest is None or (row[group_by] or 0) > cheapest * (1 + tolerance):
                group, cheapest = group + 1, row[group_by] or 0
            row["group"] = group
        budget = min((r["total_flops"] for r in members if r.get("total_flops")), default=0)
        for row in members:
            row["budget_flops"] = budget
            values = _budget_values(results, row["stage"], row, budget) if row["stage"] and budget else {}
            row["at_budget"] = mean_interval(list(values.values()))
        for index in range(group + 1):
            grouped = [r for r in members if r["group"] == index]
            scored = [r for r in grouped if r["error"].n]
            best = min(scored, key=lambda r: r["error"].mean, default=None)
            for row in grouped:
                row["versus_best"] = (
                    difference_interval(row["values"], best["values"])
                    if best is not None and row is not best and row["error"].n
                    else EMPTY
                )
    return sorted(rows, key=lambda r: (r["task"], r["group"], math.inf if not r["error"].n else r["error"].mean))


def task_parameter(results: Results, parameter: str) -> dict[str, float]:
    """task -> the value of one of its parameters as a number (a [low, high] range: its midpoint).

    Raises ValueError naming the tasks that lack it or where it is not a number or a range.
    """
    values, problems = {}, []
    for task, params in results.sql("SELECT DISTINCT task, task_params FROM runs ORDER BY task").fetchall():
        value = json.loads(params or "{}").get(parameter)
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
            values[task] = (value[0] + value[1]) / 2
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values[task] = float(value)
        else:
            problems.append(f"{task} ({parameter} = {value!r})")
    if problems:
        raise ValueError(
            f"task parameter {parameter!r} is not a number or a [low, high] range in: {', '.join(problems)}"
        )
    return values


def along(results: Results, table: list[dict], parameter: str) -> list[dict]:
    """The comparison's winners against a task parameter (e.g. the ISI of trace patterning).

    One row per learner (learner_name and shape) per task, sorted by learner then x: learner_name,
    shape, task, x (the parameter's value; a range's midpoint), error (Interval over seeds), stage, seeds.
    """
    x_of = task_parameter(results, parameter)
    rows = [
        {key: row[key] for key in ("learner_name", "shape", "task", "error", "stage", "biased", "seeds")}
        | {"x": x_of[row["task"]]}
        for row in table
        if row["task"] in x_of and row.get("stage")
    ]
    return sorted(rows, key=lambda r: (r["learner_name"], r["shape"], r["x"]))


def across_tasks(table: list[dict], levels: dict) -> list[dict]:
    """Each learner's error in units of each task's predict-the-mean-return level, averaged over tasks:
    one number across tasks of different scales (e.g. Atari games), where raw errors cannot be averaged.

    A learner (learner_name, shape) gets a row when it has errors on at least two tasks whose level is
    known. Per seed: the mean over the learner's tasks of final error / predict_mean (seed s's runs on
    the different tasks form one replicate; seeds missing on some task are left out), and `normalised`
    is the t-interval over those per-seed means: 1 is a constant prediction's error. Rows: learner_name,
    shape, tasks (the task names), ratios (task -> mean error / predict_mean), normalised (Interval),
    values (seed -> normalised), lowest (tasks where it has the lowest mean error of all rows), below
    (tasks where its whole interval is below the level), biased (a task's numbers are selection-biased),
    versus_best (paired by seed against the row with the lowest mean on the same tasks; EMPTY for it).
    Sorted by the number of tasks (most first), then normalised mean.
    """
    known = {task for task, task_levels in levels.items() if task_levels is not None and task_levels.known
             and task_levels.predict_mean and task_levels.predict_mean > 0}  # fmt: skip
    scored = [row for row in table if row["task"] in known and row["error"].n]
    lowest = {}
    for row in scored:
        if row["task"] not in lowest or row["error"].mean < lowest[row["task"]]:
            lowest[row["task"]] = row["error"].mean
    by_learner: dict[tuple, list[dict]] = defaultdict(list)
    for row in scored:
        by_learner[(row["learner_name"], row["shape"])].append(row)
    out = []
    for (name, shape), rows in by_learner.items():
        if len(rows) < 2:
            continue
        level = {row["task"]: levels[row["task"]].predict_mean for row in rows}
        seeds = set.intersection(*(set(row["values"]) for row in rows))
        values = {seed: float(np.mean([row["values"][seed] / level[row["task"]] for row in rows]))
                  for seed in sorted(seeds)}  # fmt: skip
        out.append(
            {
                "learner_name": name,
                "shape": shape,
                "tasks": sorted(row["task"] for row in rows),
                "ratios": {row["task"]: row["error"].mean / level[row["task"]] for row in rows},
                "values": values,
                "normalised": mean_interval(list(values.values())),
                "lowest": sorted(row["task"] for row in rows if row["error"].mean == lowest[row["task"]]),
                "below": sorted(row["task"] for row in rows
                                if np.isfinite(row["error"].high) and row["error"].high < level[row["task"]]),
                "biased": any(row.get("biased") for row in rows),
            }  # fmt: skip
        )
    for row in out:
        same = [other for other in out if other["tasks"] == row["tasks"] and other["normalised"].n]
        best = min(same, key=lambda other: other["normalised"].mean, default=None)
        row["versus_best"] = (
            difference_interval(row["values"], best["values"]) if best is not None and best is not row else EMPTY
        )
    return sorted(out, key=lambda r: (-len(r["tasks"]), r["normalised"].mean if r["normalised"].n else math.inf))


def frontier(table: list[dict]) -> list[dict]:
    """Best error against FLOPs per step, per task and learner family (learner_name): sorted points."""
    best: dict[tuple, dict] = {}
    for row in table:
        if not row["error"].n:
            continue
        key = (row["task"], row["learner_name"], row["flops_per_step"])
        if key not in best or row["error"].mean < best[key]["error"].mean:
            best[key] = row
    return [
        {
            "task": t,
            "learner_name": n,
            "flops_per_step": f,
            "shape": r["shape"],
            "error": r["error"],
            "stage": r["stage"],
        }
        for (t, n, f), r in sorted(best.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or 0))
    ]


def sensitivity(results: Results, criterion: str = "final_error") -> list[dict]:
    """Mean selection criterion per learner and step size, best over the other hyperparameters."""
    best: dict[tuple, dict] = {}
    for row in settings(results, criterion):
        if row["step_size"] is None:
            continue
        mean = row["mean"] if row["seeds"] == row["runs"] and row["seeds"] else math.inf
        key = (*(row[k] for k in LEARNER), row["step_size"])
        if key not in best or mean < best[key]["mean"]:
            best[key] = {
                **dict(zip(LEARNER, key, strict=False)),
                "step_size": row["step_size"],
                "mean": mean,
                "seeds": row["seeds"],
            }
    return sorted(best.values(), key=lambda r: (r["task"], r["learner_name"], r["shape"], r["step_size"]))


def curves(results: Results, table: list[dict]) -> list[dict]:
    """Learning curves of each table row's runs: mean and 95% t band (analysis.stats) of msre_window over seeds.

    Rows: task, learner_name, shape, stage, steps[points], cumulative_flops[points], mean, low, high
    (arrays over log points), seeds (complete runs with every log point).
    """
    out = []
    for row in table:
        if not row["stage"]:
            continue
        points = results.sql(
            """SELECT seed, step, cumulative_flops, msre_window FROM curves
               WHERE stage = $stage AND task = $task AND learner = $learner AND learner_name = $name
                 AND shape = $shape AND config = $config AND status = 'complete' ORDER BY seed, step""",
            params={k: row[v] for k, v in _WINNER_PARAMS.items()} | {"stage": row["stage"]},
        ).fetchall()
        by_seed: dict[int, list] = defaultdict(list)
        for s, step, flops, value in points:
            by_seed[s].append((step, flops, value))
        if not by_seed:
            continue
        length = max(len(v) for v in by_seed.values())
        full = [v for v in by_seed.values() if len(v) == length and all(p[2] is not None for p in v)]
        if not full:
            continue
        values = np.array([[p[2] for p in v] for v in full])  # [seeds, points]
        mean, low, high = curve_interval(values)
        out.append(
            {
                "task": row["task"],
                "learner_name": row["learner_name"],
                "shape": row["shape"],
                "stage": row["stage"],
                "biased": row["biased"],
                "steps": np.array([p[0] for p in full[0]]),
                "cumulative_flops": np.array([p[1] for p in full[0]], dtype=np.float64),
                "mean": mean,
                "low": low,
                "high": high,
                "seeds": len(full),
            }
        )
    return out


HEADER = ["task", "group", "learner", "shape", "flops/step", "paper ops/step", "setting", "stage", "seeds",
          "final error [95% t CI]", "vs predict-mean", "vs group best [paired t CI]",
          "at equal total FLOPs [95% t CI]"]  # fmt: skip


def table_decimals(table: list[dict], levels: dict | None = None) -> int:
    """The one fixed-point format of a table's errors (analysis.stats.decimals_for over every error,
    interval end and reference level in it)."""
    values = [level for task_levels in (levels or {}).values() for level in _level_values(task_levels)]
    for row in table:
        for interval in (row["error"], row.get("at_budget", EMPTY)):
            values += [interval.mean, interval.low, interval.high]
    return decimals_for(values)


def task_decimals(table: list[dict], levels: dict | None = None) -> dict[str, int]:
    """task -> its rows' one fixed-point format (table_decimals of the task's rows and levels): tasks of
    different scales (Atari games) each keep their significant digits in one table."""
    levels = levels or {}
    return {
        task: table_decimals([r for r in table if r["task"] == task], {task: levels[task]} if task in levels else {})
        for task in sorted({r["task"] for r in table})
    }


def _level_values(task_levels) -> list[float]:
    return [v for v in (task_levels.predict_zero, task_levels.predict_mean) if v is not None]


def blown_up(values: dict, task_levels) -> list:
    """The seeds (of `values`: seed -> final error) whose error is finite but above BLOWN_UP_FACTOR x the
    task's predict-0 level: runs that left the task's scale without a NaN, so `status` says complete.
    Their errors stay in the intervals (they are what the learner did); tables and the verdict count
    them. [] without reference levels."""
    if task_levels is None or not task_levels.known or task_levels.predict_zero is None:
        return []
    limit = BLOWN_UP_FACTOR * task_levels.predict_zero
    return sorted(seed for seed, value in values.items() if np.isfinite(value) and value > limit)


BLOWN_UP_NOTE = (
    f"blew up: a run whose final error is finite but above {BLOWN_UP_FACTOR:g}x the task's predict-0 level "
    "(its error is in the interval)"
)


def _seeds_cell(row: dict, task_levels) -> str:
    """'10', '9 (+1 diverged)', '10 (2 blew up)': the seeds with a final error, and what went wrong."""
    notes = [f"+{row['diverged']} diverged"] if row.get("diverged") else []
    wild = blown_up(row.get("values") or {}, task_levels)
    notes += [f"{len(wild)} blew up"] if wild else []
    return str(row["error"].n) + (f" ({', '.join(notes)})" if notes else "")


def versus_mean_level(error: Interval, task_levels) -> str:
    """Where an error stands against the task's predict-mean level: 'below (0.42x)' when its whole 95%
    interval is below, 'not below (1.01x)' when its mean is not, 'unclear (0.97x)' when the interval
    reaches the level (or there is no interval); '-' without levels or errors."""
    if task_levels is None or not task_levels.known or not error.n or not np.isfinite(error.mean):
        return "-"
    ratio = f"({error.mean / task_levels.predict_mean:.2f}x)"
    if error.mean >= task_levels.predict_mean:
        return f"not below {ratio}"
    if np.isfinite(error.high) and error.high < task_levels.predict_mean:
        return f"below {ratio}"
    return f"unclear {ratio}"


def format_table(table: list[dict], levels: dict | None = None) -> str:
    """The compute-matched table as plain text (the terminal's main table): one number format per task
    (task_decimals), each task's reference levels (analysis.references) under it, and a line saying
    which intervals."""
    if not table:
        return "no results yet"
    from analysis.references import describe

    decimals = task_decimals(table, levels)
    header = HEADER
    body = [_cells(row, decimals[row["task"]], (levels or {}).get(row["task"])) for row in table]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    references = [
        "reference levels: " + describe(levels[task], lambda v, task=task: f"{v:.{decimals[task]}f}")
        for task in sorted({row["task"] for row in table})
        if levels and task in levels
    ]
    wild = any(blown_up(row.get("values") or {}, (levels or {}).get(row["task"])) for row in table)
    return "\n".join([*lines, "", *references, DESCRIPTION + "." + (f" {BLOWN_UP_NOTE}." if wild else "")])


def _cells(row: dict, decimals: int | None = None, task_levels=None) -> list[str]:
    """One table row as text; decimals: the table's fixed-point format (None: 4 significant digits)."""
    stage = {"evaluation": "evaluation", "selection": "selection (biased)", None: "-"}[row["stage"]]
    if row["stage"] == "selection" and not row.get("biased", True):
        stage = "single setting (unbiased)"
    versus: Interval = row.get("versus_best", EMPTY)
    at_budget: Interval = row.get("at_budget", EMPTY)
    return [
        row["task"],
        str(row.get("group", "-")),
        row["learner_name"],
        row["shape"],
        (f"{row['flops_per_step']:,}" + (" (measured)" if row.get("cost_source") == "measured" else ""))
        if row["flops_per_step"] is not None else "-",
        f"{row['paper_ops_per_step']:,}" if row.get("paper_ops_per_step") is not None else "-",
        row.get("setting") or row["config"] or "no eligible setting",
        stage,
        _seeds_cell(row, task_levels),
        row["error"].format(decimals=decimals),
        versus_mean_level(row["error"], task_levels),
        "best"
        if row["error"].n and not versus.n and row.get("group") is not None
        else versus.format(decimals=decimals, signed=True)
        + (f" (n={versus.n}{', paired' if versus.paired else ''})" if versus.n else ""),
        at_budget.format(decimals=decimals) + (f" (n={at_budget.n})" if at_budget.n else ""),
    ]
