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


def test_batch_key_is_derived_from_run_keys_in_any_order():
    assert batch_key_of(["b", "a"]) == batch_key_of(["a", "b"]) != batch_key_of(["a", "c"])
