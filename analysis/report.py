"""`write_report`: report.md with the compute-matched table, plots, selection rule, seeds and gaps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from analysis import plots, tables
from analysis.references import describe, reference_levels
from analysis.results import EVALUATION_SUFFIX, Results, load
from analysis.stats import DESCRIPTION
from analysis.verdict import verdict


@dataclasses.dataclass
class Report:
    """What `write_report` produced: the markdown path, figure paths and the main table."""

    path: Path
    figures: list[Path]
    table: list[dict]
    text_table: str
    biased: bool
    notes: list[str] = dataclasses.field(default_factory=list)  # which runs were read (spec, several lengths)
    levels: dict = dataclasses.field(default_factory=dict)  # task -> analysis.references.TaskLevels
    verdict: str = ""  # per task: the best learner at equal compute, and who did not beat predicting the mean
    figure_objects: dict = dataclasses.field(default_factory=dict)  # name -> open matplotlib Figure (keep_figures)


def _markdown_table(table: list[dict], levels: dict) -> str:
    """The table in markdown, one number format per task, with each task's reference levels under it."""
    header = tables.HEADER
    decimals = tables.task_decimals(table, levels)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(tables._cells(row, decimals[row["task"]], levels.get(row["task"]))) + " |"
              for row in table]
    lines += [""] + _reference_notes(sorted({row["task"] for row in table}), levels, decimals)
    if any(tables.blown_up(row.get("values") or {}, levels.get(row["task"])) for row in table):
        lines += ["", tables.BLOWN_UP_NOTE[0].upper() + tables.BLOWN_UP_NOTE[1:] + "."]
    return "\n".join(lines)


def _reference_notes(tasks: list[str], levels: dict, decimals: dict[str, int]) -> list[str]:
    return [f"Reference levels, {describe(levels[task], lambda v, task=task: f'{v:.{decimals[task]}f}')}."
            for task in tasks if task in levels]


def _run_notes(results: Results) -> list[str]:
    """Which runs were read: rows of other spec versions left out, several run lengths present."""
    notes = []
    if results.excluded_runs:
        notes.append(
            f"{results.excluded_runs} runs in the sweep's folders are not runs of {results.spec} "
            "(left from an earlier edit of the spec?) and were left out."
        )
    lengths = results.sql(  # one learner with runs of several lengths: results of several spec versions
        """SELECT DISTINCT steps, log_every FROM runs WHERE (task, learner_name, shape) IN (
               SELECT (task, learner_name, shape) FROM runs GROUP BY ALL HAVING count(DISTINCT (steps, log_every)) > 1
           ) ORDER BY ALL"""
    ).fetchall()
    if lengths:
        notes.append(
            "learners have runs of several lengths ("
            + "; ".join(f"steps={steps}, log_every={every}" for steps, every in lengths)
            + "): each length is reported as its own learner, never averaged with another"
            + ("" if results.spec else "; give the spec (ccn report --spec SPEC) to read only its runs")
            + "."
        )
    return notes


def _gaps(results: Results, table: list[dict]) -> list[str]:
    """What is missing or suspicious: runs left out, unfinished settings, in-flight runs, failures, no evaluation."""
    gaps = _run_notes(results)
    settings = tables.settings(results)
    most = max((s["runs"] for s in settings), default=0)
    short = [s for s in settings if s["runs"] < most]
    if short:
        gaps.append(
            f"{len(short)} of {len(settings)} settings have fewer runs than the others ({most}): "
            "the sweep may still be running or have failed batches."
        )
    if results.in_progress_runs:
        gaps.append(f"{results.in_progress_runs} runs have metrics but no runs row yet (a batch being written).")
    for failure in results.failures:
        gaps.append(
            f"{failure['stage']} batch {str(failure.get('batch_key', '?'))[:12]} failed "
            f"({len(failure.get('run_keys', []))} runs): {failure.get('error', '')}"
        )
    for row in table:
        if row["config"] is None:
            gaps.append(
                f"{row['task']} / {row['learner_name']} {row['shape']}: "
                "no setting finished every seed without diverging."
            )
        elif row["biased"]:
            gaps.append(
                f"{row['task']} / {row['learner_name']} {row['shape']}: no evaluation runs for the winner; "
                "its numbers are selection-biased."
            )
    return gaps


