"""Sweep specs: every class of bad spec is reported (file, key, reason) before anything runs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.spec import SpecError, load_spec

VALID = """
name = "spec-test"
steps = 2_000
seeds = [0, 1]
log_every = 1_000

[[tasks]]
kind = "trace_patterning"
variant = "paper"

[[learners]]
kind = "ccn"
shape = "20:4:500"
step_size = [0.01, 0.003]

[[learners]]
kind = "ccn"
shape = "7:7:inf"
step_size = 0.01

[[learners]]
kind = "tbptt"
match_flops = { of = "ccn", tolerance = 0.15, truncations = [2, 5] }
step_size = [1e-3, 3e-4]
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert all(line.startswith(f"{path}: ") for line in caught.value.problems), caught.value.problems
    return caught.value.problems


def test_valid_spec_expands_tasks_x_learners_x_grid_x_seeds(tmp_path):
    sweep = load_spec(write(tmp_path, VALID))
    by_name = {}
    for run in sweep.runs:
        by_name.setdefault(run.learner_name, []).append(run)
    assert len(by_name["ccn"]) == 2 * 2  # two step sizes x two seeds
    assert len(by_name["columnar"]) == 1 * 2
    tbptt_shapes = {(r.config_dict["truncation"], r.config_dict["hidden"]) for r in by_name["tbptt"]}
    assert tbptt_shapes and {t for t, _ in tbptt_shapes} <= {2, 5}
    assert len(by_name["tbptt"]) == len(tbptt_shapes) * 2 * 2
    assert len({run.run_key for run in sweep.runs}) == len(sweep.runs)
    assert sweep.tasks[0].name == "trace_patterning-paper" and sweep.tasks[0].n_inputs == 12


def test_match_flops_shapes_are_within_tolerance_of_the_referenced_learner(tmp_path):
    from learners import ccn, compute, tbptt

    sweep = load_spec(write(tmp_path, VALID))
    budget = ccn.cost(ccn.Config(12, 20, 4, 500)).flops_per_step
    for run in sweep.runs:
        if run.learner == "tbptt":
            cost = tbptt.cost(tbptt.Config(12, run.config_dict["truncation"], run.config_dict["hidden"]))
            assert abs(cost.flops_per_step - budget) <= 0.15 * budget
    all_matching = compute.matching_tbptt_shapes(budget, 12, 0.15)
    assert {(r.config_dict["truncation"], r.config_dict["hidden"]) for r in sweep.runs if r.learner == "tbptt"} == {
        shape for shape in all_matching if shape[0] in (2, 5)
    }


def test_explicit_tbptt_shape_and_seed_count(tmp_path):
    sweep = load_spec(
        write(
            tmp_path,
            """
            name = "x"
            steps = 1000
            seeds = 3
            [[tasks]]
            kind = "trace_patterning"
            [[learners]]
            kind = "tbptt"
            shape = ["10:5", "2:13"]
            step_size = 1e-3
            """,
        )
    )
    assert sorted({(r.config_dict["truncation"], r.config_dict["hidden"]) for r in sweep.runs}) == [(2, 13), (10, 5)]
    assert sorted({r.seed for r in sweep.runs}) == [0, 1, 2]


