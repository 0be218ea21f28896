"""`ccn submit`: a sweep reaches a real local multi-node cluster through the Ray Jobs API, its
results land in the results folder, bad specs and unreachable clusters fail before any job, the
W&B key never travels; and the cloud / Kubernetes cluster definitions are well-formed."""

from __future__ import annotations

import json
import shutil
import socket
import stat
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
    assert f"token auth: on; token in {started.token_file}" in up.stdout  # on by default
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


MARKER = "ccn-planted-secret-5f1e2d"  # in every planted secret: found in no upload


def uploaded(runtime_env: dict) -> dict[str, bytes]:
    """Every file Ray's Jobs API would upload for this runtime_env, zipped by Ray's own packaging
    (working_dir as the Jobs client packs it, each py_module with its folder name): name -> bytes."""
    import tempfile
    import zipfile

    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    excludes = get_runtime_env_default_excludes() + list(runtime_env.get("excludes", []))
    parts = [("working_dir", runtime_env["working_dir"], False)]
    parts += [("py_modules", module, True) for module in runtime_env.get("py_modules", [])]
    files = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (kind, folder, parent) in enumerate(parts):
            target = Path(scratch) / f"{index}.zip"
            create_package(folder, target, include_gitignore=True, include_parent_dir=parent, excludes=excludes)
            with zipfile.ZipFile(target) as package:
                for name in package.namelist():
                    if not name.endswith("/"):
                        files[f"{kind}: {name}"] = package.read(name)
    return files


def plant_secrets(folder: Path) -> list[Path]:
    """Files a project folder may hold that must never leave the machine (each holds MARKER)."""
    planted = {
        ".env": f"WANDB_API_KEY={MARKER}\n",
        "server.pem": f"-----BEGIN PRIVATE KEY-----\n{MARKER}\n",
        "deploy.key": MARKER,
        "credentials.json": json.dumps({"token": MARKER}),
        ".aws/credentials": f"[default]\naws_secret_access_key = {MARKER}\n",
        "credentials.py": f"KEY = {MARKER!r}\n",  # even as a .py file
    }
    paths = []
    for name, text in planted.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
    return paths


def test_no_secret_in_the_project_or_its_packages_reaches_the_upload(tmp_path):
    """A project whose root and package folders hold secrets (and a .py symlink to one): the upload
    has the packages' .py files and the spec, and not one byte of any secret."""
    root = tmp_path / "project"
    packages = {}
    for name in submit.PACKAGES:
        package = root / name
        (package / "sub").mkdir(parents=True)
        (package / "__init__.py").write_text(f"NAME = {name!r}\n")
        (package / "sub" / "module.py").write_text("VALUE = 1\n")
        (package / "notes.txt").write_text("not code\n")
        plant_secrets(package)
        plant_secrets(package / "sub")
        (package / "linked.py").symlink_to(root / ".env")  # a symlink is never followed
        packages[name] = package
    plant_secrets(root)
    (tmp_path / "outside.txt").write_text(MARKER)
    (root / "sweeps").mkdir()
    spec = write(root / "sweeps" / "a.toml", TINY)
    (root / ".gitignore").write_text("sweeps/\n")  # a git-ignored spec is uploaded all the same

    with submit.stage_upload(spec, root, packages) as upload:
        files = uploaded(submit.build_runtime_env(upload))
        listed = upload.files()
        left_out = upload.left_out
    leaked = [name for name, data in files.items() if MARKER.encode() in data]
    assert not leaked, f"secrets in the upload: {leaked}"
    expected = {"working_dir: sweeps/a.toml"} | {
        f"py_modules: {name}/{path}" for name in submit.PACKAGES for path in ("__init__.py", "sub/module.py")
    }
    assert set(files) == expected  # nothing else: no notes, no symlink, no project files
    assert sorted(files) == sorted(listed)  # --dry-run lists exactly what Ray packs
    assert any(path.endswith("learners/.env") for path in left_out)  # reported, never copied
    assert any(path.endswith("learners/sub/credentials.py") for path in left_out)


def test_the_real_upload_is_the_packages_and_the_spec_only(tmp_path):
    """This project, with secrets planted in its root: the upload has the packages' .py files and
    the spec, at its path in the project; a spec elsewhere travels under its file name."""
    placed = []  # secrets in this project's root (its old upload was the whole root), new names only
    try:
        for path in plant_secrets(tmp_path / "planted"):
            target = CLUSTER.parent / f"pytest-planted-{path.name}"
            if path.parent.name == "planted" and not target.exists():
                shutil.copyfile(path, target)
                placed.append(target)
        spec = CLUSTER.parent / "sweeps" / "demo.toml"
        with submit.stage_upload(spec) as upload:
            assert upload.spec == "sweeps/demo.toml"
            runtime_env = submit.build_runtime_env(upload)
            files = uploaded(runtime_env)
    finally:
        for target in placed:
            target.unlink()
    assert not [name for name, data in files.items() if MARKER.encode() in data]
    assert set(runtime_env) <= {"working_dir", "py_modules", "env_vars"}  # no working_dir of the project
    assert [name for name in files if name.startswith("working_dir:")] == ["working_dir: sweeps/demo.toml"]
    modules = {name.split(": ", 1)[1].split("/", 1)[0] for name in files if name.startswith("py_modules:")}
    assert modules == set(submit.PACKAGES)
    assert all(name.endswith(".py") for name in files if name.startswith("py_modules:"))
    assert "py_modules: orchestrator/cli.py" in files and "py_modules: learners/ccn.py" in files
    outside = write(tmp_path / "elsewhere.toml", TINY)
    with submit.stage_upload(outside) as upload:
        assert upload.spec == "elsewhere.toml" and (upload.working_dir / "elsewhere.toml").read_text() == TINY


