"""benchmarks/gpu.py: sweep totals against the spec code, the extrapolation math, and a --quick run
in a bare Python that has only jax, numpy and optax (what a lent GPU machine has)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
TRACE, ATARI = "sweeps/camera-ready-trace-patterning.toml", "sweeps/camera-ready-atari.toml"
# What the GPU machine's python3 has (and what those need): nothing else may be imported
BARE_PACKAGES = ("jax", "jaxlib", "numpy", "numpy.libs", "optax", "ml_dtypes", "opt_einsum", "scipy", "scipy.libs",
                 "absl", "typing_extensions.py", "pyarrow")


def load_gpu():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu = load_gpu()


@pytest.mark.parametrize("path", [TRACE, ATARI])
def test_sweep_groups_match_the_spec_and_planner(path):
    """Learner-steps, runs and GPU batch per shape group, read from the TOML, equal the project's figures."""
    from orchestrator.cost import shape_key
    from orchestrator.plan import plan_batches
    from orchestrator.spec import load_spec

    sweep = load_spec(ROOT / path)
    steps, runs, batch = defaultdict(int), defaultdict(int), defaultdict(int)
    key_of = {}
    for run in sweep.runs:
        key = key_of[run.run_key] = shape_key(run.learner, run.config_dict, run.task.n_inputs)
        steps[key] += run.steps
        runs[key] += 1
    for planned in plan_batches(sweep.name, sweep.runs, workers=1, accelerator="gpu"):
        key = key_of[planned.runs[0].run_key]
        batch[key] = max(batch[key], len(planned.runs))

    groups = gpu.sweep_groups(ROOT / path)
    assert {key: g.learner_steps for key, g in groups.items()} == dict(steps)
    assert {key: g.runs for key, g in groups.items()} == dict(runs)
    assert {key: g.batch for key, g in groups.items()} == dict(batch)
    if path == TRACE:
        assert sum(steps.values()) == 117_600_000_000  # the figure


def test_extrapolation_math():
    """A known rate gives the known hours; K processes and the longest batch are priced as documented."""
    groups = gpu.sweep_groups(ROOT / TRACE)
    ccn77 = groups[("ccn", 7, 7, 12)]
    assert (ccn77.runs, ccn77.learner_steps, ccn77.batch, ccn77.steps_per_run) == (720, 36e9, 720, 50_000_000)

    cells = [gpu.Cell(name, 1024, 1, 1e7) for name in gpu.SHAPES]
    estimate = gpu.extrapolate(groups, cells)
    row = next(r for r in estimate.rows if r["group"].key == ("ccn", 7, 7, 12))
    assert row["name"] == "columnar 7:7" and row["scale"] == 1.0
    assert row["best_hours"] == pytest.approx(1.0)  # 36e9 learner-steps at 1e7/s
    assert row["sweep_hours"] == pytest.approx(1024 / 720)  # batch 720 from a 1024 cell: x 720 / 1024
    # every group: learner-steps / (1e7 x FLOPs scale), summed
    expected = sum(g.learner_steps / (1e7 * gpu.cost_of(gpu.bench_key(gpu.nearest_bench(k)[0])).flops_per_step
                                      / gpu.cost_of(k).flops_per_step) for k, g in groups.items()) / 3600
    assert estimate.best_hours == pytest.approx(expected)
    assert gpu.nearest_bench(("tbptt", 8, 5, 275))[0] == "T-BPTT 8:5 Atari"
    assert gpu.nearest_bench(("ccn", 10, 1, 275))[0] == "columnar 6:6 Atari"

    # 4 processes at the sweep batch: 4e7 summed; one batch of 720 runs x 50M steps at 1e7/s per process
    cells.append(gpu.Cell("columnar 7:7", 720, 4, 4e7))
    estimate = gpu.extrapolate(groups, cells)
    row = next(r for r in estimate.rows if r["group"].key == ("ccn", 7, 7, 12))
    assert row["sweep_hours"] == pytest.approx(0.25)
    assert row["longest_hours"] == pytest.approx(1.0)
    # the longest batch: CCN 20:4's 720 runs x 50M steps at 1e7 x 720 / 1024 learner-steps/s
    assert estimate.longest_hours == pytest.approx(50e6 * 1024 / 1e7 / 3600)
    assert estimate.sweep_hours >= estimate.longest_hours


def test_targets_met_and_not_met(capsys):
    cells = [gpu.Cell("CCN 20:4", 4096, 1, 25e6), gpu.Cell("columnar 50 x 100", 16384, 1, 1e6)]
    estimates = {path: gpu.extrapolate(gpu.sweep_groups(ROOT / path), cells) for path in gpu.SWEEPS}
    gpu.print_targets(cells, estimates, {"platform": "gpu", "kind": "NVIDIA H200"})
    out = capsys.readouterr().out
    assert re.search(r"CCN 20:4 >= 20.00M learner-steps/s per GPU \| 25.00M \(batch 4,096 x 1\) \| met \|", out)
    assert re.search(r"columnar 50 x 100 >= 5e\+10 parameter-steps/s \| 2.05e\+10 .* \| not met \|", out)
    assert "measured on" not in out
    assert gpu.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."))
    assert not gpu.is_oom(RuntimeError("INVALID_ARGUMENT: shapes"))


