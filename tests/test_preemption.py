"""Preemption is not failure: a batch whose actor or node is lost goes back to the queue without
using a try, resumes from its checkpoint on the replacement, and is never computed twice.

Real Ray nodes (`ray.cluster_utils.Cluster`: each node a raylet with its own worker processes);
removing a node kills them, as a preempted machine would.
"""

from __future__ import annotations

import os
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import pytest

from orchestrator import api, schedule
from orchestrator.plan import Batch
from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec

SPEC = """
name = "{name}"
steps = {steps}
seeds = [0]
log_every = {every}
checkpoint_every = {every}
max_attempts = 1

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "3:3:inf"
step_size = [0.01]
"""


def write_spec(tmp_path: Path, name: str, steps: int, every: int = 5000) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(SPEC.format(name=name, steps=steps, every=every)))
    return path


def rows(results: Path, sweep: str) -> list[tuple]:
    return duckdb.sql(
        f"SELECT run_key, node, attempt, resumed_from_step FROM read_parquet('{results}/{sweep}/runs/**/*.parquet')"
    ).fetchall()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One head (0 CPUs) for the module; each test adds its own worker nodes and removes them."""
    import ray
    from ray.cluster_utils import Cluster

    saved = {name: os.environ.get(name) for name in ("CCN_JAX_CACHE_DIR", "RAY_ADDRESS")}
    os.environ["CCN_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def worker(cluster):
    """A 1-CPU worker node for one test (removed afterwards, with any the test added), and Ray
    attached to the cluster for the test's direct `run_batches` calls."""
    import ray

    before = set(cluster.worker_nodes)
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield node
    ray.shutdown()
    for added in set(cluster.worker_nodes) - before:
        cluster.remove_node(added)


def attach(cluster) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=cluster.address, log_to_driver=False)


def test_a_batch_whose_node_is_killed_three_times_completes_once_without_using_a_try(cluster, worker, tmp_path):
    node = worker
    # long enough that an idle core (a few 100k steps/s) cannot finish it between a replacement's
    # first checkpoint and the next kill: three kills cost well under half of it
    spec = write_spec(tmp_path, "preempted", steps=1_000_000, every=20_000)
    results = tmp_path / "results"
    outcome = {}

    def drive():
        outcome["report"] = api.run_sweep(spec, str(results), address=cluster.address, progress=False)

    driver = threading.Thread(target=drive)
    driver.start()
    checkpoints = results / "preempted" / "checkpoints"
    killed = []
    begun = time.monotonic()
    for _ in range(3):  # kill the node under the batch once it has checkpointed on that node
        since = time.time()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.is_alive():
            saved = [path.stat().st_mtime for path in checkpoints.glob("*.ckpt")]
            if saved and max(saved) > since:
                break
            time.sleep(0.05)
        assert driver.is_alive(), "the batch finished before its node was killed three times; make it longer"
        assert time.monotonic() < deadline, "the batch did not checkpoint on its node"
        killed.append(node.node_id)
        print(f"killing node {len(killed)} after {time.monotonic() - begun:.1f}s")
        cluster.remove_node(node, allow_graceful=False)
        node = cluster.add_node(num_cpus=1)  # the autoscaler's replacement machine
    driver.join(timeout=180)
    assert not driver.is_alive(), "the sweep did not finish after its node was killed three times"

    report = outcome["report"]
    assert report.ok and report.ran == 1 and report.failed == 0
    assert report.preempted == 3  # three free retries, none counted against max_attempts = 1
    [(run_key, ran_on, attempt, resumed)] = rows(results, "preempted")  # exactly once
    assert run_key == load_spec(spec).runs[0].run_key
    assert attempt == 1
    assert ran_on == node.node_id and ran_on not in killed  # finished on the last replacement
    assert resumed and resumed >= 20_000  # resumed from the checkpoint the killed node left
    assert not ResultsStore(str(results), "preempted").failures()
    assert cluster.head_node.node_ip_address == node.node_ip_address == "127.0.0.1"


def test_an_actor_lost_after_writing_its_batch_is_not_recomputed(cluster, worker, tmp_path):
    attach(cluster)

    class DiesAfterWriting(schedule.BatchWorker):  # defined here: Ray ships it by value, its base by name
        """Writes the batch, then its process dies before the reply (once per results root)."""

        def run_batch(self, batch, attempt):
            summary = super().run_batch(batch, attempt)
            marker = os.path.join(self.store.root, "died-once")
            if not os.path.exists(marker):
                with open(marker, "w") as handle:
                    handle.write(str(os.getpid()))
                os._exit(1)
            return summary

    spec = write_spec(tmp_path, "written", steps=5000)
    batch = Batch(sweep="written", runs=load_spec(spec).runs, padded_size=1)
    results = tmp_path / "results"
    outcome = schedule.run_batches(
        [batch], str(results), "written", workers=1, max_attempts=1, compilation_cache_dir=None,
        worker_class=DiesAfterWriting,
    )  # fmt: skip
    assert not outcome.failed_batches and outcome.batches_done == 1
    assert outcome.preempted == 1 and outcome.already_written == 1  # the second actor found the file
    files = list((results / "written" / "runs").rglob("*.parquet"))
    assert len(files) == 1
    first_writer = int((results / "died-once").read_text())
    assert first_writer not in {pid for _, pid in outcome.actor_compute_seconds}  # the dead actor never replied
    assert outcome.actor_compute_seconds and max(outcome.actor_compute_seconds.values()) == 0.0  # no compute


def test_a_batch_that_keeps_killing_its_actor_fails_after_the_preemption_bound(cluster, worker, tmp_path):
    attach(cluster)

    class Suicidal(schedule.BatchWorker):
        def run_batch(self, batch, attempt):
            os._exit(1)

    spec = write_spec(tmp_path, "suicidal", steps=5000)
    batch = Batch(sweep="suicidal", runs=load_spec(spec).runs, padded_size=1)
    results = tmp_path / "results"
    outcome = schedule.run_batches(
        [batch], str(results), "suicidal", workers=1, max_attempts=1, compilation_cache_dir=None,
        worker_class=Suicidal, max_preemptions=2,
    )  # fmt: skip
    [failure] = outcome.failed_batches
    assert outcome.preempted == 3 and "its actor was lost 3 times" in failure["error"]
    [record] = ResultsStore(str(results), "suicidal").failures()
    assert record["attempts"] == 1


def test_a_failure_that_cannot_be_recorded_warns_and_the_sweep_goes_on(cluster, worker, tmp_path, monkeypatch, capsys):
    attach(cluster)

    class Raising(schedule.BatchWorker):
        def run_batch(self, batch, attempt):
            raise ValueError("the batch's own bug")

    def unwritable(self, *arguments):
        raise PermissionError("results are read-only")

    monkeypatch.setattr(ResultsStore, "record_failure", unwritable)
    spec = write_spec(tmp_path, "unrecorded", steps=5000)
    runs = load_spec(spec).runs
    batches = [Batch(sweep="unrecorded", runs=runs, padded_size=1)] * 2
    outcome = schedule.run_batches(
        batches, str(tmp_path / "results"), "unrecorded", workers=1, max_attempts=1, compilation_cache_dir=None,
        worker_class=Raising,
    )  # fmt: skip
    assert len(outcome.failed_batches) == 2 and not outcome.stopped
    assert "could not record the failure of batch" in capsys.readouterr().err
