"""analysis on a small real sweep: selection, `ccn run --stage evaluate`, `ccn report`."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pytest

import analysis
from orchestrator import api, cli

SPEC = """
name = "report-test"
steps = 2000
seeds = [0, 1]
evaluation_seeds = 2
log_every = 500

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "3:3:inf"
step_size = [0.01, 1e38]   # 1e38 diverges: never the winner

[[learners]]
kind = "tbptt"
shape = "2:3"
step_size = [0.001]
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One embedded Ray for the module: the selection stage, then the evaluation stage."""
    import ray

    folder = tmp_path_factory.mktemp("report")
    spec = folder / "sweep.toml"
    spec.write_text(SPEC)
    results = str(folder / "results")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with pytest.raises(ValueError, match="selection runs are not done"):
            api.evaluation_sweep(spec, results)
        assert api.run_sweep(spec, results, progress=False).ok
        biased = analysis.write_report(results, folder / "biased")
        assert cli.main(["run", str(spec), "--results", results, "--stage", "evaluate", "--quiet"]) == 0
    finally:
        ray.shutdown()
    return {"spec": spec, "results": results, "folder": folder, "biased": biased}


def test_evaluation_seeds_are_fresh_and_disjoint_from_the_selection_seeds(sweep):
    results = analysis.load(sweep["results"], "report-test")
    seeds = dict(results.sql("SELECT stage, list(DISTINCT seed ORDER BY seed) FROM runs GROUP BY stage").fetchall())
    assert seeds == {"selection": [0, 1], "evaluation": [2, 3]}
    evaluated = results.sql(
        "SELECT learner_name, step_size, count(*) FROM runs WHERE stage = 'evaluation' GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert evaluated == [("columnar", 0.01, 2), ("tbptt", 0.001, 2)]  # the winners only (1e38 diverged)
    winners = {w["learner_name"]: w["config"] for w in analysis.select(results)}
    assert set(results.sql("SELECT DISTINCT config FROM runs WHERE stage = 'evaluation'").fetchall()) == {
        (c,) for c in winners.values()
    }


def test_without_evaluation_the_report_says_numbers_are_selection_biased(sweep):
    text = sweep["biased"].path.read_text()
    assert sweep["biased"].biased and "selection-biased" in text


def _png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit non-interlaced RGB(A) PNG (what matplotlib's Agg writes) into [rows, bytes]."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        chunks.setdefault(kind, []).append(data[position + 8 : position + 8 + length])
        position += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][0][:10])
    assert depth == 8 and color in (2, 6)
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    stride = width * (3 if color == 2 else 4)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    return rows[:, 1:]  # filtered bytes: a single colour image still compresses to constant rows


def test_cli_report_embeds_nontrivial_png_figures_and_its_table_matches_duckdb(sweep, capsys):
    out = sweep["folder"] / "report"
    assert cli.main(["report", sweep["results"], "--sweep", "report-test", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "selection-biased" not in text.split("## What is missing")[0]
    assert "final error [95% t CI]" in text and "95% Student t interval" in text  # which interval, said
    assert "Student t" in printed
    embedded = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", text)
    assert len(embedded) == 4
    for name in embedded:
        pixels = _png_pixels(out / name)
        assert len(np.unique(pixels)) > 10, f"{name} looks blank"
        assert (out / name).with_suffix(".svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    # the table's errors: mean over evaluation seeds of msre_window at the last step, by direct query
    root = sweep["results"]
    expected = duckdb.sql(
        f"""SELECT r.learner_name, avg(m.msre_window), count(*)
            FROM read_parquet('{root}/report-test.evaluation/runs/**/*.parquet') r
            JOIN read_parquet('{root}/report-test.evaluation/metrics/**/*.parquet') m USING (run_key)
            WHERE m.step = r.steps AND r.status = 'complete' GROUP BY ALL ORDER BY ALL"""
    ).fetchall()
    report = analysis.write_report(root, out, "report-test")
    table = report.table
    assert sorted((row["learner_name"], row["error"].mean, row["error"].n) for row in table) == [
        (name, pytest.approx(mean, rel=1e-12), n) for name, mean, n in expected
    ]
    decimals = analysis.tables.table_decimals(table, report.levels)  # the table's one number format
    for name, mean, n in expected:
        assert name in printed and f"{mean:.{decimals}f}" in printed
        line = next(
            line for line in text.splitlines() if line.startswith(f"| {table[0]['task']} |") and f"| {name} |" in line
        )
        assert f"| evaluation | {n} |" in line and f"{mean:.{decimals}f}" in line
    # the task's reference levels, under the table and at the end of the terminal output: the verdict
    levels = report.levels[table[0]["task"]]
    assert levels.known and 0 < levels.predict_mean < levels.predict_zero
    assert f"predict the mean return = {levels.predict_mean:.{decimals}f}" in printed
    assert printed.rstrip().endswith(report.verdict.rstrip().splitlines()[-1])
    assert "Verdict (from the numbers above):" in printed.split("report: ")[-1]
