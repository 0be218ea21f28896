"""A real multi-node Ray cluster on this machine: a head and N worker nodes on 127.0.0.1.

    state = up(workers=2, cpus_per_node=1)       # prints nothing; state.address is HOST:PORT
                                                 # state.dashboard is http://127.0.0.1:PORT
    ccn run SPEC --address <state.address>
    down()                                       # stops exactly the processes `up` started

Each node is one `ray start --block` process (through `cluster.loopback`, so that it registers and
listens on 127.0.0.1 only) in its own session (process group); everything Ray starts for the node
(GCS, raylet, agents, workers) descends from it. The head declares 0 CPUs,
so a sweep's actors run on the worker nodes, each with `cpus_per_node` CPUs and a resource
`ccn_node_<i>` naming it. The head runs Ray's dashboard (and with it the Jobs API that `ccn
submit` talks to) on http://127.0.0.1:<free port>. Every port Ray would otherwise take at a fixed
default (the GCS's 6379, the dashboard's 8265, the Ray client server's 10001, each node's dashboard
agent's 52365) is a port found free when `up` starts, so the cluster does not collide with another
Ray on the machine (Ray picks its other ports itself). What was started (address, dashboard URL,
each node's pid and process tree with start times) is saved in a JSON state file (default
`.ccn/cluster.json`, or $CCN_CLUSTER_STATE), and `down` stops those processes only: other Ray
instances on the machine are left alone, and a pid reused since is recognised by its start time.

Ray's token authentication is on (`auth=True`, the default): `up` writes a random token to a file
of mode 0600 beside the state file (`.ccn/cluster.token`) and starts every node with
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH naming it, so only processes that can read the file (its
owner's) can attach, submit jobs or use the dashboard. `ccn run --address` and `ccn submit` find the
token of the recorded cluster they are given (`client_env`, `recorded_for`); other clients export
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<that file>. `up(auth=False)` (`ccn cluster up
--no-auth`) is the explicit opt-out: RAY_AUTH_MODE=disabled, anyone on the machine can attach.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.loopback import LOOPBACK_ENV

HOST = "127.0.0.1"
STATE_ENV = "CCN_CLUSTER_STATE"
DEFAULT_STATE = ".ccn/cluster.json"
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # per node; small, for laptops and tests
START_TIMEOUT = 90.0
START_ATTEMPTS = 3  # tries per worker node
STARTED_LINE = "Ray runtime started"


class ClusterStateError(RuntimeError):
    """A cluster is already recorded as up, or none is (a message for people)."""


@dataclass
class Node:
    role: str  # head | worker
    pid: int  # the `ray start --block` process; its process group is the node's
    log: str
    processes: list[tuple[int, float]] = field(default_factory=list)  # (pid, start time) of its tree


@dataclass
class LocalCluster:
    address: str
    workers: int
    cpus_per_node: int
    temp_dir: str  # Ray's session folder (removed by down)
    nodes: list[Node]
    dashboard: str = ""  # http://127.0.0.1:PORT: the dashboard and the Jobs API (`ccn submit --address`)
    token_file: str = ""  # Ray's auth token (mode 0600); "" when the cluster runs without token auth

    def auth_env(self) -> dict[str, str]:
        """The environment a process needs to attach to this cluster (Ray's auth settings)."""
        if self.token_file:
            return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_file}
        return {"RAY_AUTH_MODE": "disabled"}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LocalCluster:
        data = json.loads(Path(path).read_text())
        nodes = [Node(**{**node, "processes": [tuple(p) for p in node["processes"]]}) for node in data.pop("nodes")]
        return cls(**data, nodes=nodes)

    def recorded_processes(self) -> list[tuple[int, float]]:
        return [process for node in self.nodes for process in node.processes]


def state_path(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get(STATE_ENV) or DEFAULT_STATE).absolute()


def recorded_for(address: str, state: str | Path | None = None) -> LocalCluster | None:
    """The recorded local cluster whose GCS address or dashboard URL this is, else None."""
    try:
        cluster = status(state)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if cluster is None:
        return None
    wanted = address.strip().rstrip("/").removeprefix("ray://")
    bare = wanted.split("://", 1)[-1]
    dashboard = cluster.dashboard.split("://", 1)[-1]
    return cluster if bare in (cluster.address, dashboard) else None


def client_env(address: str | None, state: str | Path | None = None) -> dict[str, str]:
    """What `ccn run --address` / `ccn submit` add to their environment to attach to a recorded local
    cluster (its auth mode and token file); {} for any other address."""
    cluster = recorded_for(address, state) if address else None
    return cluster.auth_env() if cluster is not None else {}


