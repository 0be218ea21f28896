"""One learner protocol, one learner registry, one task registry (issue 14, items 1, 2 and 4).

Run identity must not move: the run keys below were computed before the protocol and the
registries replaced the orchestrator's per-learner code, so results written before stay valid.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.spec import SpecError, load_spec

PINNED_SPEC = """
name = "pins"
steps = 2_000
seeds = [0, 7]
log_every = 1_000

[[tasks]]
kind = "trace_patterning"
variant = "paper"

[[tasks]]
kind = "trace_conditioning"
iti_range = [80, 120]

[[learners]]
kind = "ccn"
shape = "20:4:500"
step_size = [0.01, 0.003]
normalization_rate = [1.0, 0.99999]

[[learners]]
kind = "ccn"
shape = "7:7:inf"
step_size = 0.01
dtype = "float64"

[[learners]]
kind = "tbptt"
match_flops = { of = "ccn", tolerance = 0.15, truncations = [2, 5] }
step_size = [1e-3, 3e-4]

[[learners]]
kind = "tbptt"
shape = ["10:5", "2:13"]
step_size = 1e-3
variant = "stale"
lam = 0.9
"""

# (learner_name, task, config, hyper, seed) -> run_key, computed with the code before issue 14
# (package version pinned to "0.0.0-pinned", as the fixture below does)
PINNED_KEYS = {
    ("ccn", "trace_patterning-paper", (("columns_per_stage", 4), ("dtype", "float32"), ("steps_per_stage", 500),
     ("total_columns", 20)), (("lam", 0.99), ("normalization_rate", 1.0), ("std_cap", 0.01), ("step_size", 0.01)),
     0): "dedfccc320c2a785ef993ec1e7149855e61d8ca9738d4989c052bebb37d1361f",
    ("ccn", "trace_patterning-paper", (("columns_per_stage", 4), ("dtype", "float32"), ("steps_per_stage", 500),
     ("total_columns", 20)), (("lam", 0.99), ("normalization_rate", 1.0), ("std_cap", 0.01), ("step_size", 0.003)),
     0): "4410d61af397f7fac435c4d2eb1b96beeec205e55d83b0ddc2d4a999d9014862",
    ("columnar", "trace_patterning-paper", (("columns_per_stage", 7), ("dtype", "float64"), ("steps_per_stage", None),
     ("total_columns", 7)), (("lam", 0.99), ("normalization_rate", 0.99999), ("std_cap", 0.01), ("step_size", 0.01)),
     0): "57f8b6884aa6fbf9f51a3d0a404f294096be6cf39f5d0cf1357c7d5ff1f6477c",
    ("tbptt", "trace_patterning-paper", (("dtype", "float32"), ("hidden", 8), ("truncation", 2),
     ("variant", "recompute")), (("lam", 0.99), ("step_size", 0.0003)),
     0): "163662d06567a8de9bab0474df17ff31587efba4ec3d174c4a375af337c1fbab",
    ("tbptt", "trace_patterning-paper", (("dtype", "float32"), ("hidden", 6), ("truncation", 5),
     ("variant", "recompute")), (("lam", 0.99), ("step_size", 0.001)),
     7): "bdf9795ca0fe71e4be8cecc9329d43e57d3ab29a3c10c0be4fb16e3316c03655",
    ("tbptt", "trace_patterning-paper", (("dtype", "float32"), ("hidden", 13), ("truncation", 2),
     ("variant", "stale")), (("lam", 0.9), ("step_size", 0.001)),
     7): "adc2a6f91b77adb6011b6809c7d5c4711e033c49af171ddf17ff6872a635e799",
    ("ccn", "trace_conditioning-rafiee", (("columns_per_stage", 4), ("dtype", "float32"), ("steps_per_stage", 500),
     ("total_columns", 20)), (("lam", 0.99), ("normalization_rate", 0.99999), ("std_cap", 0.01),
     ("step_size", 0.003)), 0): "23b06757442a124a9daf4a2d53c105499e46f8c025f9290517eeb1bb6433ebc7",
    ("tbptt", "trace_conditioning-rafiee", (("dtype", "float32"), ("hidden", 6), ("truncation", 5),
     ("variant", "recompute")), (("lam", 0.99), ("step_size", 0.0003)),
     7): "491e6e5d729ef3a5f0012e2c956f321fcb7135af1a92410fa19f3dcff731a407",
    ("tbptt", "trace_conditioning-rafiee", (("dtype", "float32"), ("hidden", 13), ("truncation", 2),
     ("variant", "stale")), (("lam", 0.9), ("step_size", 0.001)),
     7): "a55a45c2aecbf8a4d97d1bcd727b4e2a87231da208d5a4467f0139d75f2a064d",
}


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, text))
    return caught.value.problems


def test_run_keys_of_existing_learners_did_not_change(tmp_path, monkeypatch):
    import orchestrator.runs

    monkeypatch.setattr(orchestrator.runs, "package_version", lambda: "0.0.0-pinned")
    monkeypatch.setattr(orchestrator.runs, "learner_revision", lambda kind: None)  # the keys before REVISION
    sweep = load_spec(write(tmp_path, PINNED_SPEC))
    assert len(sweep.runs) == 52
    keys = {(r.learner_name, r.task.name, r.config, r.hyper, r.seed): r.run_key for r in sweep.runs}
    for identity, key in PINNED_KEYS.items():
        assert keys[identity] == key, identity


def test_a_learner_revision_renews_only_that_learners_run_keys(tmp_path, monkeypatch):
    """A learner's REVISION is in its runs' keys and renews only them: T-BPTT's (2: the recompute fix)
    and the CCN's (1: P padded to a multiple of 8) renew every pinned key; with the CCN's revision taken
    away, its runs (ccn and columnar) get their pinned keys back while T-BPTT's stay renewed."""
    import orchestrator.runs
    from learners import ccn, tbptt

    monkeypatch.setattr(orchestrator.runs, "package_version", lambda: "0.0.0-pinned")
    assert (tbptt.REVISION, ccn.REVISION) == (2, 1)

    def keys_and_kinds():
        sweep = load_spec(write(tmp_path, PINNED_SPEC))
        keys = {(r.learner_name, r.task.name, r.config, r.hyper, r.seed): r.run_key for r in sweep.runs}
        return keys, {r.learner_name: r.learner for r in sweep.runs}, sweep

    keys, kind_of, sweep = keys_and_kinds()
    assert {kind_of[identity[0]] for identity in PINNED_KEYS} == {"ccn", "tbptt"}
    assert all(keys[identity] != key for identity, key in PINNED_KEYS.items())
    assert next(r for r in sweep.runs if r.learner == "tbptt").canonical()["learner"]["revision"] == 2
    assert next(r for r in sweep.runs if r.learner == "ccn").canonical()["learner"]["revision"] == 1

    revision = orchestrator.runs.learner_revision
    monkeypatch.setattr(orchestrator.runs, "learner_revision", lambda kind: None if kind == "ccn" else revision(kind))
    keys, kind_of, _ = keys_and_kinds()
    for identity, key in PINNED_KEYS.items():
        assert (keys[identity] == key) == (kind_of[identity[0]] == "ccn"), identity