def write_report(
    root: str,
    out: str | Path,
    sweep: str | None = None,
    *,
    criterion: str = "final_error",
    along: str | None = None,
    spec=None,
    keep_figures: bool = False,
    levels: dict | None = None,
) -> Report:
    """Load `<root>/<sweep>`, write `out`/report.md and its figures (PNG and SVG); return the Report.

    along: a task parameter (e.g. "isi_range"): also tabulate and plot each learner's final error
    against it, across the sweep's tasks. spec: a spec path (or Sweep): report exactly its runs
    (analysis.load); sweep then defaults to the spec's. keep_figures: leave the matplotlib Figures
    open in Report.figure_objects (for inspection); otherwise each is closed once saved. levels: the
    tasks' reference levels (task -> analysis.references.TaskLevels); None computes them from the
    tasks' streams (analysis.references.reference_levels).
    """
    results = load(root, sweep, spec=spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = tables.comparison(results, criterion)
    paper_table = tables.comparison(results, criterion, group_by="paper_ops_per_step")
    winners_curves = tables.curves(results, table)
    sensitivity = tables.sensitivity(results, criterion)
    front = tables.frontier(table)
    along_rows = tables.along(results, table, along) if along else []  # a bad parameter fails before any figure
    levels = reference_levels(results) if levels is None else levels
    decimals = tables.task_decimals(table, levels)
    kept: dict | None = {} if keep_figures else None
    figures = []
    for task in sorted({row["task"] for row in table}):
        task_curves = [c for c in winners_curves if c["task"] == task]
        task_levels = levels.get(task)
        if task_curves:
            figures.append(plots.learning_curves(task_curves, out, task, "steps", task_levels, kept))
            figures.append(plots.learning_curves(task_curves, out, task, "flops", task_levels, kept))
        if any(r["task"] == task for r in sensitivity):
            figures.append(
                plots.sensitivity([r for r in sensitivity if r["task"] == task], out, task, task_levels, kept)
            )
        if any(p["task"] == task for p in front):
            figures.append(plots.frontier([p for p in front if p["task"] == task], out, task, task_levels, kept))
    if along_rows:
        figures.append(plots.along(along_rows, out, along, levels, kept))
    normalised = tables.across_tasks(table, levels)
    if normalised:
        figures.append(plots.across_tasks(normalised, out, kept))
    the_verdict = verdict(table, levels, decimals)
    biased = any(row["biased"] for row in table)
    seeds = results.sql(
        "SELECT stage, list(DISTINCT seed ORDER BY seed) FROM runs GROUP BY stage ORDER BY stage"
    ).fetchall()
    counts = results.sql(
        "SELECT stage, count(*), count(*) FILTER (status = 'diverged') FROM runs GROUP BY stage ORDER BY stage"
    ).fetchall()
    lines = [
        f"# Report: sweep `{results.sweep}`",
        "",
        f"Results: `{results.root}` (selection runs in `{results.sweep}/`, evaluation runs in "
        f"`{results.sweep}{EVALUATION_SUFFIX}/`).",
        "",
        f"Runs read: exactly those of the spec `{results.spec}`"
        + (f" ({results.excluded_runs} other runs in the folders left out)." if results.excluded_runs else ".")
        if results.spec
        else "Runs read: every run in the sweep's folders (no spec given).",
        "",
    ]
    lines += [f"- {stage}: {n} runs ({d} diverged)" for stage, n, d in counts]
    lines += [f"- {stage} seeds: {', '.join(map(str, s))}" for stage, s in seeds]
    lines += ["", "Winning settings (full hyperparameters):", ""]
    lines += [f"- {r['task']} / {r['learner_name']} {r['shape']}: `{r['config']}`" for r in table if r["config"]]
    lines += ["", "## Selection rule", "", _selection_rule(criterion), ""]
    if not results.has_evaluation and biased:
        lines += [
            "**No evaluation stage: the numbers below are selection-biased** (each winner also won by the",
            "luck of its seeds). Run `ccn run SPEC --stage evaluate` for unbiased numbers on fresh seeds.",
            "",
        ]
    elif biased:
        lines += ["**Some learners have no evaluation runs yet: their rows are selection-biased.**", ""]
    lines += [
        "## Compute-matched comparison",
        "",
        f"Learners are grouped by FLOPs per step (within {tables.COMPUTE_TOLERANCE:.0%} of a group's cheapest); equal",
        "per-step compute means equal total compute at equal steps. `final error`: msre_window at the last step, mean",
        "over seeds with its 95% Student t interval (mean ± t(0.975, n-1)·sd/√n; none from one seed); `seeds`: the",
        "runs behind it. `vs group best`: this learner's error minus the group's best, the t interval of the per-seed",
        "differences (paired by seed; Welch's t interval where fewer than two seeds are shared).",
        f"`at equal total FLOPs`: msre_window at the last log point within the cheapest learner's total compute "
        f"({table[0]['budget_flops']:,} FLOPs)."
        if table and table[0].get("budget_flops")
        else "",
        "",
        "`vs predict-mean`: the error against the task's predict-the-mean-return level (a constant's error; the ratio",
        "in brackets): `below` when the whole 95% interval is below it, `not below` when the mean is not, `unclear`",
        "when the interval reaches it.",
        "",
        _markdown_table(table, levels),
        "",
        "### Grouped by the paper's ops per step",
        "",
        _markdown_table(paper_table, levels),
        "",
    ]
    if normalised:
        lines += [
            "## Across tasks: error relative to predicting the mean return",
            "",
            "Each task's final error divided by the task's predict-the-mean-return level (1 is a constant",
            "prediction's error; tasks of different scales become comparable), averaged over the learner's tasks per",
            "seed (seed s on every task is one replicate); 95% t interval over those seeds. `vs best`: paired by",
            "seed against the learner with the lowest mean on the same tasks. `lowest error in`: the tasks where it",
            "has the lowest mean final error of all learners; `below the level in`: tasks where its whole interval",
            "is below the level.",
            "Per-task columns: mean final error / predict-mean level.",
            "",
            _across_tasks_table(normalised),
            "",
        ]
    if along_rows:
        lines += [
            f"## Final error against `{along}`",
            "",
            _along_table(along_rows, along, levels),
            "",
            DESCRIPTION + ".",
            "",
        ]
    lines += ["## Verdict", "", "```", the_verdict, "```", ""]
    lines += [
        "## Figures",
        "",
    ]
    lines += [f"![{figure.stem}]({figure.name})  (also [{figure.stem}.svg]({figure.stem}.svg))\n" for figure in figures]
    gaps = _gaps(results, table)
    lines += ["## What is missing", ""] + (
        [f"- {gap}" for gap in gaps] or ["- nothing: every setting has all its runs."]
    )
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return Report(
        path=path,
        figures=figures,
        table=table,
        text_table=tables.format_table(table, levels),
        biased=biased,
        notes=_run_notes(results),
        levels=levels,
        verdict=the_verdict,
        figure_objects=kept or {},
    )


def _across_tasks_table(rows: list[dict]) -> str:
    """Markdown: one row per learner of tables.across_tasks, with its per-task ratios."""
    tasks = sorted({task for row in rows for task in row["tasks"]})
    lines = [
        "| learner | shape | tasks | error / predict-mean [95% t CI] | vs best [paired t CI] | lowest error in | "
        "below the level in | " + " | ".join(tasks) + " |",
        "|" + "---|" * (7 + len(tasks)),
    ]
    for row in rows:
        versus = row["versus_best"]
        cells = [
            row["learner_name"] + (" (selection, biased)" if row["biased"] else ""),
            row["shape"],
            str(len(row["tasks"])),
            row["normalised"].format(decimals=3) + f" (n={row['normalised'].n})",
            versus.format(decimals=3, signed=True) if versus.n else ("best" if row["normalised"].n else "-"),
            f"{len(row['lowest'])} of {len(row['tasks'])}",
            f"{len(row['below'])} of {len(row['tasks'])}",
            *(f"{row['ratios'][task]:.3f}" if task in row["ratios"] else "-" for task in tasks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _along_table(rows: list[dict], parameter: str, levels: dict) -> str:
    """Markdown: one row per value of the parameter, one column per learner (mean [95% CI], seeds), and the
    task's reference levels; one number format."""
    learners = sorted({(r["learner_name"], r["shape"]) for r in rows})
    xs = sorted({r["x"] for r in rows})
    cell = {(r["learner_name"], r["shape"], r["x"]): r for r in rows}
    task_of = {r["x"]: r["task"] for r in rows}
    decimals = tables.table_decimals(rows, {task: levels[task] for task in task_of.values() if task in levels})

    def level(x, which: str) -> str:
        value = getattr(levels.get(task_of[x]), which, None) if levels.get(task_of[x]) else None
        return f"{value:.{decimals}f}" if value is not None else "-"

    header = (
        f"| {parameter} | predict 0 | predict mean | "
        + " | ".join(f"{name} {shape}" for name, shape in learners)
        + " |"
    )
    lines = [header, "|" + "---|" * (len(learners) + 3)]
    for x in xs:
        cells = [level(x, "predict_zero"), level(x, "predict_mean")]
        for name, shape in learners:
            row = cell.get((name, shape, x))
            scored = row and row["error"].n
            cells.append(f"{row['error'].format(decimals=decimals)} (n={row['seeds']})" if scored else "-")
        lines.append(f"| {x:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _selection_rule(criterion: str) -> str:
    what = {
        "final_error": "final-window error (msre_window at the last step)",
        "auc": "area under the msre_window curve over steps (sum over log points x log_every)",
    }[criterion]
    return (
        f"Per learner (task, kind, name, shape and run length: steps and log_every), each hyperparameter setting's "
        f"{what} is averaged over the "
        "selection seeds; settings with a diverged or unfinished seed are not eligible; the lowest mean wins. "
        "The comparison reports the winners' evaluation runs (fresh seeds, disjoint from the selection seeds)."
    )
