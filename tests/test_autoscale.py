"""A sweep grows an autoscaling cluster and lets it shrink: Ray's real autoscaler (its monitor
process on the head, with the fake multi-node provider, which starts a real raylet per node on
this machine), head with 0 CPUs, one worker type of 1 CPU, 0 to 2 of them.

Not `ray.cluster_utils.AutoscalingCluster`: its start and shutdown run `ray stop --force`, which
ends every Ray of the user on the machine, and its default config is not in the Ray wheel. The
head here is a `ray.cluster_utils.Cluster` head given the autoscaling config; the worker nodes
are the monitor's children, recorded by pid while they live, and checked gone by pid at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from orchestrator import api

SPEC = """
name = "autoscale"
steps = 30000
seeds = [0, 1]
log_every = 10000
batch_size = 1

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "3:3:inf"
step_size = [0.01, 0.003, 0.001]
"""
IDLE_TIMEOUT_MINUTES = 0.1  # a worker node with nothing on it goes after 6 s
MAX_WORKERS = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def autoscaling_config(gcs_address: str) -> dict:
    """A complete autoscaler config for the fake multi-node provider (the wheel ships no defaults)."""
    return {
        "cluster_name": "ccn-autoscale-test",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            "type": "external",  # the fake provider, loaded by module path: no defaults file needed
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "gcs_address": gcs_address,
            "launch_multiple": True,
            "use_node_id_as_ip": True,  # every node is at 127.0.0.1: the autoscaler tells them apart by id
            "disable_node_updaters": True,  # nothing to set up on a fake node (and it cannot be tagged)
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "nobody"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu1": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (None when it is gone): a pid plus this names one process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class Recorder(threading.Thread):
    """Records every process under the autoscaler's monitor (the fake nodes it starts) while they live."""

    def __init__(self, monitor_pid: int):
        super().__init__(daemon=True)
        self.monitor_pid = monitor_pid
        self.seen: dict[tuple[int, int], str] = {}  # (pid, start time) -> command line
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.2):
            self.sample()

    def sample(self) -> None:
        for pid in descendants(self.monitor_pid):
            started = start_time(pid)
            if started is None:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            self.seen[(pid, started)] = command  # again each time: a child seen before its exec has its parent's

    def raylets(self) -> list[tuple[int, int]]:
        return [key for key, command in self.seen.items() if "raylet/raylet" in command]

    def alive(self, keys=None) -> list[tuple[int, int]]:
        return [(pid, started) for pid, started in (keys or self.seen) if start_time(pid) == started]


@pytest.fixture
def autoscaling_cluster(tmp_path, monkeypatch, request):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("CCN_JAX_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")  # lets the monitor load the fake provider
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
    monkeypatch.setenv("AUTOSCALER_METRIC_PORT", str(free_port()))  # not the fixed default another Ray may hold
    port = free_port()
    config = tmp_path / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(f"127.0.0.1:{port}")))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "autoscaling_config": str(config),
            "gcs_server_port": port,
            "node_ip_address": "127.0.0.1",
        },
    )
    [monitor] = cluster.head_node.all_processes["monitor"]
    recorder = Recorder(monitor.process.pid)
    recorder.start()
    failures = request.session.testsfailed
    try:
        yield cluster, recorder
    finally:
        recorder.halt.set()
        recorder.join()
        ray.shutdown()
        cluster.shutdown()  # the head's own processes (GCS, raylet, monitor...), by the handles it keeps
        deadline = time.monotonic() + 15
        while recorder.alive() and time.monotonic() < deadline:  # fake nodes' processes finishing their exit
            time.sleep(0.2)
        left = recorder.alive()
        for pid, started in left:  # what the fake provider left (e.g. a node's log monitor): exactly it, by pid
            if start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)
        raylets = [key for key in left if key in recorder.raylets()]
        if request.session.testsfailed == failures:  # the test passed: then no node may be left
            assert not raylets, f"raylets of the fake nodes outlived the cluster: {raylets}"


