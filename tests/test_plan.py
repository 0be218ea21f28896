"""Run identity and planning: stable run keys, signature batches, deterministic batch keys."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

from orchestrator.plan import batch_key_of, plan_batches, signature
from orchestrator.runs import canonical_json
from orchestrator.spec import load_spec

SMALL = """
name = "plan-test"
steps = 2000
seeds = [0, 1, 2]
log_every = 1000

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "20:4:500"
step_size = [0.01, 0.003]
"""

GROWN = (
    SMALL.replace("step_size = [0.01, 0.003]", "step_size = [0.03, 0.01, 0.003]\nstd_cap = 0.01")
    + """
[[learners]]
kind = "tbptt"
shape = "10:5"
step_size = [1e-3, 3e-4]
name = "renamed"

[[tasks]]
kind = "trace_patterning"
variant = "rafiee"
"""
)


def keys_of(tmp_path: Path, text: str, name: str) -> dict[tuple, str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return {(run.learner, run.config, run.hyper, run.task.name, run.seed): run.run_key for run in load_spec(path).runs}


def test_run_key_is_stable_across_processes(tmp_path):
    keys = keys_of(tmp_path, SMALL, "small.toml")
    script = (
        "import json, sys; from orchestrator.spec import load_spec; "
        "print(json.dumps(sorted(r.run_key for r in load_spec(sys.argv[1]).runs)))"
    )
    for hash_seed in ("1", "2"):
        output = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "small.toml")],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
        ).stdout
        assert json.loads(output) == sorted(keys.values())


def test_run_key_unchanged_when_unrelated_grid_entries_are_added(tmp_path):
    small = keys_of(tmp_path, SMALL, "small.toml")
    grown = keys_of(tmp_path, GROWN, "grown.toml")
    assert len(grown) > len(small)
    for identity, key in small.items():
        assert grown[identity] == key  # a default written out (std_cap = 0.01) changes nothing either


def test_run_key_depends_on_what_runs_not_on_labels_or_spellings(tmp_path):
    base = keys_of(tmp_path, SMALL, "a.toml")
    spelled = keys_of(
        tmp_path,
        SMALL.replace("[0.01, 0.003]", "[1e-2, 3e-3]")
        .replace("seeds = [0, 1, 2]", "seeds = 3")
        .replace('kind = "ccn"', 'kind = "ccn"\nname = "label"\nlam = 0.99'),
        "b.toml",
    )
    assert sorted(base.values()) == sorted(spelled.values())
    other_steps = keys_of(tmp_path, SMALL.replace("steps = 2000", "steps = 3000"), "c.toml")
    assert not set(base.values()) & set(other_steps.values())


def test_canonical_json_normalises_numbers():
    assert canonical_json({"b": 1e-3, "a": -0.0}) == canonical_json({"a": 0.0, "b": 0.001}) == '{"a":0.0,"b":0.001}'


def test_batches_cover_every_run_once_grouped_by_signature(tmp_path):
    path = tmp_path / "grown.toml"
    path.write_text(textwrap.dedent(GROWN))
    runs = load_spec(path).runs
    batches = plan_batches("plan-test", runs, workers=2, batch_size=4)
    counted = Counter(run.run_key for batch in batches for run in batch.runs)
    assert set(counted) == {run.run_key for run in runs} and set(counted.values()) == {1}
    for batch in batches:
        assert len(batch.runs) <= 4 <= batch.padded_size or len(batch.runs) <= batch.padded_size <= 4
        assert len({signature(run) for run in batch.runs}) == 1
    padded = {}
    for batch in batches:  # one compiled size per signature
        padded.setdefault(batch.signature, set()).add(batch.padded_size)
    assert all(len(sizes) == 1 for sizes in padded.values())
    assert len(padded) == 2 * 2  # (ccn, tbptt) x (paper, rafiee)


def test_auto_batch_size_gives_every_worker_work(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(textwrap.dedent(SMALL))
    runs = load_spec(path).runs  # 6 runs of one signature
    assert len(plan_batches("s", runs, workers=2)) == 2
    assert len(plan_batches("s", runs, workers=1)) == 1
    assert [len(b.runs) for b in plan_batches("s", runs, workers=4)] == [2, 2, 2]  # ceil(6 / 4) per batch
    assert len(plan_batches("s", runs, workers=1, batch_size=4)) == 2


def test_gpu_batches_are_capped_at_an_actors_share_of_the_gpu(monkeypatch):
    """An all-GPU cluster with K actors per GPU: automatic batches hold at most GPU_MAX_BATCH // K runs."""
    import orchestrator.plan as plan

    monkeypatch.setattr(plan, "GPU_MAX_BATCH", 8)
    runs = [type("R", (), {"run_key": f"{i:064x}", "config": (), "learner": "ccn", "steps": 10})() for i in range(24)]
    monkeypatch.setattr(plan, "signature", lambda run: ("one",))
    assert [len(b.runs) for b in plan.plan_batches("s", runs, workers=2, accelerator="gpu")] == [8, 8, 8]
    shared = plan.plan_batches("s", runs, workers=2, accelerator="gpu", max_batch=4)  # 2 actors share each GPU
    assert [len(b.runs) for b in shared] == [4] * 6
    assert sorted(key for b in shared for key in (r.run_key for r in b.runs)) == sorted(r.run_key for r in runs)
    assert [len(b.runs) for b in plan.plan_batches("s", runs, workers=2, accelerator="gpu", batch_size=6)] == [6] * 4