def test_dry_run_lists_every_uploaded_file_and_contacts_nothing(tmp_path):
    spec = write(tmp_path / "tiny.toml", TINY)
    with socket.socket() as listener:  # a "cluster" that records whether anyone connects
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        env = ccn_env(tmp_path, tmp_path / "s.json")
        result = ccn("submit", str(spec), "--address", address, "--results", str(tmp_path / "r"), "--dry-run", env=env)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing was sent" in result.stdout
    assert f"python -m orchestrator.cli run tiny.toml --address auto --results {tmp_path / 'r'}" in result.stdout
    listed = [line.strip() for line in result.stdout.splitlines() if line.startswith("    ")]
    with submit.stage_upload(spec) as upload:
        assert sorted(listed) == sorted(uploaded(submit.build_runtime_env(upload)))
    assert "working_dir: tiny.toml" in listed and "py_modules: orchestrator/cli.py" in listed
    without = ccn("submit", str(spec), "--results", str(tmp_path / "r"), "--dry-run", env=env)  # no --address
    assert without.returncode == 0 and without.stdout == result.stdout
    missing = ccn("submit", str(spec), "--results", str(tmp_path / "r"), env=env)
    assert missing.returncode == 2 and "--address" in missing.stderr
    # the driver's options reach the job's `ccn run`
    options = ["--max-actors", "4", "--takeover", "--max-attempts", "2"]
    forwarded = ccn("submit", str(spec), "--results", str(tmp_path / "r"), "--dry-run", *options, env=env)
    assert forwarded.returncode == 0, forwarded.stderr
    assert "--max-attempts 2 --max-actors 4 --takeover" in forwarded.stdout


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


def http_status(url: str, token: str | None) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_cluster_serves_only_holders_of_its_token(cluster):
    """Token auth is on: the Jobs API refuses a request without the token, or with another one."""
    started, env, base = cluster
    token_file = Path(started.token_file)
    assert token_file.parent == Path(started.nodes[0].log).parent.parent  # beside the state file
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # only its owner can read it
    token = token_file.read_text()
    assert len(token) >= 32
    jobs = f"{started.dashboard}/api/jobs/"
    assert http_status(jobs, None) == 401
    assert http_status(jobs, "not-the-token") == 403
    assert http_status(jobs, token) == 200
    # `ccn submit` from a shell that knows neither this cluster's state file nor its token: one line
    spec = write(base / "stranger.toml", TINY)
    stranger = ccn(
        "submit", str(spec), "--address", started.dashboard, "--results", str(base / "stranger"),
        env={**env, "CCN_CLUSTER_STATE": str(base / "elsewhere.json")},
    )  # fmt: skip
    assert stranger.returncode == 1, stranger.stdout + stranger.stderr
    lines = stranger.stderr.strip().splitlines()
    assert len(lines) == 1 and "auth token" in lines[0] and token not in lines[0], lines


def test_the_wandb_key_never_reaches_the_job_or_the_output(cluster):
    from ray.job_submission import JobSubmissionClient

    started, env, base = cluster
    token = Path(started.token_file).read_text()
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
    assert FAKE_KEY not in submit.stdout + submit.stderr and token not in submit.stdout + submit.stderr
    job_id = next(word for word in submit.stdout.split() if word.startswith("ccn-submit-secret-"))
    client = JobSubmissionClient(started.dashboard, headers={"Authorization": f"Bearer {token}"})
    info = client.get_job_info(job_id)
    assert info.runtime_env["env_vars"] == {"WANDB_MODE": "offline"}  # forwarded; the key is not
    assert info.entrypoint.startswith("python -m orchestrator.cli run .pytest-submit-spec.toml --address auto")
    assert set(info.runtime_env) == {"working_dir", "py_modules", "env_vars"}  # the staged upload only
    for secret in (FAKE_KEY, token):
        assert secret not in repr(info)  # every field of the job: entrypoint, runtime_env, metadata
        assert secret not in client.get_job_logs(job_id)


def test_cluster_down_leaves_nothing_behind(cluster):
    started, env, _ = cluster
    tree = [process for node in started.nodes for process in local._tree(node.pid)]  # dashboard included
    assert len(tree) > len(started.nodes)
    down = ccn("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert not Path(started.token_file).exists()  # the token goes with the cluster
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
    # token auth on every node; the token reaches every node; the dashboard stays on loopback
    for commands in (aws["head_start_ray_commands"], aws["worker_start_ray_commands"]):
        assert all("RAY_AUTH_MODE=token" in command for command in commands if "ray start" in command)
    assert aws["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--dashboard-host=127.0.0.1" in " ".join(aws["head_start_ray_commands"])

    job, policy = yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text())
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
    # every Ray process (head, workers, the submitter) in token mode, with the token from a Secret
    templates = [ray_cluster["headGroupSpec"]["template"], job["spec"]["submitterPodTemplate"]]
    templates += [group["template"] for group in ray_cluster["workerGroupSpecs"]]
    label = {"app.kubernetes.io/part-of": "ccn-sweeps"}
    for template in templates:
        assert template["metadata"]["labels"] == label
        for container in template["spec"]["containers"]:
            env = {item["name"]: item for item in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ccn-ray-auth", "key": "auth_token"}
    # and a NetworkPolicy that admits only the sweep's own pods (and the operator, on the dashboard)
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert policy["spec"]["podSelector"]["matchLabels"] == label and policy["spec"]["policyTypes"] == ["Ingress"]
    sources = [source for rule in policy["spec"]["ingress"] for source in rule["from"]]
    assert {"podSelector": {"matchLabels": label}} in sources
    assert all(rule.get("ports") == [{"protocol": "TCP", "port": 8265}] for rule in policy["spec"]["ingress"][1:])
