"""The demo report's figures, checked the way a reader looks at them, on a small real run of the demo spec.

sweeps/demo.toml itself (its task and learners) with a few thousand steps and two seeds, then the
report of exactly that spec's runs (`write_report(spec=...)`, as `ccn report --spec`; the evaluation
stage is tests/test_analysis_report.py's, left out here to keep this fast). The assertions read the
matplotlib Figure objects the report drew (Report.figure_objects): the reference levels are drawn as
horizontal lines at the task's predict-0 and predict-mean errors inside the visible y range, every
learner of the table has a curve, and every legend entry names the learner's shape.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import analysis
from orchestrator import api

DEMO = Path(__file__).resolve().parent.parent / "sweeps" / "demo.toml"
SMALL = {"name": '"demo-figures"', "steps": "3_000", "log_every": "1_000", "seeds": "[0, 1]"}


def small_demo_spec() -> str:
    """demo.toml with the SMALL top-level values (each must be there once: a changed demo fails loudly here)."""
    text = DEMO.read_text()
    for key, value in SMALL.items():
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.MULTILINE)
        assert count == 1, f"sweeps/demo.toml: expected one top-level `{key} = ...` line"
    return text


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import ray

    folder = tmp_path_factory.mktemp("demo-figures")
    spec = folder / "demo.toml"
    spec.write_text(small_demo_spec())
    results = str(folder / "results")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CCN_CACHE_DIR", str(folder / "cache"))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            assert api.run_sweep(spec, results, progress=False).ok
        finally:
            ray.shutdown()
        report = analysis.write_report(results, folder / "report", spec=str(spec), keep_figures=True)
    yield report
    import matplotlib.pyplot as plt

    for figure in report.figure_objects.values():
        plt.close(figure)


def _reference_lines(axis) -> dict[str, float]:
    """label prefix -> y of the horizontal reference lines of an axis."""
    found = {}
    for line in axis.get_lines():
        label, y = line.get_label(), np.asarray(line.get_ydata(), dtype=float)
        for prefix in ("predict 0", "predict the mean return"):
            if label.startswith(prefix) and len(set(y)) == 1:
                found[prefix] = float(y[0])
    return found


def test_every_figure_draws_the_tasks_reference_levels_where_they_can_be_seen(demo):
    tasks = {row["task"] for row in demo.table}
    assert tasks and set(demo.levels) == tasks
    expected = {"curves_steps", "curves_flops", "sensitivity", "frontier"}
    assert {f"{kind}_{task}" for kind in expected for task in tasks} <= set(demo.figure_objects)
    for name, figure in demo.figure_objects.items():
        task = name.split("_", 2)[-1] if name.startswith("curves_") else name.split("_", 1)[1]
        levels = demo.levels[task]
        assert levels.known and 0 < levels.predict_mean < levels.predict_zero
        (axis,) = figure.axes
        lines = _reference_lines(axis)
        assert lines == {
            "predict 0": pytest.approx(levels.predict_zero),
            "predict the mean return": pytest.approx(levels.predict_mean),
        }, name
        low, high = axis.get_ylim()
        assert low < levels.predict_mean < levels.predict_zero < high, f"{name}: a reference line is off the axes"
        legend = [text.get_text() for text in axis.get_legend().get_texts()]
        assert any(t.startswith("predict 0 (") for t in legend), legend
        assert any(t.startswith("predict the mean return (") for t in legend), legend


def test_every_learner_has_a_curve_and_every_legend_names_shapes(demo):
    learners = [(row["learner_name"], row["shape"]) for row in demo.table if row["stage"]]
    assert {"columnar", "constructive", "ccn", "tbptt"} <= {name for name, _ in learners}  # the demo's learners
    steps = next(row["steps"] for row in demo.table)
    log_points = steps // 1_000
    for task in {row["task"] for row in demo.table}:
        for against in ("steps", "flops"):
            (axis,) = demo.figure_objects[f"curves_{against}_{task}"].axes
            curves = {line.get_label(): line for line in axis.get_lines()}
            for name, shape in learners:
                label = next((label for label in curves if label.startswith(f"{name} {shape} (n=")), None)
                assert label is not None, f"curves_{against}: no curve for {name} {shape}; lines: {list(curves)}"
                y = np.asarray(curves[label].get_ydata(), dtype=float)
                assert len(y) == log_points and np.isfinite(y).all()
            legend = [text.get_text() for text in axis.get_legend().get_texts()]
            assert all(any(f"{name} {shape}" in entry for entry in legend) for name, shape in learners)
        (axis,) = demo.figure_objects[f"sensitivity_{task}"].axes
        legend = [text.get_text() for text in axis.get_legend().get_texts()]
        assert all(any(f"{name} {shape}" in entry for entry in legend) for name, shape in learners)
        (axis,) = demo.figure_objects[f"frontier_{task}"].axes
        legend = " ".join(text.get_text() for text in axis.get_legend().get_texts())
        assert all(shape in legend for _, shape in learners)


def test_the_report_ends_with_a_verdict_written_from_the_numbers(demo):
    text = demo.path.read_text()
    assert "## Verdict" in text and demo.verdict in text
    table_tasks = {row["task"] for row in demo.table}
    assert all(f"{task} (" in demo.verdict for task in table_tasks)
    best = min((row for row in demo.table if row["error"].n), key=lambda row: row["error"].mean)
    assert f"lowest error overall: {best['learner_name']} {best['shape']}" in demo.verdict
    assert "predict-mean level" in demo.verdict
    assert "Reference levels, " in text and "predict the mean return = " in text


def test_fourteen_learners_get_fourteen_different_looks_in_every_figure(tmp_path):
    """The comparison's 14 learners: matplotlib's default cycle repeats its 10 colours, so two learners
    looked the same in a legend; every series of a figure now differs in colour or line style."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from analysis import plots
    from analysis.stats import Interval

    learners = [(f"learner-{i}", f"{i}:1") for i in range(14)]
    steps = np.array([1_000, 2_000, 3_000])
    curves = [
        {"learner_name": name, "shape": shape, "seeds": 3, "stage": "evaluation", "steps": steps,
         "cumulative_flops": steps * (i + 1), "mean": np.full(3, 0.01 + i * 1e-4), "low": np.full(3, 0.009),
         "high": np.full(3, 0.012)}
        for i, (name, shape) in enumerate(learners)
    ]
    points = [{"learner_name": name, "shape": shape, "flops_per_step": 1_000 * (i + 1),
               "error": Interval(mean=0.01, low=0.009, high=0.011, n=3, paired=False)}
              for i, (name, shape) in enumerate(learners)]
    rows = [{"learner_name": name, "shape": shape, "step_size": alpha, "mean": 0.01}
            for name, shape in learners for alpha in (1e-3, 1e-4)]
    kept: dict = {}
    plots.learning_curves(curves, tmp_path, "task", "steps", None, kept)
    plots.sensitivity(rows, tmp_path, "task", None, kept)
    plots.frontier(points, tmp_path, "task", None, kept)
    try:
        for name, figure in kept.items():
            [axis] = figure.axes
            handles, labels = axis.get_legend_handles_labels()
            looks = []
            for handle in handles:
                line = handle.lines[0] if hasattr(handle, "lines") else handle  # errorbar containers
                looks.append((to_hex(line.get_color()), line.get_linestyle()))
            assert len(labels) == 14, name
            assert len(set(looks)) == 14, f"{name}: repeated looks {looks}"
    finally:
        for figure in kept.values():
            plt.close(figure)
    assert len({(s["color"], s["linestyle"]) for s in plots.series_styles(40)}) == 40