def test_cell_order():
    """The sweeps' batches first, then --batches (each over every shape), then the shared-GPU cells."""
    groups = {path: gpu.sweep_groups(ROOT / path) for path in gpu.SWEEPS}
    cells = gpu.plan_cells(list(gpu.SHAPES), [1024, 2048], [4], groups)
    assert cells[:5] == [(1, "columnar 6:6 Atari", 15), (1, "T-BPTT 8:5 Atari", 15), (1, "T-BPTT 10:5", 120),
                         (1, "CCN 20:4", 720), (1, "columnar 7:7", 720)]
    assert cells[5:10] == [(1, name, 1024) for name in gpu.SHAPES if name != "T-BPTT 8:5 Atari"]
    assert cells[15:] == [(4, "CCN 20:4", 720), (4, "columnar 7:7", 720), (4, "T-BPTT 10:5", 120),
                          (4, "columnar 6:6 Atari", 15), (4, "columnar 50 x 100", 1024), (4, "T-BPTT 8:5 Atari", 15)]


def bare_python(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run the script in a Python without site-packages but BARE_PACKAGES (no project install)."""
    site = tmp_path / "site"
    site.mkdir()
    packages = Path(importlib.util.find_spec("numpy").origin).parents[1]
    for name in os.listdir(packages):
        if name in BARE_PACKAGES or any(name.startswith(p.split(".")[0] + "-") and name.endswith(".dist-info")
                                        for p in BARE_PACKAGES):
            (site / name).symlink_to(packages / name)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "XLA", "JAX"))}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"
    return subprocess.run([sys.executable, "-S", str(SCRIPT), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def rows(output: str) -> list[list[str]]:
    return [[field.strip() for field in line.strip("|").split("|")] for line in output.splitlines()
            if re.match(r"\| [A-Za-z].* \| \d+ \| [\d,]+ \| [\d,]+ \| \d+ \|", line)]


def parse_rate(text: str) -> float:
    number, unit = re.fullmatch(r"([\d,.]+)([kMGT]?)", text).groups()
    return float(number.replace(",", "")) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit]


def test_quick_run_in_a_bare_python(tmp_path):
    """--quick on this CPU, in a Python with only the GPU machine's packages: rates, targets, hours."""
    # one compilation (the 2-process cell loads it from the run's compilation cache): ~20 CPU-seconds;
    # a batch of 2**40 runs cannot be allocated (4 TB of step sizes): a real XLA out-of-memory error
    result = bare_python(tmp_path, "--quick", "--only", "columnar 7:7", "--batches", "720", str(2**40),
                         "--steps", "10", "--processes", "2", "--budget-s", "200", timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "device cpu" in out
    table = {(r[0], int(r[3].replace(",", "")), int(r[4])): r for r in rows(out)}
    assert set(table) == {("columnar 7:7", 720, 1), ("columnar 7:7", 2**40, 1), ("columnar 7:7", 720, 2)}
    assert table["columnar 7:7", 2**40, 1][5:] == ["-", "-", "OOM"]  # the run went on after it
    del table["columnar 7:7", 2**40, 1]
    for row in table.values():
        assert row[7] == "", row  # no note: measured
        rate, param_rate = parse_rate(row[5]), parse_rate(row[6])
        assert rate > 0 and param_rate == pytest.approx(rate * 400, rel=0.01)
    assert "## Targets of issue 15" in out and "(measured on cpu)" in out
    assert "camera-ready-trace-patterning.toml: 117.60G learner-steps, 3,120 runs" in out
    assert re.search(r"\| columnar 7:7 \(d=12\) \| 720 \| 36.00G \| 720 \| columnar 7:7 \(x 1\) \|", out)
    trace_total = re.search(r"camera-ready-trace-patterning <= 2 GPU-hours \| ([\d,.]+) h", out)
    assert trace_total and float(trace_total.group(1).replace(",", "")) > 0


def test_budget_exhausted_skips_every_cell(tmp_path):
    result = bare_python(tmp_path, "--quick", "--budget-s", "0", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "device not started" in out
    notes = [row[7] for row in rows(out)]
    assert notes and all(note == "skipped: --budget-s" for note in notes)
    assert re.search(r"\d+ cell\(s\) skipped: the run passed --budget-s 0", out)
    assert "| camera-ready-trace-patterning <= 2 GPU-hours | not measured | - |" in out
