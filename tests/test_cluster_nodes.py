"""Sweeps on an in-process multi-node Ray cluster (`ray.cluster_utils.Cluster`).

Every node is a real raylet with its own worker processes; removing a node kills them, as a
preempted machine would.
"""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

import duckdb
import pytest

from orchestrator import api

SPEC = """
name = "{name}"
steps = {steps}
seeds = [0, 1]
log_every = 50_000
batch_size = 1
checkpoint_every = 0

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "3:3:inf"
step_size = {step_sizes}
"""


def write_spec(tmp_path: Path, name: str, steps: int, step_sizes: list[float]) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(SPEC.format(name=name, steps=steps, step_sizes=step_sizes)))
    return path


def rows(results: Path, sweep: str) -> list[tuple]:
    return duckdb.sql(
        f"SELECT run_key, node, attempt, batch_size FROM read_parquet('{results}/{sweep}/runs/**/*.parquet')"
    ).fetchall()


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("CCN_JAX_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_batches_spread_over_nodes_and_a_lost_node_loses_and_duplicates_nothing(cluster, tmp_path):
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    step_sizes = [0.03, 0.02, 0.01, 0.005, 0.003, 0.002, 0.001, 3e-4, 1e-4]
    spec = write_spec(tmp_path, "nodes", steps=200_000, step_sizes=step_sizes)
    results = tmp_path / "results"
    outcome = {}

    def drive():
        outcome["report"] = api.run_sweep(spec, str(results), address=cluster.address, progress=False)

    driver = threading.Thread(target=drive)
    driver.start()
    runs_dir = results / "nodes" / "runs"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.is_alive() and not list(runs_dir.glob("**/*.parquet")):
        time.sleep(0.05)
    time.sleep(0.5)  # every actor is in the middle of its next batch
    lost = workers[0]
    lost_id = lost.node_id
    cluster.remove_node(lost, allow_graceful=False)
    added = cluster.add_node(num_cpus=1)  # the autoscaler's replacement machine
    driver.join(timeout=240)
    assert not driver.is_alive(), "the sweep did not finish after a node was lost"

    report = outcome["report"]
    assert report.ok and report.already_done + report.ran == 18
    found = rows(results, "nodes")
    keys = [key for key, *_ in found]
    assert len(keys) == len(set(keys)) == 18  # every run exactly once
    nodes = {node for _, node, _, _ in found}
    assert len(nodes) >= 2 and None not in nodes  # the batches landed on several nodes
    assert report.preempted >= 1  # the lost node's batch went back to the queue and ran again elsewhere,
    assert {attempt for *_, attempt, _ in found} == {1}  # without using a try (preemption is not failure)
    assert added.node_id in nodes  # the replacement actor joined on the new node and took batches
    assert lost_id in {worker.node_id for worker in workers}


def test_a_gpu_node_gets_merged_gpu_sized_batches_and_a_cpu_node_cpu_sized_ones(cluster, tmp_path):
    cluster.add_node(num_cpus=1, num_gpus=1)  # a fake GPU: Ray schedules it, JAX still runs on the CPU here
    cpu_node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    spec = write_spec(tmp_path, "gpu", steps=50_000, step_sizes=[0.03, 0.01, 0.003, 0.001])
    results = tmp_path / "results"
    report = api.run_sweep(spec, str(results), address=cluster.address, progress=False)
    assert report.ok and report.ran == 8
    found = rows(results, "gpu")
    assert len({key for key, *_ in found}) == 8
    by_node: dict[str, set] = {}
    for _, node, _, size in found:
        by_node.setdefault(node, set()).add(size)
    assert by_node[cpu_node.node_id] == {1}  # planned CPU batches (batch_size = 1)
    [gpu_node] = set(by_node) - {cpu_node.node_id}
    assert max(by_node[gpu_node]) > 1  # the GPU actor merged several planned batches into one