def test_the_builtin_learners_say_their_own_facts():
    from learners import ccn, registry, tbptt

    assert registry.names()[:2] == ("ccn", "tbptt")
    assert registry.resolve("ccn") is ccn and registry.resolve("learners.tbptt") is tbptt
    assert registry.shape_fields(ccn) == ("total_columns", "columns_per_stage", "steps_per_stage")
    assert registry.static_defaults(ccn) == {"dtype": "float32"}
    assert registry.static_defaults(tbptt) == {"variant": "recompute", "dtype": "float32"}  # not unroll_window
    assert registry.hyper_defaults(tbptt) == {"step_size": registry.MISSING, "lam": 0.99}
    assert registry.identity(tbptt, tbptt.Config.from_shape("10:5", 12, "stale")) == {
        "truncation": 10, "hidden": 5, "variant": "stale", "dtype": "float32"}
    assert ccn.family(ccn.Config.from_shape("7:7:inf", 12)) == "columnar"
    assert ccn.check_hyper("lam", 1.5) == "must be in [0, 1]" and ccn.check_hyper("lam", 0.5) is None
    with pytest.raises(LookupError):
        registry.resolve("lstm")


def test_a_module_path_resolves_and_a_module_without_the_protocol_is_named(tmp_path, monkeypatch):
    from learners import registry

    package = tmp_path / "outside_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "half.py").write_text("class Config:\n    pass\n")
    (package / "alias.py").write_text("from learners.tbptt import *  # noqa\nfrom learners.tbptt import cost\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="does not follow the learner protocol: no Hyper; no init; no step"):
        registry.resolve("outside_pkg.half")
    with pytest.raises(ValueError, match="cannot import outside_pkg.absent"):
        registry.resolve("outside_pkg.absent")
    assert registry.resolve("outside_pkg.alias").Config.__name__ == "Config"
    for name in ("outside_pkg", "outside_pkg.half", "outside_pkg.alias"):
        sys.modules.pop(name, None)


def test_registering_a_learner_is_one_line(monkeypatch):
    from learners import registry, tbptt
    from orchestrator.learner_kinds import LEARNER_KINDS

    monkeypatch.setitem(registry._REGISTERED, "lstm_baseline", "learners.tbptt")
    assert "lstm_baseline" in registry.names() and registry.resolve("lstm_baseline") is tbptt
    assert LEARNER_KINDS["lstm_baseline"].shape_fields == ("truncation", "hidden")


def test_a_bad_static_setting_is_named_at_its_key(tmp_path):
    problems = problems_of(tmp_path, """
        name = "x"
        steps = 1000
        seeds = 1
        [[tasks]]
        kind = "trace_patterning"
        [[learners]]
        kind = "tbptt"
        shape = "10:5"
        step_size = 1e-3
        variant = ["recompute", "sometimes"]
        """)
    assert any("learners[1].variant: tbptt.Config.variant must be one of" in p for p in problems), problems


def test_compute_matching_between_any_two_learner_kinds(tmp_path):
    """A CCN matched to a T-BPTT's compute (the other way round from the paper's)."""
    from learners import ccn, tbptt

    sweep = load_spec(write(tmp_path, """
        name = "x"
        steps = 1000
        seeds = 1
        [[tasks]]
        kind = "trace_patterning"
        [[learners]]
        kind = "tbptt"
        shape = "10:5"
        step_size = 1e-3
        [[learners]]
        kind = "ccn"
        match_flops = { of = "tbptt", tolerance = 0.1 }
        step_size = 0.01
        """))
    budget = tbptt.cost(tbptt.Config.from_shape("10:5", 12)).flops_per_step
    matched = [run for run in sweep.runs if run.learner == "ccn"]
    assert matched
    for run in matched:
        cost = ccn.cost(ccn.Config(12, **run.config_dict)).flops_per_step
        assert abs(cost - budget) <= 0.1 * budget
    expected = {shape for shape in ccn.candidate_shapes(12)
                if abs(ccn.cost(ccn.Config.from_shape(shape, 12)).flops_per_step - budget) <= 0.1 * budget}
    assert {ccn.Config(12, **run.config_dict).shape for run in matched} == expected


def test_a_learner_without_candidate_shapes_cannot_be_matched(tmp_path, monkeypatch):
    from learners import registry

    fake = type(sys)("no_candidates")
    from learners import ccn

    for name in ("Config", "Hyper", "init", "step", "cost"):
        setattr(fake, name, getattr(ccn, name))
    monkeypatch.setitem(registry._REGISTERED, "fixed", fake)
    problems = problems_of(tmp_path, """
        name = "x"
        steps = 1000
        seeds = 1
        [[tasks]]
        kind = "trace_patterning"
        [[learners]]
        kind = "tbptt"
        shape = "10:5"
        step_size = 1e-3
        [[learners]]
        kind = "fixed"
        match_flops = { of = "tbptt" }
        step_size = 0.01
        """)
    assert any("learners[2].match_flops: fixed gives no candidate_shapes" in p for p in problems), problems


def test_a_learner_without_cost_is_measured_from_xla():
    import jax

    from learners import compute, registry, tbptt

    fake = type(sys)("unpriced")
    for name in ("Config", "Hyper", "init", "step"):
        setattr(fake, name, getattr(tbptt, name))
    cfg = tbptt.Config.from_shape("2:3", 4)
    cost = registry.cost(fake, cfg)
    assert registry.cost_source(fake) == "measured" and registry.cost_source(tbptt) == "analytic"
    assert cost.params == tbptt.cost(cfg).params  # the state's params
    hyper = tbptt.Hyper(0.01)
    state = tbptt.init(cfg, hyper, jax.random.PRNGKey(0))
    x = jax.numpy.zeros(4)
    analysis = jax.jit(lambda h, s, o, c, g: tbptt.step(cfg, h, s, o, c, g)).lower(
        hyper, state, x, 0.0, 0.0).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    assert cost.flops_per_step == round(analysis["flops"]) > 0
    assert compute.measured_cost(fake, cfg) is cost  # cached


# -- tasks -------------------------------------------------------------------------------------
def test_task_kinds_come_from_the_one_registry():
    import environments
    from environments import metrics
    from orchestrator.task_kinds import TASK_KINDS

    assert tuple(TASK_KINDS) == environments.available_tasks()
    assert {"trace_patterning", "trace_conditioning", "noisy_patterning", "atari", "gym"} <= set(TASK_KINDS)
    assert not hasattr(metrics, "ANIMAL_TASKS") and not hasattr(metrics, "EPISODIC_TASKS")
    assert TASK_KINDS["gym"].metrics == ("msre_window", "msre_interval", "msre_episode")
    assert TASK_KINDS["trace_patterning"].device and not TASK_KINDS["gym"].device


def test_a_gym_task_is_checked_before_anything_runs(tmp_path):
    base = """
        name = "g"
        steps = 1000
        seeds = 1
        [[tasks]]
        kind = "gym"
        {task}
        window = 1000
        [[learners]]
        kind = "ccn"
        shape = "2:2:inf"
        step_size = 0.01
        """
    sweep = load_spec(write(tmp_path, base.format(task='env_id = "CartPole-v1"')))
    [task] = sweep.tasks
    assert (task.name, task.n_inputs) == ("gym-CartPole-v1-random", 4)
    assert task.params_dict == {"env_id": "CartPole-v1", "gamma": 0.99, "policy": "random", "seed": 0,
                                "window": 1000}
    for text, expected in (
        ('env_id = "NoSuchEnv-v9"', "tasks[1]: env_id 'NoSuchEnv-v9' is not a registered gymnasium environment"),
        ('env_id = "CartPole-v1"\ngamma = 2.0', "tasks[1]: gamma must be a number in [0, 1], got 2.0"),
        ('env_id = "CartPole-v1"\npolicy = "greedy"', "tasks[1]: policy must be 'random' in a spec"),
        ('env_id = "CartPole-v1"\nrender = true', "tasks[1].render: unknown key"),
    ):
        problems = problems_of(tmp_path, base.format(task=text))
        assert any(expected in p for p in problems), problems


def test_an_external_task_by_module_path(tmp_path, monkeypatch):
    package = tmp_path / "outside_tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "fixed_isi.py").write_text(textwrap.dedent("""
        from environments.animal import make_animal_stream

        def make_device_stream(isi: int = 10):
            return make_animal_stream("trace_conditioning", isi=isi)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = """
        name = "x"
        steps = 1000
        seeds = 1
        [[tasks]]
        kind = "{kind}"
        isi = 20
        window = 1000
        [[learners]]
        kind = "ccn"
        shape = "2:2:inf"
        step_size = 0.01
        """
    [task] = load_spec(write(tmp_path, spec.format(kind="outside_tasks.fixed_isi"))).tasks
    assert (task.kind, task.name, task.n_inputs, task.params_dict["isi"]) == (
        "outside_tasks.fixed_isi", "outside_tasks.fixed_isi", 12, 20)
    problems = problems_of(tmp_path, spec.format(kind="no_such_package.task"))
    assert any("tasks[1].kind: task 'no_such_package.task': cannot import" in p for p in problems), problems
    problems = problems_of(tmp_path, spec.format(kind="trace_patterns"))
    assert any("tasks[1].kind: unknown kind 'trace_patterns'; did you mean 'trace_patterning'?" in p
               for p in problems), problems
    for name in ("outside_tasks", "outside_tasks.fixed_isi"):
        sys.modules.pop(name, None)


def test_a_registered_learner_written_as_its_module_path_names_the_same_runs(tmp_path):
    spec = """
        name = "x"
        steps = 1000
        seeds = 1
        [[tasks]]
        kind = "trace_patterning"
        [[learners]]
        kind = "{kind}"
        shape = "10:5"
        step_size = 1e-3
        """
    by_name = load_spec(write(tmp_path, spec.format(kind="tbptt"), "a.toml")).runs
    by_path = load_spec(write(tmp_path, spec.format(kind="learners.tbptt"), "b.toml")).runs
    assert [r.run_key for r in by_name] == [r.run_key for r in by_path] and by_path[0].learner == "tbptt"


def test_truncations_only_filter_a_learner_with_a_truncation(tmp_path):
    problems = problems_of(tmp_path, """
        name = "x"
        steps = 1000
        seeds = 1
        [[tasks]]
        kind = "trace_patterning"
        [[learners]]
        kind = "tbptt"
        shape = "10:5"
        step_size = 1e-3
        [[learners]]
        kind = "ccn"
        match_flops = { of = "tbptt", truncations = [2] }
        step_size = 0.01
        """)
    assert any("learners[2].match_flops.truncations: ccn has no truncation in its shape ('20:4:50000')" in p
               for p in problems), problems


def test_the_packages_a_cluster_job_must_upload_for_external_kinds(tmp_path, monkeypatch):
    from orchestrator.spec import external_packages

    package = tmp_path / "outside_learners"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "alias.py").write_text("from learners.tbptt import *  # noqa\nfrom learners.tbptt import cost\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sweep = load_spec(write(tmp_path, """
        name = "x"
        steps = 1000
        seeds = 1
        [[tasks]]
        kind = "trace_patterning"
        [[learners]]
        kind = "outside_learners.alias"
        shape = "10:5"
        step_size = 1e-3
        [[learners]]
        kind = "ccn"
        shape = "2:2:inf"
        step_size = 0.01
        """))
    assert external_packages(sweep) == {"outside_learners": package.resolve()}
    for name in ("outside_learners", "outside_learners.alias"):
        sys.modules.pop(name, None)


def test_every_registered_learner_is_usable_from_a_spec(tmp_path):
    """Each registered learner (its example shape) and its compute matched to a CCN's, by name alone."""
    from learners import registry
    from orchestrator.learner_kinds import learner_kind

    tables = []
    for name in registry.names():
        kind = learner_kind(name)
        tables.append(f'[[learners]]\nkind = "{name}"\nname = "{name}-x"\nshape = "{kind.shape_example}"\n'
                      "step_size = 0.001\n")
        if callable(getattr(kind.module, "candidate_shapes", None)) and name != "ccn":
            tables.append(f'[[learners]]\nkind = "{name}"\nname = "{name}-matched"\n'
                          'match_flops = { of = "ccn-x", tolerance = 0.3 }\nstep_size = 0.001\n')
    spec = 'name = "x"\nsteps = 1000\nseeds = 1\n[[tasks]]\nkind = "trace_patterning"\n' + "\n".join(tables)
    sweep = load_spec(write(tmp_path, spec))
    assert {run.learner for run in sweep.runs} == set(registry.names())
