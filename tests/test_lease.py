"""One driver per sweep: the lease `<results>/<sweep>/_driver` (orchestrator.lease).

In-process: exclusive creation, refusal naming the holder, takeover only after the expiry,
heartbeats, release. As subprocesses on one local Ray: two `ccn run` of one sweep started
together (one refuses at once, the other completes: nothing lost, nothing duplicated), then the
holder SIGKILLed mid-sweep and the sweep finished by a new driver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from orchestrator import api
from orchestrator.lease import Holder, Lease, LeaseHeld, LeaseLost
from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec

SPEC = """
name = "lease"
steps = 10000
seeds = [0, 1, 2, 3]
log_every = 1000
batch_size = 1

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:500"
step_size = [0.01, 0.003]
"""


def foreign_lease(store: ResultsStore, heartbeat_age: float, expiry: float = 2.0) -> Path:
    """A lease held by a driver on another machine (its pid cannot be checked from here)."""
    now = time.time()
    path = Path(store.base) / "_driver"
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Holder("elsewhere", 4242, now - 100, now - heartbeat_age, expiry, "theirs", "another-machine")
    path.write_bytes(holder.encode())
    return path


def test_the_lease_is_exclusive_and_released(tmp_path):
    store = ResultsStore(str(tmp_path), "s")
    first = Lease(store, expiry=30).acquire()
    holder = json.loads((tmp_path / "s" / "_driver").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["heartbeat"] <= time.time()
    with pytest.raises(LeaseHeld) as refused:
        Lease(store, expiry=30, retry_hint="ccn run x.toml --takeover").acquire()
    assert f"pid {os.getpid()}" in str(refused.value) and "ccn run x.toml --takeover" in str(refused.value)
    with pytest.raises(LeaseHeld):  # a live holder of this machine: no takeover, whatever the age
        Lease(store, expiry=30).acquire(takeover=True)
    first.release()
    assert not (tmp_path / "s" / "_driver").exists()
    Lease(store, expiry=30).acquire().release()


def test_release_deletes_a_lease_that_a_ctrl_c_stopped_acquire_from_confirming(tmp_path, monkeypatch):
    store = ResultsStore(str(tmp_path), "s")
    lease_file = tmp_path / "s" / "_driver"
    interrupted = Lease(store, expiry=30)

    def ctrl_c(holder):
        raise KeyboardInterrupt

    monkeypatch.setattr(interrupted, "_held", ctrl_c)  # the Ctrl-C lands right after the lease was written
    with pytest.raises(KeyboardInterrupt):
        interrupted.acquire()
    assert lease_file.exists() and interrupted.holder is None
    interrupted.release()
    assert not lease_file.exists()
    interrupted.release()  # safe to repeat

    other = Lease(store, expiry=30).acquire()  # a failed acquire's release leaves the holder's lease alone
    refused = Lease(store, expiry=30)
    with pytest.raises(LeaseHeld):
        refused.acquire()
    refused.release()
    assert json.loads(lease_file.read_text())["token"] == other.holder.token
    other.release()
    assert not lease_file.exists()


def test_takeover_is_allowed_only_after_the_expiry(tmp_path):
    store = ResultsStore(str(tmp_path), "s")
    foreign_lease(store, heartbeat_age=0.5, expiry=2.0)
    with pytest.raises(LeaseHeld, match="host elsewhere pid 4242"):
        Lease(store).acquire()
    with pytest.raises(LeaseHeld, match="older than 2s"):
        Lease(store).acquire(takeover=True)
    foreign_lease(store, heartbeat_age=3.0, expiry=2.0)
    with pytest.raises(LeaseHeld):  # expired, but taking over needs --takeover
        Lease(store).acquire()
    lease = Lease(store, expiry=5).acquire(takeover=True)
    assert lease.current().pid == os.getpid()
    lease.release()


def test_a_dead_driver_of_this_machine_is_taken_over_at_once(tmp_path):
    store = ResultsStore(str(tmp_path), "s")
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from orchestrator.lease import Lease; from orchestrator.results import "
         f"ResultsStore; Lease(ResultsStore({str(tmp_path)!r}, 's'), expiry=600).acquire(); print('held', flush=True);"
         " sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeld, match=f"pid {child.pid}"):
        Lease(store).acquire()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    Lease(store).acquire().release()  # no --takeover, no waiting: its pid is gone


def test_heartbeats_refresh_the_lease_and_a_takeover_is_noticed(tmp_path):
    store = ResultsStore(str(tmp_path), "s")
    lease = Lease(store, expiry=0.8).acquire()
    lease.keep_alive()
    first = lease.current().heartbeat
    time.sleep(0.6)
    assert lease.current().heartbeat > first and lease.lost is None
    path = tmp_path / "s" / "_driver"
    stolen = json.loads(path.read_text()) | {"token": "someone-else", "pid": 1}
    path.write_text(json.dumps(stolen))
    time.sleep(0.5)
    assert lease.lost and "taken over" in lease.lost
    lease.release()
    assert path.exists()  # not ours any more: left alone
    with pytest.raises(LeaseLost):
        lease.refresh()


def test_a_driver_refuses_before_touching_anything(tmp_path):
    spec = tmp_path / "lease.toml"
    spec.write_text(textwrap.dedent(SPEC))
    store = ResultsStore(str(tmp_path / "results"), "lease")
    orphan = Path(store.batch_path("metrics", "ccn", "t", "abc"))
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"in flight")  # another driver's metrics file, its runs file not yet written
    foreign_lease(store, heartbeat_age=0.0, expiry=60)
    with pytest.raises(LeaseHeld):
        api.run_sweep(spec, str(tmp_path / "results"), progress=False)
    assert orphan.exists()  # clean-up did not run


# -- two drivers as subprocesses on one Ray ----------------------------------------------------


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    import ray

    os.environ["CCN_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    os.environ.pop("CCN_JAX_CACHE_DIR", None)


def ccn_run(spec: Path, results: Path, address: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", str(results), "--address", address,
         "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"},
    )


def exactly_once(results: Path, total: int, steps_logged: int) -> None:
    runs = duckdb.sql(f"SELECT run_key FROM read_parquet('{results}/lease/runs/**/*.parquet')").fetchall()
    assert len(runs) == len(set(runs)) == total  # 0 duplicated rows, 0 missing runs
    metrics = f"read_parquet('{results}/lease/metrics/**/*.parquet')"
    count, distinct, keys = duckdb.sql(
        f"SELECT count(*), count(DISTINCT (run_key, step)), count(DISTINCT run_key) FROM {metrics}"
    ).fetchall()[0]
    assert count == distinct == total * steps_logged and keys == total  # 0 lost metrics files
    names = lambda table: sorted(p.name for p in (results / "lease" / table).glob("**/*.parquet"))  # noqa: E731
    assert names("runs") == names("metrics")


@pytest.mark.timeout(600)  # three `ccn run` processes; ~1-2 minutes on a busy 2-core machine
def test_two_drivers_one_refuses_then_the_killed_holder_is_taken_over(ray_address, tmp_path):
    spec = tmp_path / "lease.toml"
    spec.write_text(textwrap.dedent(SPEC))
    total = len(load_spec(spec).runs)
    results = tmp_path / "results"
    first, second = ccn_run(spec, results, ray_address), ccn_run(spec, results, ray_address)
    runs_dir = results / "lease" / "runs"
    try:
        deadline = time.monotonic() + 120
        loser = None
        while time.monotonic() < deadline and loser is None:
            loser = next((p for p in (first, second) if p.poll() is not None), None)
            time.sleep(0.05)
        assert loser is not None, "neither driver refused"
        holder = second if loser is first else first
        out, err = loser.communicate()
        assert loser.returncode == 1 and "another driver runs this sweep" in err and f"pid {holder.pid}" in err
        assert "--takeover" in err and len(err.strip().splitlines()) == 1, err

        while time.monotonic() < deadline and holder.poll() is None and len(list(runs_dir.glob("**/*.parquet"))) < 2:
            time.sleep(0.05)
        os.kill(holder.pid, signal.SIGKILL)  # the holder dies mid-sweep, its lease left behind
        holder.wait()
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
                process.wait()
    done_before = len(list(runs_dir.glob("**/*.parquet")))
    assert 0 < done_before < total, "the holder was not killed mid-sweep; make the runs longer"
    lease = json.loads((results / "lease" / "_driver").read_text())
    assert lease["pid"] == holder.pid

    time.sleep(1)  # let Ray reclaim the dead driver's actors
    finisher = ccn_run(spec, results, ray_address)  # the dead holder was on this machine: taken over at once
    out, err = finisher.communicate(timeout=240)
    assert finisher.returncode == 0, out + err
    assert f"took over the lease {results}/lease/_driver from the dead driver host" in err
    assert not (results / "lease" / "_driver").exists()  # released at the end
    exactly_once(results, total, steps_logged=10)
