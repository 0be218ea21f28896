"""Analysis of sweep results: compute-matched comparisons with unbiased selection (docs/analysis.md).

from analysis import load, select, comparison, write_report
results = load("results", "demo")
winners = select(results)                  # per learner: the winning hyperparameters
results = load("results", spec="sweeps/demo.toml")   # exactly that spec's runs
table = comparison(results)                # evaluation-stage errors with Student t CIs (analysis.stats)
write_report("results", "report", "demo")  # report.md + PNG/SVG figures, .levels, .verdict
levels = reference_levels(results)         # task -> TaskLevels: the error of predicting 0 / the mean return
"""

from analysis.references import TaskLevels, reference_levels
from analysis.report import Report, write_report
from analysis.results import EVALUATION_SUFFIX, NoRunsError, Results, list_sweeps, load, spec_labels, spec_run_keys
from analysis.stats import Interval, curve_interval, difference_interval, mean_interval
from analysis.tables import comparison, curves, format_table, frontier, select, sensitivity, settings
from analysis.verdict import verdict

__all__ = [
    "EVALUATION_SUFFIX",
    "Interval",
    "NoRunsError",
    "Report",
    "Results",
    "TaskLevels",
    "comparison",
    "curve_interval",
    "curves",
    "difference_interval",
    "format_table",
    "frontier",
    "list_sweeps",
    "load",
    "mean_interval",
    "reference_levels",
    "select",
    "sensitivity",
    "settings",
    "spec_labels",
    "spec_run_keys",
    "verdict",
    "write_report",
]