def test_frontier_labels_of_points_at_the_same_place_do_not_overlap_and_a_redraw_is_the_same_file(tmp_path):
    """comparison-5m: online LRU 27 and RTU linear 27 sat at almost the same FLOPs and error, and their
    shape labels were drawn on top of each other ("2727"). Each label now takes the first offset where it
    overlaps no earlier label, in its series' colour."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from analysis import plots
    from analysis.stats import Interval

    def point(name, shape, flops, error):
        return {"learner_name": name, "shape": shape, "flops_per_step": flops,
                "error": Interval(mean=error, low=error * 0.9, high=error * 1.1, n=3, paired=False)}

    points = [point("lru", "27", 20_000, 0.0110), point("rtu-linear", "27", 20_100, 0.0111),
              point("snap1", "8", 20_050, 0.0110), point("ccn", "20:4:1M", 18_488, 0.004),
              point("tbptt", "8:5", 19_000, 0.007), point("tbptt", "30:2", 21_000, 0.0075),
              point("uoro", "40", 2_000, 0.017), point("columnar", "50:50", 200_000, 0.009)]
    kept: dict = {}
    plots.frontier(points, tmp_path, "task", None, kept)
    figure = kept["frontier_task"]
    (tmp_path / "again").mkdir()
    plots.frontier(points, tmp_path / "again", "task")  # a redrawn figure is the same file (no date, fixed ids)
    for suffix in ("svg", "png"):
        name = f"frontier_task.{suffix}"
        assert (tmp_path / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    try:
        [axis] = figure.axes
        renderer = figure.canvas.get_renderer()
        texts = [text for text in axis.texts if text.get_text() in {"27", "8", "20:4:1M", "8:5", "30:2", "40", "50:50"}]
        assert sorted(text.get_text() for text in texts) == ["20:4:1M", "27", "27", "30:2", "40", "50:50", "8", "8:5"]
        boxes = [text.get_window_extent(renderer) for text in texts]
        overlapping = [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes))
                       for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
        assert not overlapping, f"overlapping frontier labels: {overlapping}"
        handles, legend = axis.get_legend_handles_labels()
        colour_of = {label.split()[0]: to_hex(handle.lines[0].get_color()) for handle, label in zip(handles, legend,
                                                                                                      strict=True)}
        lru, rtu = (next(t for t in texts if t.get_text() == "27" and t.xy[0] == x) for x in (20_000, 20_100))
        assert to_hex(lru.get_color()) == colour_of["lru"] and to_hex(rtu.get_color()) == colour_of["rtu-linear"]
    finally:
        plt.close(figure)
