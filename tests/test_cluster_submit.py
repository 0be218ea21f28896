"""`ccn submit`: a sweep reaches a real local multi-node cluster through the Ray Jobs API, its
results land in the results folder, bad specs and unreachable clusters fail before any job, the
W&B key never travels; and the cloud / Kubernetes cluster definitions are well-formed."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from test_cluster_local import ccn, ccn_env  # the `ccn` subprocess helpers

from cluster import local, submit
from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
FAKE_KEY = "ccn-fake-wandb-key-0123456789abcdef"

TINY = """
name = "submit-tiny"
steps = 2000
seeds = [0]
log_every = 1000

[[tasks]]
kind = "trace_patterning"
variant = "paper"

[[learners]]
kind = "ccn"
shape = "2:2:inf"
step_size = [0.01, 0.003]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local cluster (a head with the dashboard + 1 worker) for this file; stopped at the end."""
    base = tmp_path_factory.mktemp("submit")
    state = base / "cluster.json"
    env = ccn_env(base, state)
    up = ccn("cluster", "up", "--workers", "1", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    started = local.LocalCluster.load(state)
    assert started.dashboard.startswith("http://127.0.0.1:") and f"dashboard: {started.dashboard}" in up.stdout
    yield started, env, base
    if state.exists():  # test_cluster_down_leaves_nothing_behind did not run or failed
        local.down(state)


def test_submit_runs_the_sweep_on_the_cluster_and_writes_every_run(cluster):
    started, env, base = cluster
    status = ccn("cluster", "status", env=env)
    assert f"dashboard: {started.dashboard}" in status.stdout and f"address: {started.address}" in status.stdout
    outside = base / "elsewhere"  # a spec outside the project root travels inside the upload
    outside.mkdir()
    spec = write(outside / "tiny.toml", TINY)
    results = base / "results"
    submit = ccn(
        "submit", str(spec), "--address", started.dashboard, "--results", str(results), "--wait", "--wandb",
        "disabled", env=env,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "submitted sweep 'submit-tiny' as Ray job ccn-submit-tiny-" in submit.stdout
    assert f"ray job logs --follow --address {started.dashboard} ccn-submit-tiny-" in submit.stdout
    assert "2 ran now" in submit.stdout  # the job's own output, followed
    assert "SUCCEEDED" in submit.stdout.splitlines()[-1]
    expected = {run.run_key for run in load_spec(spec).runs}
    assert len(expected) == 2
    assert set(ResultsStore(str(results), "submit-tiny").completed_runs()) == expected
    assert not (CLUSTER.parent / ".ccn-submit").exists()  # the staged copy is gone after the upload


def packaged(root: Path) -> set[str]:
    """The files Ray's Jobs API would upload from `root` with the runtime_env `ccn submit` builds."""
    import zipfile

    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    excludes = get_runtime_env_default_excludes() + submit.build_runtime_env(root)["excludes"]
    target = root.parent / f"{root.name}-package.zip"
    create_package(str(root), target, include_gitignore=True, excludes=excludes)
    try:
        with zipfile.ZipFile(target) as package:
            return set(package.namelist())
    finally:
        target.unlink()


def test_the_spec_is_in_the_upload_wherever_it_lives(tmp_path):
    """Inside the project, in a git-ignored or excluded folder, or elsewhere: the job can read it."""
    root = tmp_path / "project"
    for folder in ("sweeps", "scratch", "results"):
        (root / folder).mkdir(parents=True)
    (root / ".gitignore").write_text("scratch/\nresults/\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    specs = {
        "inside": write(root / "sweeps" / "a.toml", TINY),
        "git-ignored": write(root / "scratch" / "b.toml", TINY),
        "excluded": write(root / "results" / "c.toml", TINY),
        "outside": write(tmp_path / "d.toml", TINY),
    }
    for where, spec in specs.items():
        in_upload, staged = submit._spec_in_upload(spec, root, f"id-{where}")
        assert (staged is None) == (where == "inside"), where
        if staged is not None:
            staged.parent.mkdir(parents=True)
            staged.write_text(spec.read_text())
        assert in_upload in packaged(root), f"the {where} spec would not reach the job"
    assert submit._spec_in_upload(specs["inside"], root, "x")[0] == "sweeps/a.toml"  # relative paths stay right


