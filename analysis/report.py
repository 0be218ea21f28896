"""`write_report`: report.md with the compute-matched table, plots, selection rule, seeds and gaps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from analysis import plots, tables
from analysis.results import EVALUATION_SUFFIX, Results, load
from analysis.stats import RESAMPLES


@dataclasses.dataclass
class Report:
    """What `write_report` produced: the markdown path, figure paths and the main table."""

    path: Path
    figures: list[Path]
    table: list[dict]
    text_table: str
    biased: bool


def _markdown_table(table: list[dict]) -> str:
    header = ["task", "group", "learner", "shape", "flops/step", "paper ops/step", "setting", "stage", "seeds",
              "final error [95% CI]", "vs group best", "at equal total FLOPs"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(tables._cells(row)) + " |" for row in table]
    return "\n".join(lines)


def _gaps(results: Results, table: list[dict]) -> list[str]:
    """What is missing or suspicious: unfinished settings, in-flight runs, failures, missing evaluation."""
    gaps = []
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
    resamples: int = RESAMPLES,
    seed: int = 0,
    along: str | None = None,
) -> Report:
    """Load `<root>/<sweep>`, write `out`/report.md and its figures (PNG and SVG); return the Report.

    along: a task parameter (e.g. "isi_range"): also tabulate and plot each learner's final error
    against it, across the sweep's tasks.
    """
    results = load(root, sweep)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = tables.comparison(results, criterion, resamples=resamples, seed=seed)
    paper_table = tables.comparison(results, criterion, group_by="paper_ops_per_step", resamples=resamples, seed=seed)
    winners_curves = tables.curves(results, table, resamples=resamples, seed=seed)
    sensitivity = tables.sensitivity(results, criterion)
    front = tables.frontier(table)
    figures = []
    for task in sorted({row["task"] for row in table}):
        task_curves = [c for c in winners_curves if c["task"] == task]
        if task_curves:
            figures.append(plots.learning_curves(task_curves, out, task, "steps"))
            figures.append(plots.learning_curves(task_curves, out, task, "flops"))
        if any(r["task"] == task for r in sensitivity):
            figures.append(plots.sensitivity([r for r in sensitivity if r["task"] == task], out, task))
        if any(p["task"] == task for p in front):
            figures.append(plots.frontier([p for p in front if p["task"] == task], out, task))
    along_rows = tables.along(results, table, along) if along else []
    if along_rows:
        figures.append(plots.along(along_rows, out, along))
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
        f"over seeds with a 95% percentile bootstrap interval ({resamples:,} resamples); `seeds`: the runs behind it.",
        "`vs group best`: this learner's error minus the group's best, paired by seed where the seeds match.",
        f"`at equal total FLOPs`: msre_window at the last log point within the cheapest learner's total compute "
        f"({table[0]['budget_flops']:,} FLOPs)."
        if table and table[0].get("budget_flops")
        else "",
        "",
        _markdown_table(table),
        "",
        "### Grouped by the paper's ops per step",
        "",
        _markdown_table(paper_table),
        "",
    ]
    if along_rows:
        lines += [f"## Final error against `{along}`", "", _along_table(along_rows, along), ""]
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
    return Report(path=path, figures=figures, table=table, text_table=tables.format_table(table), biased=biased)


def _along_table(rows: list[dict], parameter: str) -> str:
    """Markdown: one row per value of the parameter, one column per learner (mean [95% CI], seeds)."""
    learners = sorted({(r["learner_name"], r["shape"]) for r in rows})
    xs = sorted({r["x"] for r in rows})
    cell = {(r["learner_name"], r["shape"], r["x"]): r for r in rows}
    header = f"| {parameter} | " + " | ".join(f"{name} {shape}" for name, shape in learners) + " |"
    lines = [header, "|" + "---|" * (len(learners) + 1)]
    for x in xs:
        cells = []
        for name, shape in learners:
            row = cell.get((name, shape, x))
            cells.append(f"{row['error'].format()} (n={row['seeds']})" if row and row["error"].n else "-")
        lines.append(f"| {x:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _selection_rule(criterion: str) -> str:
    what = {
        "final_error": "final-window error (msre_window at the last step)",
        "auc": "area under the msre_window curve over steps (sum over log points x log_every)",
    }[criterion]
    return (
        f"Per learner (task, kind, name and shape), each hyperparameter setting's {what} is averaged over the "
        "selection seeds; settings with a diverged or unfinished seed are not eligible; the lowest mean wins. "
        "The comparison reports the winners' evaluation runs (fresh seeds, disjoint from the selection seeds)."
    )