def test_batch_key_is_derived_from_run_keys_in_any_order():
    assert batch_key_of(["b", "a"]) == batch_key_of(["a", "b"]) != batch_key_of(["a", "c"])


# -- `ccn plan`: learner-steps, FLOPs and estimated core-hours, with their source (issue 13) ---------------------
COST_SPEC = """
name = "{name}"
steps = 40_000
seeds = [0, 1, 2]
log_every = 20_000

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "20:4:10000"
step_size = [0.01, 0.003]
"""


def plan_output(tmp_path, name, results) -> str:
    from orchestrator import cli

    spec = tmp_path / f"{name}.toml"
    spec.write_text(textwrap.dedent(COST_SPEC.format(name=name)))
    completed = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", str(spec), "--results", str(results)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
    )
    assert completed.returncode == cli.EXIT_OK, completed.stderr
    return completed.stdout


def test_plan_prints_learner_steps_flops_and_core_hours_from_the_benchmarks(tmp_path):
    from learners import ccn
    from orchestrator import cost

    out = plan_output(tmp_path, "costed", tmp_path / "results")
    flops = ccn.cost(ccn.Config(12, 20, 4, 10_000)).flops_per_step * 6 * 40_000
    seconds = 6 * 40_000 / cost.BENCHMARK_RATES[("ccn", 20, 4, 12)]
    assert "learner-steps: 240,000 in all, 240,000 to run" in out, out
    assert f"FLOPs: {cost.format_count(flops)} in all" in out, out
    assert f"estimated compute: {cost.format_hours(seconds / 3600)} to run" in out, out
    assert "throughput source: docs/benchmarks.md" in out, out