def test_a_sweep_grows_the_cluster_from_zero_workers_and_it_shrinks_after(autoscaling_cluster, tmp_path):
    import ray

    cluster, recorder = autoscaling_cluster
    spec = tmp_path / "autoscale.toml"
    spec.write_text(textwrap.dedent(SPEC))
    results = tmp_path / "results"
    ray.init(address=cluster.address, log_to_driver=False)
    assert not [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]  # no worker yet
    ray.shutdown()

    report = api.run_sweep(spec, str(results), address=cluster.address, progress=False)
    assert report.ok and report.ran == 6
    assert report.workers == 6  # one actor asked per batch, with no CPU in the cluster at the start
    used = {node for node, count in report.node_batches.items() if count}
    assert len(used) >= 2, f"the batches ran on {len(used)} node(s): {report.node_batches}"
    keys = [key for (key,) in duckdb.sql(f"SELECT run_key FROM read_parquet('{results}/autoscale/runs/**/*.parquet')"
                                          ).fetchall()]  # fmt: skip
    assert len(keys) == len(set(keys)) == 6  # every run exactly once
    metrics = f"read_parquet('{results}/autoscale/metrics/**/*.parquet')"
    [(count, distinct)] = duckdb.sql(f"SELECT count(*), count(DISTINCT (run_key, step)) FROM {metrics}").fetchall()
    assert count == distinct == 6 * 3

    ray.init(address=cluster.address, log_to_driver=False)
    nodes = ray.nodes()
    workers = {n["NodeID"] for n in nodes} - {cluster.head_node.node_id}  # alive, or already scaled down
    assert used <= workers and len(workers) >= 2  # the autoscaler launched them
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    recorder.sample()
    raylets = recorder.raylets()
    assert len(raylets) >= 2  # one raylet per launched worker node, children of the autoscaler

    deadline = time.monotonic() + 90  # idle timeout, then the autoscaler's next updates
    while time.monotonic() < deadline:
        if not [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")] and not recorder.alive(raylets):
            break
        time.sleep(1)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    assert not alive, f"worker nodes still up {90}s after the sweep: {alive}"
    assert not recorder.alive(raylets), "the scaled-down nodes' raylets are still running"


def test_the_cluster_definitions_let_a_sweep_grow_and_shrink_them():
    """aws.yaml and the KubeRay RayJob start with no sweep worker and autoscale on pending actors."""
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    folder = Path(__file__).resolve().parent.parent / "cluster"
    aws = yaml.safe_load((folder / "aws.yaml").read_text())
    validate_config(fillout_defaults(aws))
    types = aws["available_node_types"]
    assert types[aws["head_node_type"]]["resources"] == {"CPU": 0}  # no sweep actor on the head
    assert types["cpu-worker"]["min_workers"] == 0 and types["cpu-worker"]["max_workers"] > 1
    assert aws["idle_timeout_minutes"] > 0

    job, _ = yaml.safe_load_all((folder / "kuberay-rayjob.yaml").read_text())
    ray_cluster = job["spec"]["rayClusterSpec"]
    assert ray_cluster["enableInTreeAutoscaling"] is True
    options = ray_cluster["autoscalerOptions"]
    assert options["idleTimeoutSeconds"] > 0
    assert {item["name"] for item in options["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    [cpu] = [group for group in ray_cluster["workerGroupSpecs"] if group["groupName"] == "cpu"]
    assert cpu["minReplicas"] == cpu["replicas"] == 0 and cpu["maxReplicas"] > 1


def test_on_an_elastic_cluster_batches_do_not_depend_on_the_nodes_alive(tmp_path):
    """No worker count (an attached cluster without --max-actors): batches of CPU_ELASTIC_BATCH
    runs, one actor each; with --max-actors A: cut so that each of the A actors gets work."""
    from orchestrator.plan import CPU_ELASTIC_BATCH, plan_batches
    from orchestrator.spec import load_spec

    spec = tmp_path / "wide.toml"
    spec.write_text(textwrap.dedent(SPEC).replace("seeds = [0, 1]", "seeds = [0, 1, 2, 3, 4, 5, 6]"))
    runs = load_spec(spec).runs  # 21 runs of one signature
    elastic = plan_batches("s", runs, workers=None)
    assert [len(b.runs) for b in elastic] == [7, 7, 7] and CPU_ELASTIC_BATCH == 8  # ceil(21 / 8) near-equal batches
    assert len(plan_batches("s", runs, workers=None, batch_size=1)) == 21  # the spec's batch_size still rules
    assert len(plan_batches("s", runs, workers=10)) == 7  # --max-actors 10: at most ceil(21 / 10) = 3 runs each