def use_recorded_auth(address: str | None, state: str | Path | None = None) -> bool:
    """Put the auth settings of the recorded local cluster at `address` into this process's
    environment, before Ray starts here (Ray fixes a process's auth mode at its first ray.init).
    An auth mode already chosen here is kept (only the token file is added when it is `token`).
    Returns whether anything was set."""
    wanted = client_env(address, state)
    mode = os.environ.get("RAY_AUTH_MODE")
    if not wanted or (mode is not None and mode.lower() != wanted["RAY_AUTH_MODE"]):
        return False
    os.environ.update(wanted)
    if "RAY_AUTH_TOKEN_PATH" in wanted:
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the cluster's token file
    return True


def _write_token(path: Path) -> None:
    """A new random token in a file only its owner can read (a stale one is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _stat(pid: int) -> tuple[int, float, str] | None:
    """(parent pid, start time in clock ticks since boot, state) from /proc, or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), float(fields[19]), fields[0]


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[0], []).append(int(entry))
    return children


def _tree(pid: int) -> list[tuple[int, float]]:
    """(pid, start time) of a process and all its descendants (empty when it is gone)."""
    children = _children()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        stat = _stat(current)
        if stat is None:
            continue
        tree.append((current, stat[1]))
        todo.extend(children.get(current, []))
    return tree


def _alive(pid: int, started: float) -> bool:
    """Whether that very process (same pid and start time) still runs (zombies count as gone)."""
    stat = _stat(pid)
    return stat is not None and stat[1] == started and stat[2] != "Z"


def _start_node(arguments: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "cluster.loopback", "start", "--block", *arguments],  # `ray start` on 127.0.0.1
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: Ctrl-C in this terminal does not reach it
            env=env,
        )


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Ray head exited with code {process.returncode}; see {log}")
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the Ray head did not open {HOST}:{port} within {timeout:.0f}s; see {log}")


def _wait_started(process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until `ray start` reports the node started (in its log); RuntimeError if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if STARTED_LINE in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"a Ray node exited with code {process.returncode}; see {log}")
        time.sleep(0.2)
    raise RuntimeError(f"a Ray node did not start within {timeout:.0f}s; see {log}")


