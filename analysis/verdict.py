"""The verdict per task, written from the compute-matched table's numbers (the end of `ccn report`).

Per task: the learner with the lowest error at equal compute per step (each compute group of the
table with two or more learners), by how much it beats the next best with the paired interval
of the difference; the lowest error at equal total compute; the learners that did not get
below the predict-the-mean-return level (analysis.references); and those with seeds that blew up
(analysis.tables.blown_up).
"""

from __future__ import annotations

import numpy as np

from analysis.tables import BLOWN_UP_FACTOR, blown_up, versus_mean_level


def _name(row: dict) -> str:
    return f"{row['learner_name']} {row['shape']}"


def task_verdict(task: str, table: list[dict], levels, decimals: int) -> list[str]:
    """Sentences about one task (table: its rows of analysis.comparison; levels: its TaskLevels or None)."""

    def number(value: float) -> str:
        return f"{value:.{decimals}f}"

    rows = [r for r in table if r["task"] == task]
    scored = [r for r in rows if r["error"].n]
    if not scored:
        return [f"{task}: no learner has a finished run yet."]
    if all(r["stage"] == "evaluation" for r in scored):
        stage = "winners on fresh evaluation seeds"
    elif all(r["biased"] for r in scored if r["stage"] != "evaluation"):
        stage = "selection seeds, biased: run the evaluation stage"
    elif any(r["biased"] for r in scored):
        biased = ", ".join(_name(r) for r in scored if r["biased"])
        stage = f"selection seeds; biased for {biased} (several settings): run the evaluation stage"
    else:
        stage = "one setting per learner, unbiased"
    lines = [f"{task} ({stage}):"]
    for group in sorted({r["group"] for r in scored}):
        members = sorted((r for r in scored if r["group"] == group), key=lambda r: r["error"].mean)
        if len(members) < 2:
            continue
        best, runner = members[0], members[1]
        flops = [r["flops_per_step"] or 0 for r in members]
        gap = runner["versus_best"]
        if gap.n and np.isfinite(gap.low):
            decided = "a clear difference" if gap.low > 0 else "not a clear difference at these seeds"
            how_much = (
                f"by {number(gap.mean)} [{number(gap.low)}, {number(gap.high)}] "
                f"({'paired' if gap.paired else 'unpaired'} 95% t interval, n={gap.n}): {decided}"
            )
        else:
            how_much = f"by {number(runner['error'].mean - best['error'].mean)} (no interval: too few seeds)"
        lines.append(
            f"  at equal compute ({min(flops):,}-{max(flops):,} FLOPs/step, {len(members)} learners): "
            f"{_name(best)} is best, {best['error'].format(decimals=decimals)}; it beats the next best, "
            f"{_name(runner)} ({number(runner['error'].mean)}), {how_much}."
        )
        worse = [r for r in members[2:] if r["versus_best"].n and np.isfinite(r["versus_best"].low)
                 and r["versus_best"].low > 0]
        if worse:
            lines.append(
                f"    also clearly behind {_name(best)}: "
                + "; ".join(
                    f"{_name(r)} by {number(r['versus_best'].mean)} "
                    f"[{number(r['versus_best'].low)}, {number(r['versus_best'].high)}]"
                    for r in worse
                )
                + "."
            )
    alone = [r for r in scored if sum(o["group"] == r["group"] for o in scored) == 1]
    if alone:
        lines.append(
            "  alone at its compute per step (no learner within the compute tolerance to compare with): "
            + "; ".join(f"{_name(r)} {r['error'].format(decimals=decimals)}" for r in alone)
            + "."
        )
    budgeted = [r for r in scored if r.get("at_budget") is not None and r["at_budget"].n]
    if len(budgeted) > 1:
        cheapest = min(budgeted, key=lambda r: r["at_budget"].mean)
        lines.append(
            f"  at equal total compute ({scored[0]['budget_flops']:,} FLOPs, the cheapest learner's whole run): "
            f"{_name(cheapest)} is lowest, {cheapest['at_budget'].format(decimals=decimals)}."
        )
    overall = min(scored, key=lambda r: r["error"].mean)
    lines.append(f"  lowest error overall: {_name(overall)}, {overall['error'].format(decimals=decimals)}.")
    if levels is None or not levels.known:
        reason = levels.problem if levels is not None else "not computed"
        lines.append(f"  reference levels not available ({reason}): cannot say which learners learned anything.")
        return lines
    level = number(levels.predict_mean)
    standing = {_name(r): versus_mean_level(r["error"], levels) for r in scored}
    not_below = [name for name, s in standing.items() if s.startswith("not below")]
    unclear = [name for name, s in standing.items() if s.startswith("unclear")]
    if not not_below and not unclear:
        lines.append(f"  every learner got below the predict-mean level ({level}), its whole interval below it.")
    if not_below:
        lines.append(f"  did not get below the predict-mean level ({level}): {', '.join(not_below)}.")
    if unclear:
        lines.append(f"  below the predict-mean level ({level}) on average, but its interval reaches it: "
                     f"{', '.join(unclear)}.")
    wild = {_name(r): blown_up(r.get("values") or {}, levels) for r in scored}
    if any(wild.values()):
        lines.append(
            f"  blew up (a finite final error above {BLOWN_UP_FACTOR:g}x predict 0, "
            f"{number(BLOWN_UP_FACTOR * levels.predict_zero)}) on some seeds: "
            + "; ".join(f"{name} ({len(seeds)} of {len(next(r for r in scored if _name(r) == name)['values'])})"
                        for name, seeds in wild.items() if seeds)
            + "."
        )
    return lines


def verdict(table: list[dict], levels: dict, decimals: dict[str, int]) -> str:
    """The verdict of every task of the table (levels: task -> TaskLevels; decimals: task -> its number
    format, analysis.tables.task_decimals), as plain text."""
    lines = ["Verdict (from the numbers above):"]
    for task in sorted({r["task"] for r in table}):
        lines += task_verdict(task, table, levels.get(task), decimals[task])
    return "\n".join(lines)
