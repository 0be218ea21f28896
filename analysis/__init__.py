"""Analysis of sweep results: compute-matched comparisons with unbiased selection (docs/analysis.md).

from analysis import load, select, comparison, write_report
results = load("results", "demo")
winners = select(results)                  # per learner: the winning hyperparameters
table = comparison(results)                # evaluation-stage errors with bootstrap CIs
write_report("results", "report", "demo")  # report.md + PNG/SVG figures
"""

from analysis.report import Report, write_report
from analysis.results import EVALUATION_SUFFIX, Results, list_sweeps, load
from analysis.stats import Interval, bootstrap_ci, bootstrap_difference
from analysis.tables import comparison, curves, format_table, frontier, select, sensitivity, settings

__all__ = [
    "EVALUATION_SUFFIX",
    "Interval",
    "Report",
    "Results",
    "bootstrap_ci",
    "bootstrap_difference",
    "comparison",
    "curves",
    "format_table",
    "frontier",
    "list_sweeps",
    "load",
    "select",
    "sensitivity",
    "settings",
    "write_report",
]