def _wait_for_nodes(
    address: str, count: int, nodes: list[tuple[subprocess.Popen, Path]], timeout: float, auth: dict[str, str]
) -> None:
    """Until `count` nodes are alive in the cluster (asked from a short-lived subprocess)."""
    probe = (
        "import ray, sys\n"
        f"ray.init(address={address!r}, log_to_driver=False, configure_logging=False)\n"
        "print(sum(n['Alive'] for n in ray.nodes()))\n"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process, log in nodes:
            if process.poll() is not None:
                raise RuntimeError(f"a Ray node exited with code {process.returncode}; see {log}")
        result = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={
                **{key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")},
                **LOOPBACK_ENV,
                **auth,
            },
        )
        lines = result.stdout.strip().splitlines()
        if result.returncode == 0 and lines and lines[-1].isdigit() and int(lines[-1]) >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the cluster at {address} did not reach {count} nodes within {timeout:.0f}s")


def up(
    workers: int,
    cpus_per_node: int = 1,
    *,
    state: str | Path | None = None,
    temp_dir: str | Path | None = None,
    timeout: float = START_TIMEOUT,
    auth: bool = True,
) -> LocalCluster:
    """Start a head (0 CPUs) and `workers` worker nodes on 127.0.0.1; save and return the state.

    auth: Ray's token authentication (a new token in a 0600 file beside the state file); False
    turns it off (anyone on the machine can then attach)."""
    if workers < 1 or cpus_per_node < 1:
        raise ValueError("workers and cpus_per_node must be at least 1")
    path = state_path(state)
    if path.exists():
        raise ClusterStateError(f"a local cluster is already recorded in {path}; run `ccn cluster down` first")
    port, dashboard_port = _free_port(), _free_port()
    address = f"{HOST}:{port}"
    dashboard = f"http://{HOST}:{dashboard_port}"
    base = Path(temp_dir or path.parent / "ray").absolute()  # the nodes' logs
    base.mkdir(parents=True, exist_ok=True)
    session = tempfile.mkdtemp(prefix="ccn-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token_file = path.with_suffix(".token") if auth else None
    if token_file is not None:
        _write_token(token_file)
    recorded = LocalCluster(address, workers, cpus_per_node, session, [], dashboard, str(token_file or ""))
    # loopback only; every node (and everything it starts: jobs, workers) in the cluster's auth mode
    env = {**os.environ, **LOOPBACK_ENV, "RAY_USAGE_STATS_ENABLED": "0", **recorded.auth_env()}
    env.pop("RAY_ADDRESS", None)  # Ray lets $RAY_ADDRESS override an explicit address
    env.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the cluster's token file
    if not auth:
        env.pop("RAY_AUTH_TOKEN_PATH", None)
    # a Ray job's entrypoint (`ccn submit`: `python -m orchestrator.cli run ...`) is a shell command
    # run with the nodes' environment: put this interpreter's bin folder first, so `python` is this one
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    common = ["--node-ip-address", HOST, "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats"]
    started: list[tuple[str, subprocess.Popen, Path]] = []
    try:
        log = base / "head.log"
        head = _start_node(
            [
                "--head",
                "--port",
                str(port),
                "--num-cpus",
                "0",
                "--include-dashboard",
                "true",
                "--dashboard-host",
                HOST,
                "--dashboard-port",
                str(dashboard_port),
                "--dashboard-agent-listen-port",
                str(_free_port()),
                "--ray-client-server-port",  # Ray's default, 10001, would collide with another head
                str(_free_port()),
                "--temp-dir",
                session,
                "--resources",
                json.dumps({"ccn_head": 1}),
                *common,
            ],
            log,
            env,
        )
        started.append(("head", head, log))
        _wait_for_port(port, head, log, timeout)
        _wait_started(head, log, timeout)
        _wait_for_port(dashboard_port, head, log, timeout)
        for index in range(workers):  # one at a time: a loaded machine may miss Ray's 30 s raylet wait
            log = base / f"worker-{index}.log"
            for attempt in range(1, START_ATTEMPTS + 1):
                worker = _start_node(
                    [
                        "--address",
                        address,
                        "--num-cpus",
                        str(cpus_per_node),
                        "--resources",
                        json.dumps({f"ccn_node_{index}": 1}),
                        "--dashboard-agent-listen-port",
                        str(_free_port()),
                        # a session folder of its own: nodes sharing one would unpack a job's working_dir
                        # into the same folder, each deleting the other's copy (a Ray job's cwd among them)
                        "--temp-dir",
                        f"{session}/w{index}",
                        *common,
                    ],
                    log,
                    env,
                )
                try:
                    _wait_started(worker, log, timeout)
                    break
                except RuntimeError:
                    _stop([Node("worker", worker.pid, str(log), _tree(worker.pid))])
                    if attempt == START_ATTEMPTS:
                        raise
            started.append(("worker", worker, log))
        _wait_for_nodes(address, workers + 1, [(p, log) for _, p, log in started], timeout, recorded.auth_env())
    except BaseException:
        _stop([Node(role, process.pid, str(log), _tree(process.pid)) for role, process, log in started])
        shutil.rmtree(session, ignore_errors=True)
        if token_file is not None:
            token_file.unlink(missing_ok=True)
        raise
    recorded.nodes = [Node(role, process.pid, str(log), _tree(process.pid)) for role, process, log in started]
    recorded.save(path)
    return recorded


def _stop(nodes: list[Node], timeout: float = 20.0) -> list[int]:
    """Stop the nodes' recorded processes and their current descendants; returns pids still alive."""
    targets: set[tuple[int, float]] = set()
    for node in nodes:
        for pid, started in node.processes:
            if _alive(pid, started):
                targets.update(_tree(pid))  # its current descendants too (Ray workers started since)

    def alive() -> list[tuple[int, float]]:
        return [(pid, started) for pid, started in targets if _alive(pid, started)]

    def wait(seconds: float) -> list[tuple[int, float]]:
        deadline = time.monotonic() + seconds
        while (left := alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    # the node supervisors first: SIGTERM lets `ray start --block` shut its node down; then the rest
    supervisors = {node.pid for node in nodes}
    for pid, _ in alive():
        if pid in supervisors:
            _signal(pid, signal.SIGTERM)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        left = wait(timeout / 4)
        for pid, started in left:
            if _alive(pid, started):
                _signal(pid, signum)
    return [pid for pid, _ in wait(timeout / 4)]


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def down(state: str | Path | None = None) -> LocalCluster:
    """Stop exactly the processes the recorded cluster started; removes the state file."""
    path = state_path(state)
    if not path.exists():
        raise ClusterStateError(f"no local cluster is recorded in {path} (nothing to stop)")
    cluster = LocalCluster.load(path)
    left = _stop(cluster.nodes)
    if left:
        raise RuntimeError(f"processes {left} of the cluster at {cluster.address} would not stop")
    path.unlink()
    if cluster.token_file:
        Path(cluster.token_file).unlink(missing_ok=True)
    if Path(cluster.temp_dir).name.startswith("ccn-ray-"):
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return cluster


def status(state: str | Path | None = None) -> LocalCluster | None:
    path = state_path(state)
    return LocalCluster.load(path) if path.exists() else None