def test_plan_prices_at_the_throughput_measured_under_the_results_root(tmp_path):
    from datetime import UTC, datetime

    from orchestrator.execute import NOT_DIVERGED, runs_row
    from orchestrator.learner_kinds import LEARNER_KINDS
    from orchestrator.results import ResultsStore
    from orchestrator.schema import to_table

    results = tmp_path / "results"
    spec = tmp_path / "earlier.toml"
    spec.write_text(textwrap.dedent(COST_SPEC.format(name="earlier")))
    sweep = load_spec(spec)
    store = ResultsStore(str(results), sweep.name)
    for batch in plan_batches(sweep.name, sweep.runs, workers=2, batch_size=3):  # 2 batches of 3 runs x 40,000 steps
        run_cost = LEARNER_KINDS["ccn"].cost(batch.runs[0].config_dict, 12)
        rows = [runs_row(run, batch, run_cost, diverged_at=NOT_DIVERGED, wall_seconds=6.0, attempt=1,
                         finished_at=datetime.now(UTC), host="test", device="cpu") for run in batch.runs]
        store.write_batch("ccn", batch.task, batch.batch_key, to_table("runs", rows), to_table("metrics", []))
    out = plan_output(tmp_path, "later", results)  # another sweep with the same learner shape
    assert "throughput source: measured throughput of the finished batches in earlier" in out, out
    # 240,000 learner-steps in 12 s measured: 20,000 learner-steps/s, so 240,000 steps take 12 core-seconds
    assert "estimated compute: 12 core-seconds to run" in out, out


def test_the_benchmark_rates_in_code_are_the_ones_docs_benchmarks_md_records():
    from orchestrator import cost

    text = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    recorded = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].endswith(", 2 processes") and cells[2] == "2 x 64":
            # the first row of each learner: a later section's rerun beside others does not replace it
            recorded.setdefault(cells[0].removesuffix(", 2 processes"), float(cells[3].replace(",", "")) / 2)
    names = {"CCN 20:4 (12 in)": ("ccn", 20, 4, 12), "columnar 7 (12 in)": ("ccn", 7, 7, 12),
             "T-BPTT 10:5 (12 in)": ("tbptt", 10, 5, 12), "T-BPTT 3:10 (12 in)": ("tbptt", 3, 10, 12),
             "columnar 50 (100 in)": ("ccn", 50, 50, 100), "RTU 27 (12 in)": ("rtu", "27", None, 12),
             "online LRU 27 (12 in)": ("lru", "27", None, 12), "SnAp-1 8 (12 in)": ("snap1", "8", None, 12),
             "UORO 9 (12 in)": ("uoro", "9", None, 12)}
    recorded.pop("RTU 27 tanh (12 in)")  # the same shape key as the linear RTU's: priced by that one
    assert {names[name]: rate for name, rate in recorded.items()} == cost.BENCHMARK_RATES


def test_an_unbenchmarked_shape_is_priced_from_the_nearest_by_flops():
    from orchestrator import cost

    rate = cost.benchmark_rate(("ccn", 16, 4, 12))
    nearest = ("ccn", 20, 4, 12)
    expected = cost.BENCHMARK_RATES[nearest] * cost.flops_per_step(nearest) / cost.flops_per_step(("ccn", 16, 4, 12))
    assert rate == expected and rate > cost.BENCHMARK_RATES[nearest]


def test_report_refuses_a_sweep_name_that_is_not_one_folder(tmp_path, capsys):
    from orchestrator import cli

    for name in ("../x", "a/b", "demo.evaluation"):
        code = cli.main(["report", str(tmp_path), "--sweep", name, "--out", str(tmp_path / "out")])
        error = capsys.readouterr().err
        assert code == cli.EXIT_USAGE and f"--sweep: {name!r} is not a sweep name" in error, error
    assert not (tmp_path / "out").exists()


def test_a_relative_results_folder_is_resolved_on_the_driver_for_a_cluster(tmp_path, monkeypatch, capsys):
    from orchestrator import api  # ccn run and api.run_sweep alike

    monkeypatch.chdir(tmp_path)
    assert api.results_for_cluster("results", "127.0.0.1:6379") == str(tmp_path.resolve() / "results")
    assert "is relative; the cluster's actors write to" in capsys.readouterr().err
    assert api.results_for_cluster("results", None) == "results"  # local Ray: the driver's folder as given
    assert api.results_for_cluster("s3://bucket/prefix", "auto") == "s3://bucket/prefix"
    assert api.results_for_cluster("/abs/results", "auto") == "/abs/results"
