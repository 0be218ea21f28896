"""S3 for real: a sweep with `--results s3://bucket/prefix` on moto's S3 server (127.0.0.1 only).

The server is a subprocess on a free loopback port (stopped by its pid); credentials are fake,
the endpoint comes from $AWS_ENDPOINT_URL and the EC2 metadata lookup is off, so no request
leaves 127.0.0.1. The driver is SIGKILLed mid-sweep, a new one resumes (the dead driver's lease
is taken over), then `ccn status`, `ccn report` and a DuckDB query read the same S3 results.
The lease on S3 is a conditional put (If-None-Match / If-Match); the fallback for stores
without conditional writes is tested on the same server through pyarrow alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import duckdb
import pyarrow.dataset as ds
import pytest

from orchestrator import lease as lease_module
from orchestrator.lease import Lease, LeaseHeld
from orchestrator.results import ResultsStore, open_filesystem
from orchestrator.spec import load_spec

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

BUCKET = "ccn-test"
SPEC = """
name = "s3"
steps = 6000
seeds = [0, 1, 2]
log_every = 1000
batch_size = 1

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:500"
step_size = [0.01, 0.003]
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 and the environment that points every client at it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    settings = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto's server did not start"
                time.sleep(0.1)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def ray_address(s3_endpoint, tmp_path_factory):
    """A local Ray started after the S3 settings, so its workers write to the same endpoint."""
    import ray

    os.environ["CCN_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    os.environ.pop("CCN_JAX_CACHE_DIR", None)


def keys(prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def ccn(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"},
    )


@pytest.mark.timeout(600)  # four `ccn` processes; ~1-2 minutes on a busy 2-core machine
def test_a_sweep_on_s3_survives_a_killed_driver_and_is_read_by_status_report_and_duckdb(ray_address, tmp_path):
    spec = tmp_path / "s3.toml"
    spec.write_text(textwrap.dedent(SPEC))
    total = len(load_spec(spec).runs)
    results = f"s3://{BUCKET}/sweeps"
    run = ["run", str(spec), "--results", results, "--address", ray_address, "--quiet"]

    driver = ccn(*run)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            if [k for k in keys("sweeps/s3/runs/") if k.endswith(".parquet")]:
                break
            time.sleep(0.1)
        if driver.poll() is not None:
            pytest.fail(f"the driver ended before it was killed: {driver.communicate()}")
        assert "sweeps/s3/_driver" in keys("sweeps/s3/")  # the lease, taken with a conditional put
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.kill()
        driver.communicate()
    done_before = len([k for k in keys("sweeps/s3/runs/") if k.endswith(".parquet")])
    assert 0 < done_before < total, "the driver was not killed mid-sweep; make the runs longer"

    time.sleep(1)  # let Ray reclaim the dead driver's actors
    resume = ccn(*run)
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, out + err
    assert "took over the lease" in err and f"{total - done_before} ran now" in out, out + err
    assert "sweeps/s3/_driver" not in keys("sweeps/s3/")  # released

    status = ccn("status", str(spec), "--results", results)
    out, err = status.communicate(timeout=120)
    assert status.returncode == 0 and f"{total} done" in out and "0 missing" in out, out + err

    report = ccn("report", results, "--sweep", "s3", "--out", str(tmp_path / "report"))
    out, err = report.communicate(timeout=300)
    assert report.returncode == 0, out + err
    assert (tmp_path / "report" / "report.md").exists()

    # DuckDB on the same S3 objects, through pyarrow's S3 client (docs/results-schema.md)
    filesystem, base = open_filesystem(results)
    runs = ds.dataset(f"{base}/s3/runs", filesystem=filesystem, format="parquet", partitioning="hive")  # noqa: F841
    metrics = ds.dataset(f"{base}/s3/metrics", filesystem=filesystem, format="parquet", partitioning="hive")  # noqa: F841
    [(rows, distinct)] = duckdb.sql("SELECT count(*), count(DISTINCT run_key) FROM runs").fetchall()
    assert rows == distinct == total  # 0 duplicated, 0 lost
    [(points, distinct_points)] = duckdb.sql(
        "SELECT count(*), count(DISTINCT (run_key, step)) FROM metrics WHERE run_key IN (SELECT run_key FROM runs)"
    ).fetchall()
    assert points == distinct_points == total * 6


def test_the_s3_lease_is_a_conditional_put(s3_endpoint):
    store = ResultsStore(f"s3://{BUCKET}/leases", "conditional")
    first = Lease(store, expiry=1.0).acquire()
    assert first.backend.kind == "S3 conditional put"
    with pytest.raises(LeaseHeld, match="another driver runs this sweep"):
        Lease(store, expiry=1.0).acquire()
    # a holder on another machine that stopped its heartbeat: takeover only after the expiry
    with pytest.raises(LeaseHeld, match="--takeover is allowed once"):
        Lease(store, expiry=1.0).acquire(takeover=True)
    # make it look like another machine's driver, then let it expire
    client = boto3.client("s3")
    holder = lease_module.Holder(**{**first.holder.__dict__, "machine": "another-machine"})
    client.put_object(Bucket=BUCKET, Key="leases/conditional/_driver", Body=holder.encode())
    time.sleep(1.2)
    second = Lease(store, expiry=5.0).acquire(takeover=True)
    assert second.current().token == second.holder.token
    with pytest.raises(lease_module.LeaseLost):  # the first driver notices it lost the lease
        first.version = client.head_object(Bucket=BUCKET, Key="leases/conditional/_driver")["ETag"] + "x"
        first.refresh()
    second.release()
    assert "leases/conditional/_driver" not in keys("leases/conditional/")


def test_without_conditional_writes_the_fallback_settles_and_reads_back(s3_endpoint, monkeypatch):
    monkeypatch.setenv(lease_module.SETTLE_ENV, "0.2")
    store = ResultsStore(f"s3://{BUCKET}/leases", "fallback")
    monkeypatch.setattr(lease_module, "_s3_client", lambda root: (_ for _ in ()).throw(ImportError("no boto3")))
    first = Lease(store, expiry=30).acquire()
    assert first.backend.kind.startswith("write, settle and read back")
    with pytest.raises(LeaseHeld):
        Lease(store, expiry=30).acquire()
    first.keep_alive()
    first.refresh()
    first.release()
    assert "leases/fallback/_driver" not in keys("leases/fallback/")


def test_a_damaged_object_is_set_aside_on_s3_too(s3_endpoint, capsys):
    store = ResultsStore(f"s3://{BUCKET}/damaged", "d")
    path = store.batch_path("runs", "ccn", "t", "abc")
    client = boto3.client("s3")
    client.put_object(Bucket=BUCKET, Key=path.split("/", 1)[1], Body=b"")  # a killed writer's empty object
    assert store.completed_runs() == {}
    [warning] = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"ccn: warning: {path} cannot be read") and "_corrupt" in warning
    objects = [key for key in keys("damaged/d/") if not key.endswith("/")]  # not pyarrow's folder markers
    assert objects == ["damaged/d/_corrupt/runs/learner=ccn/task=t/abc.parquet.corrupt"]
