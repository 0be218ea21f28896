"""Every single-machine Ray the project starts registers and listens on 127.0.0.1 only, and the
embedded Ray of `ccn run` is always a Ray of its own.

Ray on Linux turns 127.0.0.1 into the machine's network address unless the processes have
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (cluster.loopback); these tests look at what the processes
the project started actually do: the node addresses Ray registered and the sockets they listen on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from cluster import local, loopback
from orchestrator import schedule


def listening(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket and bound UDP socket of `pids`."""
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            name = process.name()
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for connection in connections:
            bound_udp = connection.type == 2 and connection.laddr  # SOCK_DGRAM
            if connection.status == psutil.CONN_LISTEN or bound_udp:
                found.append((pid, name, connection.laddr.ip, connection.laddr.port))
    return found


def beyond_loopback(sockets: list[tuple[int, str, str, int]]) -> list[tuple[int, str, str, int]]:
    return [socket for socket in sockets if not loopback.is_loopback(socket[2])]


def test_loopback_addresses_are_recognised():
    assert loopback.is_loopback("127.0.0.1") and loopback.is_loopback("127.3.2.1") and loopback.is_loopback("::1")
    assert loopback.is_loopback("::ffff:127.0.0.1") and not loopback.is_loopback("::ffff:10.0.0.5")
    assert loopback.is_loopback("localhost") and not loopback.is_loopback("10.0.0.5")
    assert not loopback.is_loopback("0.0.0.0") and not loopback.is_loopback("") and not loopback.is_loopback(None)
    assert loopback.address_is_loopback("127.0.0.1:6379") and loopback.address_is_loopback("ray://localhost:10001")
    assert not loopback.address_is_loopback("10.0.0.5:6379") and not loopback.address_is_loopback("auto")


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """A `ccn cluster up` cluster (head + 1 worker node, separate processes), stopped by its own `down`."""
    folder = tmp_path_factory.mktemp("loopback")
    state = folder / "cluster.json"
    cluster = local.up(workers=1, cpus_per_node=1, state=state, temp_dir=folder / "ray")
    try:
        yield cluster
    finally:
        local.down(state)


def probe_nodes(address: str, auth_env: dict[str, str]) -> list[str]:
    """The addresses the cluster's live nodes registered at, asked the way `ccn run --address` attaches."""
    code = (
        "import json, ray\n"
        "from orchestrator.schedule import connect\n"
        f"connect({address!r}, None)\n"
        "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))\n"
    )
    # a user's shell: none of this suite's Ray settings (`ccn` must add what it needs itself)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(auth_env)  # the cluster's auth mode (and token file)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cluster_up_registers_and_listens_on_loopback_only(local_cluster):
    assert local_cluster.address.startswith("127.0.0.1:")
    assert probe_nodes(local_cluster.address, local_cluster.auth_env()) == ["127.0.0.1", "127.0.0.1"]
    pids = [pid for node in local_cluster.nodes for pid, _ in local._tree(node.pid)]
    sockets = listening(pids)
    assert len(sockets) >= 6, sockets  # GCS, raylets, object managers, agents, dashboard: really looked at
    assert beyond_loopback(sockets) == [], beyond_loopback(sockets)


def test_embedded_ray_is_its_own_and_on_loopback_only(local_cluster, monkeypatch):
    import ray
    from ray._private import ray_constants

    # as in a user's process: Ray's default (this suite's conftest turned loopback on); connect must do it
    monkeypatch.delenv(loopback.ENV_VAR, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    # a cluster `ray start` left running, named by $RAY_ADDRESS: the embedded start must not attach to it
    monkeypatch.setenv("RAY_ADDRESS", local_cluster.address)
    assert not ray.is_initialized()
    assert schedule.connect(None, 1) is True
    try:

        @ray.remote(num_cpus=1)
        class Probe:
            def pid(self) -> int:
                return os.getpid()

        actor = Probe.remote()
        actor_pid = ray.get(actor.pid.remote())
        nodes = [node for node in ray.nodes() if node["Alive"]]
        assert [node["NodeManagerAddress"] for node in nodes] == ["127.0.0.1"]  # one node: its own
        gcs = ray.get_runtime_context().gcs_address
        assert gcs.startswith("127.0.0.1:") and gcs != local_cluster.address

        pids = [os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))]
        assert actor_pid in pids
        own = set(pids) - {pid for node in local_cluster.nodes for pid, _ in local._tree(node.pid)}
        sockets = listening(sorted(own))
        assert len(sockets) >= 4, sockets
        assert beyond_loopback(sockets) == [], beyond_loopback(sockets)
    finally:
        ray.shutdown()
