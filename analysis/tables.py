"""Selection, compute-matched comparison, frontier, sensitivity and learning curves of a sweep.

Selection rule (`select`): a learner is a (task, learner kind, learner name, shape). For each of its
hyperparameter settings (`config`), the criterion (final_error by default, or auc) is averaged over
the selection seeds; a setting with a diverged or unfinished seed is not eligible. The eligible
setting with the lowest mean wins (ties: the first config in text order). The comparison then uses
the winner's evaluation runs (fresh seeds); without them its numbers are selection-biased.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np

from analysis.results import Results
from analysis.stats import EMPTY, RESAMPLES, Interval, bootstrap_ci, bootstrap_curve, bootstrap_difference

CRITERIA = ("final_error", "auc")
LEARNER = ("task", "learner", "learner_name", "shape")
COMPUTE_TOLERANCE = 0.15  # learners whose per-step compute is within 15% of a group's cheapest share it


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
            SELECT task, learner, learner_name, shape, config, any_value(flops_per_step) AS flops_per_step,
                   any_value(step_size) AS step_size,
                   count(*) AS runs, count({criterion}) AS seeds, avg({criterion}) AS mean,
                   count(*) FILTER (status = 'diverged') AS diverged,
                   list(seed ORDER BY seed) AS seed_list, list(run_key ORDER BY seed) AS run_keys
            FROM summary WHERE stage = 'selection'
            GROUP BY ALL ORDER BY task, learner_name, shape, config
            """
        )
    )


def select(results: Results, criterion: str = "final_error") -> list[dict]:
    """The winning config of each learner by the selection rule (module docstring); one row each.

    Rows: task, learner, learner_name, shape, flops_per_step, config (None: no eligible setting),
    mean (selection criterion), seeds, seed_list, run_keys, candidates (settings tried).
    """
    by_learner: dict[tuple, list[dict]] = defaultdict(list)
    for row in settings(results, criterion):
        by_learner[tuple(row[k] for k in LEARNER)].append(row)
    winners = []
    for key, rows in by_learner.items():
        eligible = [r for r in rows if r["seeds"] == r["runs"] and r["seeds"] > 0]
        best = min(eligible, key=lambda r: (r["mean"], r["config"]), default=None)
        pairs = [_pairs(r["config"]) for r in rows]
        varying = [k for k in pairs[0] if len({p.get(k) for p in pairs}) > 1] or ["step_size"]
        winners.append(
            {
                **dict(zip(LEARNER, key, strict=True)),
                "flops_per_step": rows[0]["flops_per_step"],
                "config": best["config"] if best else None,
                "setting": ", ".join(f"{k}={v}" for k, v in _pairs(best["config"]).items() if k in varying)
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
    return winners


def _pairs(config: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in config.split(", ") if part)


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
    resamples: int = RESAMPLES,
    seed: int = 0,
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
                "error": bootstrap_ci(list(data["values"].values()), resamples, seed=seed),
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
            row["at_budget"] = bootstrap_ci(list(values.values()), resamples, seed=seed)
        for index in range(group + 1):
            grouped = [r for r in members if r["group"] == index]
            scored = [r for r in grouped if r["error"].n]
            best = min(scored, key=lambda r: r["error"].mean, default=None)
            for row in grouped:
                row["versus_best"] = (
                    bootstrap_difference(row["values"], best["values"], resamples, seed=seed)
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


def curves(results: Results, table: list[dict], resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """Learning curves of each table row's runs: mean and bootstrap band of msre_window over seeds.

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
        mean, low, high = bootstrap_curve(values, resamples, seed=seed)
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


def format_table(table: list[dict]) -> str:
    """The compute-matched table as plain text (the terminal's main table)."""
    header = ["task", "group", "learner", "shape", "flops/step", "paper ops/step", "setting", "stage", "seeds",
              "final error [95% CI]", "vs group best", "at equal total FLOPs"]  # fmt: skip
    body = [_cells(row) for row in table]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cells(row: dict) -> list[str]:
    stage = {"evaluation": "evaluation", "selection": "selection (biased)", None: "-"}[row["stage"]]
    if row["stage"] == "selection" and not row.get("biased", True):
        stage = "single setting (unbiased)"
    versus: Interval = row.get("versus_best", EMPTY)
    return [
        row["task"],
        str(row.get("group", "-")),
        row["learner_name"],
        row["shape"],
        f"{row['flops_per_step']:,}" if row["flops_per_step"] is not None else "-",
        f"{row['paper_ops_per_step']:,}" if row.get("paper_ops_per_step") is not None else "-",
        row.get("setting") or row["config"] or "no eligible setting",
        stage,
        str(row["error"].n) + (f" (+{row['diverged']} diverged)" if row.get("diverged") else ""),
        row["error"].format(),
        "best"
        if row["error"].n and not versus.n and row.get("group") is not None
        else versus.format() + (f" (n={versus.n}{', paired' if versus.paired else ''})" if versus.n else ""),
        row["at_budget"].format() + (f" (n={row['at_budget'].n})" if row["at_budget"].n else ""),
    ]
