"""`ccn cluster up --workers 2`, a sweep with `--address`, `ccn cluster down`: the sweep's batches
run on the worker nodes and no process of that cluster is left behind."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from cluster import local
from cluster.loopback import LOOPBACK_ENV

SPEC = """
name = "cluster-test"
steps = 2000
seeds = [0, 1]
log_every = 1000
batch_size = 1

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:500"
step_size = [0.01]
"""


def ccn(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *arguments], capture_output=True, text=True, env=env, timeout=180
    )


def ccn_env(tmp_path, state) -> dict:
    """The environment of `ccn` subprocesses: this state file, a private JAX cache, W&B off, no RAY_*."""
    return {
        # an earlier in-process ray.init leaves RAY_AUTH_MODE (and RAY_ADDRESS) in os.environ: each `ccn`
        # chooses its own auth mode (a recorded cluster's token); Ray on loopback only, as everywhere
        **{key: value for key, value in os.environ.items() if not key.startswith("RAY_")},
        **LOOPBACK_ENV,
        "CCN_CLUSTER_STATE": str(state),
        "CCN_JAX_CACHE_DIR": str(tmp_path / "jax_cache"),
        "WANDB_MODE": "disabled",
    }


def test_cluster_up_run_down_leaves_no_process_behind(tmp_path):
    state = tmp_path / "cluster.json"
    env = ccn_env(tmp_path, state)
    up = ccn("cluster", "up", "--workers", "2", "--cpus-per-node", "1", env=env)
    assert up.returncode == 0, up.stderr
    cluster = local.LocalCluster.load(state)
    try:
        assert f"address: {cluster.address}" in up.stdout
        assert cluster.dashboard.startswith("http://127.0.0.1:") and f"dashboard: {cluster.dashboard}" in up.stdout
        assert [node.role for node in cluster.nodes] == ["head", "worker", "worker"]
        # Ray's token auth is on: a token only its owner can read; the dashboard refuses requests without it
        assert f"token auth: on; token in {cluster.token_file}" in up.stdout
        assert stat.S_IMODE(os.stat(cluster.token_file).st_mode) == 0o600
        assert http_status(f"{cluster.dashboard}/api/jobs/", None) == 401
        assert all(local._alive(pid, started) for pid, started in cluster.recorded_processes())
        again = ccn("cluster", "up", "--workers", "1", env=env)  # one cluster per state file
        assert again.returncode == 1 and "already recorded" in again.stderr

        spec = tmp_path / "sweep.toml"
        spec.write_text(textwrap.dedent(SPEC))
        results = tmp_path / "results"
        # no RAY_AUTH_* in its environment: `ccn run --address` finds the recorded cluster's token itself
        assert not any(key.startswith("RAY_AUTH") for key in env)
        run = ccn("run", str(spec), "--results", str(results), "--address", cluster.address, "--quiet", env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "2 ran now" in run.stdout
        files = list((results / "cluster-test" / "runs").rglob("*.parquet"))
        assert len(files) == 2

        # the processes alive now, Ray workers started by the sweep included
        tree = [process for node in cluster.nodes for process in local._tree(node.pid)]
        assert len(tree) > 3
    except BaseException:
        local.down(state)
        raise

    down = ccn("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert not state.exists() and not os.path.exists(cluster.token_file)
    left = [pid for pid, started in tree if local._alive(pid, started)]
    assert not left, f"processes of the cluster still running: {left}"
    again = ccn("cluster", "down", env=env)
    assert again.returncode == 1 and "no local cluster" in again.stderr


def test_state_round_trips(tmp_path):
    cluster = local.LocalCluster("127.0.0.1:1", 1, 1, str(tmp_path), [local.Node("head", 1, "log", [(1, 2.0)])])
    cluster.save(tmp_path / "state.json")
    assert local.LocalCluster.load(tmp_path / "state.json") == cluster
    assert json.loads((tmp_path / "state.json").read_text())["address"] == "127.0.0.1:1"
    with pytest.raises(local.ClusterStateError):
        local.down(tmp_path / "nothing.json")


def http_status(url: str, token: str | None) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_clients_take_the_recorded_clusters_auth_and_no_auth_is_explicit(tmp_path, monkeypatch):
    """Which auth settings `ccn run --address` / `ccn submit` take for a recorded cluster (no Ray needed)."""
    from orchestrator import cli

    state = tmp_path / "cluster.json"
    token = tmp_path / "cluster.token"
    cluster = local.LocalCluster("127.0.0.1:6100", 1, 1, str(tmp_path), [], "http://127.0.0.1:8300", str(token))
    cluster.save(state)
    wanted = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    for address in ("127.0.0.1:6100", "http://127.0.0.1:8300", "127.0.0.1:8300/"):
        assert local.client_env(address, state) == wanted
    assert local.client_env("127.0.0.1:6101", state) == {} and local.client_env("auto", state) == {}
    assert local.recorded_for("http://127.0.0.1:8300", state) == cluster

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "someone-elses")
    assert local.use_recorded_auth("127.0.0.1:6100", state)
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(token) and "RAY_AUTH_TOKEN" not in os.environ
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a mode chosen in this process is kept
    assert not local.use_recorded_auth("127.0.0.1:6100", state) and os.environ["RAY_AUTH_MODE"] == "disabled"

    open_cluster = local.LocalCluster("127.0.0.1:1", 1, 1, str(tmp_path), [], "", "")
    assert open_cluster.auth_env() == {"RAY_AUTH_MODE": "disabled"}  # `ccn cluster up --no-auth`
    parser = cli.build_parser()
    assert parser.parse_args(["cluster", "up"]).auth is True  # token auth by default
    assert parser.parse_args(["cluster", "up", "--no-auth"]).auth is False
