"""Figures of a report (matplotlib, Agg backend): each saved as PNG and SVG; returns the PNG paths.

Every figure of a task draws its reference levels (analysis.references: the error of predicting 0
and of predicting the mean return) as labelled horizontal lines, and every legend entry names the
learner's shape, and every series of a figure has its own style (`series_styles`: ten colours, then
the same colours with the next line style and marker, so a figure of 14 learners repeats no look).
keep: a dict that receives each Figure by name, left open (tests inspect them); without it the
figure is closed once saved.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ERROR_LABEL = "final msre_window (squared return error)"


PREDICT_ZERO_STYLE = {"color": "0.45", "linestyle": "--", "linewidth": 1.2}
PREDICT_MEAN_STYLE = {"color": "black", "linestyle": ":", "linewidth": 1.5}
PREDICT_ZERO_LABEL = "predict 0"
PREDICT_MEAN_LABEL = "predict the mean return"
SERIES_COLORS = tuple(f"C{i}" for i in range(10))  # matplotlib's default cycle (tab10)
SERIES_LINESTYLES = ("-", "--", "-.", ":")
SERIES_MARKERS = ("o", "s", "^", "D")


def series_styles(count: int) -> list[dict]:
    """`count` distinct series styles: colour i % 10, and line style and marker i // 10 (40 before any
    repeat); matplotlib's own cycle repeats its colours from the 11th series on."""
    return [
        {
            "color": SERIES_COLORS[i % len(SERIES_COLORS)],
            "linestyle": SERIES_LINESTYLES[(i // len(SERIES_COLORS)) % len(SERIES_LINESTYLES)],
            "marker": SERIES_MARKERS[(i // len(SERIES_COLORS)) % len(SERIES_MARKERS)],
        }
        for i in range(count)
    ]


def _save(figure, out: Path, name: str, keep: dict | None = None) -> Path:
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=120)
    with matplotlib.rc_context({"svg.hashsalt": name}):  # fixed element ids and no date: a redrawn figure
        figure.savefig(out / f"{name}.svg", dpi=120, metadata={"Date": None})  # is the same file
    if keep is None:
        plt.close(figure)
    else:
        keep[name] = figure
    return out / f"{name}.png"


MAX_LEGEND_INSIDE = 8  # series; a longer legend goes beside the axes, where it hides no curve


def _legend(figure, axis, series: int) -> None:
    if series <= MAX_LEGEND_INSIDE:
        axis.legend(fontsize=7)
        return
    figure.set_size_inches(10, 4.5)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _number(value: float) -> str:
    return f"{value:.4g}"


def _reference_lines(axis, levels) -> list[float]:
    """Horizontal lines at the task's predict-0 and predict-mean errors; returns the levels drawn."""
    if levels is None or not levels.known:
        return []
    axis.axhline(levels.predict_zero, label=f"{PREDICT_ZERO_LABEL} ({_number(levels.predict_zero)})",
                 **PREDICT_ZERO_STYLE)
    axis.axhline(levels.predict_mean, label=f"{PREDICT_MEAN_LABEL} ({_number(levels.predict_mean)})",
                 **PREDICT_MEAN_STYLE)
    return [levels.predict_zero, levels.predict_mean]


def _log_if_wide(axis, values, which: str) -> None:
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > 20:
        getattr(axis, f"set_{which}scale")("log")


def learning_curves(
    curves: list[dict], out: Path, task: str, against: str = "steps", levels=None, keep: dict | None = None
) -> Path:
    """msre_window with its 95% t band (analysis.stats) against steps or cumulative FLOPs, one line per
    learner, and the task's reference levels (analysis.references.TaskLevels)."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    values = []
    for curve, style in zip(curves, series_styles(len(curves)), strict=True):
        x = curve["steps"] if against == "steps" else curve["cumulative_flops"]
        biased = ", biased" if curve.get("biased", curve["stage"] == "selection") else ""
        label = f"{curve['learner_name']} {curve['shape']} (n={curve['seeds']}{biased})"
        axis.plot(x, curve["mean"], label=label, color=style["color"], linestyle=style["linestyle"])
        axis.fill_between(x, curve["low"], curve["high"], color=style["color"], alpha=0.2)
        values += list(curve["mean"])
    values += _reference_lines(axis, levels)
    axis.set_xlabel("steps" if against == "steps" else "cumulative compute (FLOPs)")
    if against != "steps":
        axis.set_xscale("log")
    _log_if_wide(axis, values, "y")
    axis.set_ylabel("msre_window (squared return error)")
    axis.set_title(f"{task}: learning curves\n(mean over seeds, 95% Student t band)", fontsize=10)
    _legend(figure, axis, len(curves))
    axis.grid(alpha=0.3)
    return _save(figure, out, f"curves_{against}_{task}", keep)


def sensitivity(rows: list[dict], out: Path, task: str, levels=None, keep: dict | None = None) -> Path:
    """Mean selection error against step size per learner (best over the other hyperparameters), with
    the task's reference levels."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines = defaultdict(list)
    for row in rows:
        lines[(row["learner_name"], row["shape"])].append((row["step_size"], row["mean"]))
    values = []
    for ((name, shape), points), style in zip(sorted(lines.items()), series_styles(len(lines)), strict=True):
        finite = [(x, y) for x, y in sorted(points) if y != float("inf")]
        axis.plot([x for x, _ in finite], [y for _, y in finite], label=f"{name} {shape}", **style)
        values += [y for _, y in finite]
    values += _reference_lines(axis, levels)
    axis.set_xscale("log")
    _log_if_wide(axis, values, "y")
    axis.set_xlabel("step size alpha (log scale)")
    axis.set_ylabel(ERROR_LABEL)
    axis.set_title(
        f"{task}: step-size sensitivity\n(selection seeds; settings with a diverged seed omitted)", fontsize=10
    )
    _legend(figure, axis, len(lines))
    axis.grid(alpha=0.3)
    return _save(figure, out, f"sensitivity_{task}", keep)


def frontier(points: list[dict], out: Path, task: str, levels=None, keep: dict | None = None) -> Path:
    """Best error against FLOPs per step, one line per learner family with CI error bars; each point is
    labelled with its shape (and the legend lists them), with the task's reference levels."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    families = defaultdict(list)
    for point in points:
        families[point["learner_name"]].append(point)
    values, labels = [], []
    for (name, members), style in zip(sorted(families.items()), series_styles(len(families)), strict=True):
        x = [p["flops_per_step"] for p in members]
        y = [p["error"].mean for p in members]
        errors = [
            [p["error"].mean - p["error"].low for p in members],
            [p["error"].high - p["error"].mean for p in members],
        ]
        shapes = ", ".join(p["shape"] for p in members)
        axis.errorbar(x, y, yerr=errors, capsize=3, label=f"{name} {shapes}", **style)
        labels += [(p["shape"], p["flops_per_step"], p["error"].mean, style["color"]) for p in members]
        values += y
    values += _reference_lines(axis, levels)
    axis.set_xscale("log")
    _log_if_wide(axis, values, "y")
    axis.set_xlabel("compute per step (FLOPs, log scale)")
    axis.set_ylabel(ERROR_LABEL)
    axis.set_title(f"{task}: compute frontier\n(best error per FLOPs per step, 95% t CI over seeds)", fontsize=10)
    _legend(figure, axis, len(families))
    axis.grid(alpha=0.3)
    figure.tight_layout()  # the final layout first: the labels are placed in display coordinates
    place_labels(figure, axis, labels)
    return _save(figure, out, f"frontier_{task}", keep)


# Offsets (points) tried in turn for a point's label: right-above, right-below, further out, then left.
LABEL_OFFSETS = ((4, 5), (4, -11), (4, 15), (4, -21), (-24, 5), (-24, -11), (4, 25), (4, -31), (-24, 15), (-24, -21))


def place_labels(figure, axis, labels: list[tuple[str, float, float, str]]) -> list:
    """Annotate each (text, x, y, colour) at the first offset of LABEL_OFFSETS whose text overlaps no
    label placed before it (two learners of one shape at almost the same point got one smudge, "2727");
    the label takes its series' colour. Returns the annotations."""
    renderer = figure.canvas.get_renderer()
    placed, boxes = [], []
    for text, x, y, color in labels:
        for offset in LABEL_OFFSETS:
            annotation = axis.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=7,
                                       color=color)
            box = annotation.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(other) for other in boxes) or offset == LABEL_OFFSETS[-1]:
                break
            annotation.remove()
        placed.append(annotation)
        boxes.append(box)
    return placed


def along(rows: list[dict], out: Path, parameter: str, levels: dict | None = None, keep: dict | None = None) -> Path:
    """Final error against a task parameter, one line per learner, with 95% CI error bars, and each
    task's reference levels (levels: task -> TaskLevels) as lines over the parameter."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines = defaultdict(list)
    for row in rows:
        lines[(row["learner_name"], row["shape"])].append(row)
    values = []
    for ((name, shape), members), style in zip(sorted(lines.items()), series_styles(len(lines)), strict=True):
        members = [m for m in members if m["error"].n]
        biased = ", biased" if any(m["biased"] for m in members) else ""
        seeds = min((m["seeds"] for m in members), default=0)
        errors = [
            [m["error"].mean - m["error"].low for m in members],
            [m["error"].high - m["error"].mean for m in members],
        ]
        axis.errorbar(
            [m["x"] for m in members], [m["error"].mean for m in members], yerr=errors, capsize=3,
            label=f"{name} {shape} (n>={seeds}{biased})", **style,
        )
        values += [m["error"].mean for m in members]
    x_of_task = sorted({(r["x"], r["task"]) for r in rows})
    known = [(x, levels[task]) for x, task in x_of_task if levels and task in levels and levels[task].known]
    if known:
        axis.plot([x for x, _ in known], [lv.predict_zero for _, lv in known], label=PREDICT_ZERO_LABEL,
                  **PREDICT_ZERO_STYLE)
        axis.plot([x for x, _ in known], [lv.predict_mean for _, lv in known], label=PREDICT_MEAN_LABEL,
                  **PREDICT_MEAN_STYLE)
        values += [lv.predict_zero for _, lv in known] + [lv.predict_mean for _, lv in known]
    _log_if_wide(axis, values, "y")
    axis.set_xlabel(parameter)
    axis.set_ylabel(ERROR_LABEL)
    axis.set_title(
        f"final error against {parameter}\n(each learner's winner per task, 95% t CI over seeds)", fontsize=10
    )
    _legend(figure, axis, len(lines))
    axis.grid(alpha=0.3)
    return _save(figure, out, f"along_{parameter}", keep)


def across_tasks(rows: list[dict], out: Path, keep: dict | None = None) -> Path:
    """Error / predict-mean level per learner (analysis.tables.across_tasks): one marker per task, and the
    mean over tasks with its 95% t CI over seeds; the line at 1 is a constant prediction's error."""
    tasks = sorted({task for row in rows for task in row["tasks"]})
    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2.5), 4.5))
    styles = series_styles(len(tasks))
    for index, row in enumerate(rows):
        for offset, (task, style) in enumerate(zip(tasks, styles, strict=True)):
            if task in row["ratios"]:
                axis.plot(index + 0.5 * (offset / max(1, len(tasks) - 1) - 0.25), row["ratios"][task],
                          linestyle="none", marker=style["marker"], color=style["color"], alpha=0.8,
                          label=task if index == 0 else None)
        interval = row["normalised"]
        if interval.n:
            low = interval.mean - interval.low if interval.n > 1 else 0.0
            high = interval.high - interval.mean if interval.n > 1 else 0.0
            axis.errorbar(index, interval.mean, yerr=[[low], [high]], fmt="_", markersize=18, capsize=5,
                          color="black", label="mean over tasks, 95% t CI" if index == 0 else None)
    axis.axhline(1.0, label=PREDICT_MEAN_LABEL, **PREDICT_MEAN_STYLE)
    _log_if_wide(axis, [r for row in rows for r in row["ratios"].values()] + [1.0], "y")
    axis.set_xticks(range(len(rows)))
    axis.set_xticklabels([f"{row['learner_name']}\n{row['shape']}" for row in rows], fontsize=7)
    axis.set_ylabel("final error / predict-the-mean level")
    axis.set_title("error relative to predicting the mean return, per task and across tasks", fontsize=10)
    _legend(figure, axis, len(tasks) + 2)
    axis.grid(alpha=0.3, axis="y")
    return _save(figure, out, "across_tasks", keep)
