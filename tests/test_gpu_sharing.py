"""GPUs shared by actors (`--actors-per-gpu K`): fractional `num_gpus` and a memory share each.

On CPU with a fake GPU: a `ray.cluster_utils.Cluster` node declaring one GPU (Ray schedules it;
JAX in the actors still runs on the CPU, since no actor forces JAX_PLATFORMS=cuda).
"""

from __future__ import annotations

import json
import textwrap
import time

import pyarrow.parquet as pq
import pytest

from cluster import submit
from orchestrator import api, cli, schedule
from orchestrator.spec import load_spec

SPEC = """
name = "gpu-share"
steps = 2000
seeds = [0, 1]
log_every = 1000

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:500"
step_size = [0.01]

[[learners]]
kind = "ccn"
shape = "3:3:inf"
step_size = [0.01]
"""


def test_actor_options_split_the_gpu_and_its_memory_and_the_flag_is_forwarded(tmp_path):
    assert schedule.gpu_actor_options(1) == {
        "num_gpus": 1, "runtime_env": {"env_vars": {schedule.MEM_FRACTION_ENV: "0.90"}}
    }  # fmt: skip
    two, three = schedule.gpu_actor_options(2), schedule.gpu_actor_options(3)
    assert two["num_gpus"] == 0.5 and two["runtime_env"]["env_vars"] == {"XLA_CLIENT_MEM_FRACTION": "0.45"}
    assert 3 * three["num_gpus"] <= 1 and three["runtime_env"]["env_vars"]["XLA_CLIENT_MEM_FRACTION"] == "0.30"
    assert schedule.Workers(cpu=0, gpu=4, per_gpu=2).gpu_batch_limit == 2048  # k actors of a GPU fit
    assert schedule.DEFAULT_ACTORS_PER_GPU == 2
    for bad in (0, -1, 2.5, 65, True):
        with pytest.raises(ValueError, match="actors_per_gpu must be an integer"):
            schedule.gpu_actor_options(bad)
    # `ccn run --actors-per-gpu K`, and `ccn submit` passes it on to the job's `ccn run`
    assert cli.build_parser().parse_args(["run", "x.toml", "--actors-per-gpu", "3"]).actors_per_gpu == 3
    arguments = cli.build_parser().parse_args(["submit", "x.toml", "--results", "/r", "--actors-per-gpu", "4"])
    driver = {name: getattr(arguments, name) for name in submit.DRIVER_OPTIONS}
    assert "--actors-per-gpu 4" in submit.build_entrypoint("x.toml", "/r", **driver)
    # a bad value is refused before anything is touched
    spec = tmp_path / "sweep.toml"
    spec.write_text(textwrap.dedent(SPEC))
    with pytest.raises(ValueError, match="actors_per_gpu"):
        api.run_sweep(spec, str(tmp_path / "results"), actors_per_gpu=0, progress=False)
    assert not (tmp_path / "results").exists()


@pytest.fixture
def fake_gpu_node(tmp_path, monkeypatch):
    """A one-node cluster: 2 CPUs and one fake GPU."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("CCN_JAX_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False}
    )
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_actors_share_one_gpu_and_run_batches_of_two_programs_at_once(fake_gpu_node, tmp_path, monkeypatch):
    """k = 2 on one fake GPU: two GPU actors placed on it at the same time, each holding half of it
    (Ray's assigned resources) and JAX's memory share in its environment; each runs a batch of its
    own program while the other runs; every run completes exactly once."""
    seen = tmp_path / "seen"
    seen.mkdir()
    folder = str(seen)

    class Probe(schedule.BatchWorker):  # defined here: Ray ships it by value, its base by name
        def run_batch(self, batch, attempt):
            import os

            import ray

            context = ray.get_runtime_context()
            record = {
                "pid": os.getpid(),
                "node": context.get_node_id(),
                "resources": context.get_assigned_resources(),
                "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
                "fraction": os.environ.get("XLA_CLIENT_MEM_FRACTION"),
                "signature": repr(batch.signature),
                "started": time.time(),
            }
            path = os.path.join(folder, f"{os.getpid()}-{batch.batch_key}.json")
            with open(path, "w") as handle:
                json.dump(record, handle)
            deadline = time.monotonic() + 90  # the other actor starts its batch while this one holds its own
            while time.monotonic() < deadline:
                if any(not name.startswith(f"{os.getpid()}-") for name in os.listdir(folder)):
                    record["saw_other"] = True
                    break
                time.sleep(0.1)
            summary = super().run_batch(batch, attempt)
            record["finished"] = time.time()
            with open(path, "w") as handle:
                json.dump(record, handle)
            return summary

    monkeypatch.setattr(schedule, "BatchWorker", Probe)
    spec = tmp_path / "sweep.toml"
    spec.write_text(textwrap.dedent(SPEC))
    results = tmp_path / "results"
    report = api.run_sweep(spec, str(results), address=fake_gpu_node.address, actors_per_gpu=2, progress=False)
    assert report.ok and report.ran == 4 and report.workers == 2

    records = [json.loads(path.read_text()) for path in seen.glob("*.json")]
    assert len(records) == 2 and len({r["pid"] for r in records}) == 2  # two actors, one batch each
    assert len({r["signature"] for r in records}) == 2  # batches of two programs
    assert {r["node"] for r in records} == {fake_gpu_node.head_node.node_id}
    assert all(r["resources"].get("GPU") == 0.5 for r in records)  # half of the one GPU each
    assert records[0]["gpu_ids"] == records[1]["gpu_ids"] and len(records[0]["gpu_ids"]) == 1  # the same GPU
    assert {r["fraction"] for r in records} == {"0.45"}
    assert all(r.get("saw_other") for r in records)  # at the same time
    first, second = sorted(records, key=lambda r: r["started"])
    assert second["started"] < first["finished"]

    files = sorted((results / "gpu-share" / "runs").rglob("*.parquet"))
    runs = [row for path in files for row in pq.read_table(path, columns=["run_key", "status"]).to_pylist()]
    assert len(files) == 2 and {row["status"] for row in runs} == {"complete"}
    assert sorted(row["run_key"] for row in runs) == sorted(run.run_key for run in load_spec(spec).runs)  # once each