def test_this_projects_staging_folder_is_uploaded(tmp_path):
    """The real project's .gitignore must not hide the staged copy (it did once: the job found no spec)."""
    in_upload, staged = submit._spec_in_upload(write(tmp_path / "tiny.toml", TINY), CLUSTER.parent, "pytest-staging")
    staged.parent.mkdir(parents=True)
    try:
        staged.write_text(TINY)
        assert in_upload in packaged(CLUSTER.parent)
    finally:
        shutil.rmtree(staged.parent)
        with contextlib.suppress(OSError):
            staged.parent.parent.rmdir()


def test_a_bad_spec_fails_with_its_error_line_before_contacting_the_cluster(tmp_path):
    spec = write(tmp_path / "bad.toml", TINY.replace("step_size", "step_sise"))
    with socket.socket() as listener:  # a "cluster" that records whether anyone connects
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        env = ccn_env(tmp_path, tmp_path / "s.json")
        result = ccn("submit", str(spec), "--address", address, "--results", str(tmp_path / "r"), env=env)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{spec}: learners[1].step_sise: unknown key; did you mean 'step_size'?" in result.stderr
    assert result.stdout == ""


def test_an_unreachable_address_is_one_clear_line_and_exit_1(tmp_path):
    spec = write(tmp_path / "tiny.toml", TINY)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        env = ccn_env(tmp_path, tmp_path / "s.json")
        result = ccn("submit", str(spec), "--address", f"http://127.0.0.1:{port}", "--results", "/tmp/x", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ccn: cannot reach the Ray Jobs API at 'http://127.0.0.1:{port}'")
    relative = ccn("submit", str(spec), "--address", f"http://127.0.0.1:{port}", "--results", "results", env=env)
    assert relative.returncode == 2 and "absolute path" in relative.stderr  # the job would write to a temp copy


def test_the_wandb_key_never_reaches_the_job_or_the_output(cluster):
    from ray.job_submission import JobSubmissionClient

    started, env, base = cluster
    spec = write(CLUSTER.parent / ".pytest-submit-spec.toml", TINY.replace("submit-tiny", "submit-secret"))
    try:
        # --stage evaluate with no selection results: the job starts, then fails at once (no compute)
        submit = ccn(
            "submit", str(spec), "--address", started.dashboard, "--results", str(base / "secret-results"),
            "--stage", "evaluate", "--wait", env={**env, "WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"},
        )  # fmt: skip
    finally:
        spec.unlink()
    assert submit.returncode == 1, submit.stdout + submit.stderr  # --wait: the job failed
    assert "selection runs are not done yet" in submit.stdout
    assert FAKE_KEY not in submit.stdout + submit.stderr
    job_id = next(word for word in submit.stdout.split() if word.startswith("ccn-submit-secret-"))
    client = JobSubmissionClient(started.dashboard)
    info = client.get_job_info(job_id)
    assert info.runtime_env["env_vars"] == {"WANDB_MODE": "offline"}  # forwarded; the key is not
    assert info.entrypoint.startswith("python -m orchestrator.cli run .pytest-submit-spec.toml --address auto")
    assert FAKE_KEY not in repr(info)  # every field of the job: entrypoint, runtime_env, metadata
    assert FAKE_KEY not in client.get_job_logs(job_id)


def test_cluster_down_leaves_nothing_behind(cluster):
    started, env, _ = cluster
    tree = [process for node in started.nodes for process in local._tree(node.pid)]  # dashboard included
    assert len(tree) > len(started.nodes)
    down = ccn("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr
    left = [pid for pid, start in tree if local._alive(pid, start)]
    assert not left, f"processes of the cluster still running: {left}"
    with socket.socket() as probe:  # the dashboard is gone with the head
        assert probe.connect_ex(("127.0.0.1", int(started.dashboard.rsplit(":", 1)[1]))) != 0


def test_the_cloud_and_kubernetes_definitions_are_well_formed():
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert aws["provider"]["type"] == "aws"
    assert aws["head_node_type"] in aws["available_node_types"]
    types = aws["available_node_types"]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in types.values())  # a GPU type
    assert any("ccn-sweeps" in command for command in aws["setup_commands"])  # installs the project
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(aws))  # Ray's own schema for `ray up`

    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("ccn run sweeps/") and "--address auto" in job["spec"]["entrypoint"]
    assert (CLUSTER.parent / job["spec"]["entrypoint"].split()[2]).exists()  # the spec it names exists
    assert "--results s3://" in job["spec"]["entrypoint"]
    ray_cluster = job["spec"]["rayClusterSpec"]
    head = ray_cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and "8265" in json.dumps(head["ports"])
    groups = {group["groupName"]: group for group in ray_cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