BAD_SPECS = {
    "misspelled learner key": (
        VALID.replace("step_size = 0.01", "step_sise = 0.01"),
        "learners[2].step_sise: unknown key; did you mean 'step_size'?",
    ),
    "misspelled top-level key": (
        VALID.replace("seeds = [0, 1]", "seed = [0, 1]"),
        "seed: unknown key; did you mean 'seeds'?",
    ),
    "wrong type": (VALID.replace("steps = 2_000", 'steps = "many"'), "steps: must be a positive integer, got a string"),
    "wrong hyperparameter type": (
        VALID.replace("step_size = 0.01\n", 'step_size = 0.01\nlam = "high"\n'),
        "learners[2].lam: must be a finite number, got a string 'high'",
    ),
    "out of range hyperparameter": (
        VALID.replace("step_size = 0.01\n", "step_size = 0.01\nlam = 1.5\n"),
        "learners[2].lam: must be in [0, 1], got 1.5",
    ),
    "empty grid": (VALID.replace("step_size = [0.01, 0.003]", "step_size = []"), "learners[1].step_size: empty grid"),
    "empty seeds": (VALID.replace("seeds = [0, 1]", "seeds = []"), "seeds: empty grid"),
    "unknown learner kind": (VALID.replace('kind = "tbptt"', 'kind = "lstm"'), "learners[3].kind: unknown kind 'lstm'"),
    "unknown task kind": (
        VALID.replace('kind = "trace_patterning"', 'kind = "trace_patterns"'),
        "tasks[1].kind: unknown kind 'trace_patterns'; did you mean 'trace_patterning'?",
    ),
    "unknown task parameter": (
        VALID.replace('variant = "paper"', 'variant = "paper"\nisi = 10'),
        "tasks[1].isi: unknown key; did you mean 'isi_range'?",
    ),
    "bad task parameter value": (
        VALID.replace('variant = "paper"', 'variant = "paper"\ngamma = 1.5'),
        "tasks[1]: trace_patterning (variant 'paper'): parameter 'gamma'",
    ),
    "shape not a multiple": (
        VALID.replace('"20:4:500"', '"20:3:100"'),
        "learners[1].shape: '20:3:100': total_columns (20) must be a multiple of columns_per_stage (3)",
    ),
    "shape with missing fields": (
        VALID.replace('"20:4:500"', '"20:4"'),
        "learners[1].shape: '20:4' must have 3 fields",
    ),
    "match_flops without a shape in tolerance": (
        VALID.replace("tolerance = 0.15, truncations = [2, 5]", "tolerance = 0.0001, truncations = [2]"),
        "learners[3].match_flops: no T-BPTT shape costs within 0% of 'ccn'",
    ),
    "match_flops of an unknown learner": (
        VALID.replace('of = "ccn"', 'of = "cnn"'),
        "learners[3].match_flops.of: no learner is named 'cnn'; did you mean 'ccn'?",
    ),
    "unsafe sweep name": (
        VALID.replace('name = "spec-test"', 'name = "../elsewhere"'),
        "name: '../elsewhere' is not a safe",
    ),
    "unsafe task name": (
        VALID.replace('variant = "paper"', 'variant = "paper"\nname = "a/b"'),
        "tasks[1].name: 'a/b' is not a safe folder name",
    ),
    "log_every not dividing steps": (
        VALID.replace("log_every = 1_000", "log_every = 300"),
        "log_every: must divide steps",
    ),
    "missing steps": (VALID.replace("steps = 2_000", ""), "steps: missing"),
    "no learners": (VALID.split("[[learners]]")[0], "learners: missing"),
    "missing atari policy file": (
        VALID.replace(
            'kind = "trace_patterning"\nvariant = "paper"',
            'kind = "atari"\ngame = "Pong"\npolicy_dir = "no-such-folder"',
        ).split("[[learners]]")[0]
        + '[[learners]]\nkind = "ccn"\nshape = "6:6:inf"\nstep_size = 1e-4\n',
        "tasks[1].policy_dir: No behaviour-policy file PongNoFrameskip-v4.txt",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_each_class_of_bad_spec_names_the_file_key_and_reason(tmp_path, case):
    text, expected = BAD_SPECS[case]
    problems = problems_of(tmp_path, text)
    assert any(expected in line for line in problems), problems


def test_every_problem_is_reported_at_once(tmp_path):
    text = VALID.replace("step_size = 0.01", "step_sise = 0.01").replace('"20:4:500"', '"20:3:100"')
    text = text.replace('name = "spec-test"', 'name = "a b"')
    problems = problems_of(tmp_path, text)
    assert len(problems) >= 3, problems


def test_toml_syntax_error_and_missing_file(tmp_path):
    assert "not valid TOML" in problems_of(tmp_path, "name = \n")[0]
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "absent.toml")


def test_cli_rejects_a_bad_spec_with_exit_2_before_any_compute(tmp_path, capsys):
    import ray

    spec = write(tmp_path, VALID.replace('"20:4:500"', '"20:3:100"'))
    results = tmp_path / "results"
    code = cli.main(["run", str(spec), "--results", str(results)])
    error = capsys.readouterr().err
    assert code == 2
    assert f"{spec}: learners[1].shape:" in error
    assert not results.exists()  # nothing written
    assert not ray.is_initialized()  # no Ray started


# -- specs that used to pass validation and fail (or go wrong) after compute was spent (issue 13) --------------
ATARI = """
name = "atari-limits"
steps = 2_000
seeds = [0]
log_every = 1_000

[[tasks]]
kind = "atari"
game = "Pong"
{task}

[[learners]]
kind = "ccn"
shape = "6:6:inf"
step_size = 1e-4
"""

LATE_FAILURES = {
    "seed past uint32": (
        VALID.replace("seeds = [0, 1]", "seeds = [4294967296]"),
        "seeds: seeds must be integers from 0 to 4,294,967,295 (uint32), got 4294967296",
    ),
    "negative seed": (VALID.replace("seeds = [0, 1]", "seeds = [0, -1]"), "seeds: seeds must be integers from 0"),
    "seed count past uint32": (
        VALID.replace("seeds = [0, 1]", "seeds = 4294967297"),
        "seeds: a seed count must be at most 4,294,967,296",
    ),
    "evaluation seeds past uint32": (
        VALID.replace("seeds = [0, 1]", "seeds = [4294967294]"),
        "evaluation_seeds: the evaluation seeds follow the largest seed",
    ),
    "steps past the int32 step counters": (
        VALID.replace("steps = 2_000", "steps = 3_000_000_000"),
        "steps: 3,000,000,000 is too large: at most 2,147,483,647 (the learners' step counters are int32)",
    ),
    "learner steps past the int32 step counters": (
        VALID.replace('step_size = 0.01\n', "step_size = 0.01\nsteps = 2_147_484_000\n"),
        "learners[2].steps: 2,147,484,000 is too large",
    ),
    "atari steps past a built-in policy's recording": (
        ATARI.format(task='policy = "random"\nframes = 1_000'),
        "tasks[1].frames: the recording of task 'atari-Pong-random' holds 1,000 frames, fewer than the 2,000 steps",
    ),
    "atari learner steps past the recording": (
        ATARI.format(task='policy = "random"\nframes = 2_000') + "steps = 4_000\n",
        "tasks[1].frames: the recording of task 'atari-Pong-random' holds 2,000 frames, fewer than the 4,000 steps",
    ),
    "atari frames not a positive integer": (
        ATARI.format(task='policy = "random"\nframes = 0'),
        "tasks[1]: frames must be a positive number of stream steps, got 0",
    ),
    "atari wrap not a boolean": (ATARI.format(task='policy = "random"\nwrap = "yes"'), "tasks[1]: wrap must be true"),
    "same task twice under two names": (
        VALID.replace('variant = "paper"', 'variant = "paper"\nname = "a"')
        + '\n[[tasks]]\nkind = "trace_patterning"\nname = "b"\n',
        "tasks[2]: the same task as tasks[1] (named 'a' and 'b': same kind and parameters)",
    ),
    "same task table twice": (
        VALID + '\n[[tasks]]\nkind = "trace_patterning"\nvariant = "paper"\n',
        "tasks[2]: the same task as tasks[1] (both 'trace_patterning-paper'",
    ),
    "two tasks with one name": (
        VALID + '\n[[tasks]]\nkind = "trace_conditioning"\nname = "trace_patterning-paper"\n',
        "tasks[2]: tasks[1] is also named 'trace_patterning-paper'",
    ),
    "same runs under two learner names": (
        VALID + '\n[[learners]]\nkind = "ccn"\nname = "again"\nshape = "20:4:500"\nstep_size = 0.01\n',
        "learners[4]: repeats runs of learners[1] under another name ('again', there 'ccn'",
    ),
    "a name reserved for evaluation folders": (
        VALID.replace('name = "spec-test"', 'name = "demo.evaluation"'),
        "name: 'demo.evaluation': names ending in '.evaluation' are reserved",
    ),
}


@pytest.mark.parametrize("case", sorted(LATE_FAILURES))
def test_a_spec_that_would_fail_after_compute_is_refused_by_ccn_plan(tmp_path, capsys, case):
    """`ccn plan` refuses it: exit 2, one line naming the file, the key and the reason; nothing computed."""
    import ray

    text, expected = LATE_FAILURES[case]
    spec = write(tmp_path, text)
    results = tmp_path / "results"
    code = cli.main(["plan", str(spec), "--results", str(results)])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    lines = [line.strip() for line in captured.err.splitlines()]
    assert f"{spec}: {expected}" in "\n".join(lines), captured.err
    assert any(line.startswith(f"{spec}: {expected.split(':')[0]}") for line in lines), captured.err
    assert not results.exists() and not ray.is_initialized()


def test_atari_steps_within_a_policy_file_and_frames_past_it(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "PongNoFrameskip-v4.txt").write_text("a" * 1_501 + "\n")  # 1,500 steps after the skipped first
    task = 'policy_dir = "policies"'
    assert len(load_spec(write(tmp_path, ATARI.format(task=task).replace("2_000", "1_000"))).runs) == 1
    problems = problems_of(tmp_path, ATARI.format(task=task))
    assert any("tasks[1].frames: the recording of task 'atari-Pong-file' holds 1,500 frames" in p for p in problems)
    assert len(load_spec(write(tmp_path, ATARI.format(task=task + "\nwrap = true"))).runs) == 1  # wrapping: fine
    problems = problems_of(tmp_path, ATARI.format(task=task + "\nframes = 1_600\nwrap = true"))
    assert any("tasks[1]: frames = 1,600, but the policy file" in p and "holds 1,500 steps" in p for p in problems)


def test_the_largest_allowed_seed_and_steps_are_accepted(tmp_path):
    text = VALID.replace("seeds = [0, 1]", "seeds = [4294967290]")
    sweep = load_spec(write(tmp_path, text))
    assert {run.seed for run in sweep.runs} == {4294967290}
    assert sweep.evaluation_seed_list[-1] == 4294967295
    limit = VALID.replace("steps = 2_000", "steps = 2_147_483_000")
    assert load_spec(write(tmp_path, limit)).steps == 2_147_483_000
