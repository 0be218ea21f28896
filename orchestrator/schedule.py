"""Ray scheduling: long-lived actors pull batches from the driver, write results, return.

The driver owns the plan (a queue of batches); actors own nothing durable. Each actor holds a
`BatchExecutor` (compiled programs, one per static signature) and declares its resources
(`num_cpus`, `num_gpus`); actors are spread over the cluster's nodes. When an actor is idle the
driver hands it the next batch, preferring one whose program that actor already compiled. A
batch that raises is retried (a dead actor is replaced) up to `max_attempts` tries, then
recorded as failed. Ctrl-C stops the actors; what was written stays written.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from cluster.loopback import address_is_loopback, keep_loopback
from orchestrator.plan import Batch
from orchestrator.progress import Progress
from orchestrator.results import ResultsStore

WAIT_SECONDS = 0.5  # how often the progress line refreshes while batches run
MAX_FAILED_STARTS = 3  # replacement actors per wanted actor that may die in a row before the sweep stops
CPU_ACTOR_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"  # one core per CPU actor


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or used (a message for people)."""


def claim_core(lock_dir: str | None = None) -> int | None:
    """Pin this process to one CPU core that no other live process of this machine claimed.

    XLA:CPU sizes its thread pool from the process's CPU affinity: an unpinned one-core actor
    runs ~1.8 threads busy on 2 cores for no gain (measured: 1.82 CPU-seconds per second, and
    13% slower than pinned), so actors on one machine crowd each other out. The claim is an
    exclusive flock on `<lock_dir>/core-<i>.lock` (default /tmp/ccn-sweeps-cores), held for the
    life of the process (the kernel drops it when the process dies, however it dies), so actors
    of different Ray nodes on one machine pick different cores. Returns the core, or None when
    every core is claimed (then nothing is pinned). Call before JAX starts its backend.
    """
    import fcntl

    # one folder per machine, whatever temporary folder each Ray node gives its workers
    folder = lock_dir or os.environ.get("CCN_CORE_LOCK_DIR") or "/tmp/ccn-sweeps-cores"
    os.makedirs(folder, exist_ok=True)
    for core in sorted(os.sched_getaffinity(0)):
        handle = open(os.path.join(folder, f"core-{core}.lock"), "a")  # noqa: SIM115 - held open on purpose
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _CLAIMED.append(handle)
        os.sched_setaffinity(0, {core})
        return core
    return None


_CLAIMED: list = []  # the open lock file of this process's core (kept open: closing would release it)


class BatchWorker:
    """A Ray actor body: runs batches with one executor, writes each batch's files atomically."""

    def __init__(self, results_root: str, sweep: str, compilation_cache_dir: str | None, checkpoint_every: int = 0):
        import ray

        self.core = None
        if os.environ.get("JAX_PLATFORMS") == "cpu" and os.environ.get("CCN_PIN_CORES", "1") != "0":
            self.core = claim_core()  # a CPU actor: one core of its own, before JAX starts
        from orchestrator.execute import BatchExecutor

        self.store = ResultsStore(results_root, sweep)
        self.executor = BatchExecutor(compilation_cache_dir)
        self.executor.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.checkpoint_every = checkpoint_every

    def ready(self) -> bool:
        """Answers once the actor is placed and started."""
        return True

    def run_batch(self, batch: Batch, attempt: int) -> dict[str, Any]:
        """Run and write one batch (resuming from its checkpoint); returns a summary for the driver."""
        started = time.perf_counter()
        runs, metrics = self.executor.tables(
            batch, attempt, checkpoints=self.store, checkpoint_every=self.checkpoint_every
        )
        self.store.write_batch(batch.learner, batch.task, batch.batch_key, runs, metrics)
        self.store.delete_checkpoint(batch.batch_key)
        statuses = runs["status"].to_pylist()
        resumed = runs["resumed_from_step"][0].as_py() if len(statuses) else None
        return {
            "batch_key": batch.batch_key,
            "runs": len(statuses),
            "diverged": statuses.count("diverged"),
            "seconds": time.perf_counter() - started,  # compute and writing
            "compute_seconds": runs["wall_seconds"][0].as_py() if len(statuses) else 0.0,
            "host": self.executor.host,
            "node": self.executor.node,
            "pid": os.getpid(),
            "resumed_from_step": resumed,
        }


@dataclass
class SweepOutcome:
    """What a sweep's execution did (this invocation only)."""

    batches_done: int = 0
    runs_done: int = 0
    runs_diverged: int = 0
    failed_batches: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    workers: int = 0
    seconds: float = 0.0
    actor_compute_seconds: dict = field(default_factory=dict)  # (host, pid) -> executor seconds
    node_batches: dict = field(default_factory=dict)  # Ray node id -> batches it finished
    resumed_batches: int = 0  # batches that continued from a checkpoint
    stopped: str | None = None  # why the sweep stopped with batches left (actors cannot start), for people

    @property
    def runs_failed(self) -> int:
        return sum(len(failure["run_keys"]) for failure in self.failed_batches)


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (ClusterError) when a Ray address's host:port does not accept connections."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ClusterError(f"Ray address {address!r} must look like HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:PORT")
    problem = unreachable(host, port, timeout)
    if problem:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r}: {problem}. "
            "Is it running (ray start --head) and is the address right?"
        )


def unreachable(host: str, port: int, timeout: float = 5.0) -> str | None:
    """Why host:port does not accept a TCP connection (None when it does)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return str(error.strerror or error)


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Attach to `address` or start an embedded local Ray; returns whether we started it.

    The caller's own SIGTERM handler survives (ray.init replaces it with sys.exit; `ccn run`
    handles SIGTERM as Ctrl-C).
    """
    import ray

    if ray.is_initialized():
        return False
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        return _connect(address, num_cpus)
    finally:
        if callable(on_sigterm):
            signal.signal(signal.SIGTERM, on_sigterm)


def _connect(address: str | None, num_cpus: int | None) -> bool:
    import ray

    if address:
        check_address(address)
        if address != "auto":  # Ray lets a (possibly stale) $RAY_ADDRESS override an explicit address
            os.environ.pop("RAY_ADDRESS", None)
        if address_is_loopback(address if address != "auto" else os.environ.get("RAY_ADDRESS")):
            keep_loopback()  # else Ray turns 127.0.0.1 into the network address, where a loopback cluster is not
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as error:  # noqa: BLE001 - Ray raises many kinds; one line for people
            raise ClusterError(f"cannot attach to the Ray cluster at {address!r}: {error}") from None
        return True
    # Ray runs worker processes at niceness 15 by default; a local sweep is the user's foreground
    # work, so its actors run at normal priority unless $RAY_worker_niceness says otherwise.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Ray 2.60 turns token authentication on for a new local cluster and says so on stderr; the
    # embedded Ray keeps it on, without the line in the middle of the sweep's output
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    keep_loopback()  # registers and listens on 127.0.0.1 only, never on the machine's network address
    ray.init(
        address="local",  # always a Ray of its own: never whatever `ray start` (or its stale pointer) left
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    return True


@dataclass(frozen=True)
class Workers:
    """The actors a cluster fits: `cpu` one-core actors and `gpu` one-GPU actors.

    cpu_nodes: (node id, CPUs) of the nodes without GPUs, where the CPU actors go.
    """

    cpu: int
    gpu: int = 0
    cpu_nodes: tuple[tuple[str, int], ...] = ()

    @property
    def accelerator(self) -> str:
        """How batches are sized: 'gpu' on an all-GPU cluster, else 'cpu' (GPU actors merge them)."""
        return "gpu" if self.gpu and not self.cpu else "cpu"

    @property
    def planned(self) -> int:
        """The actors the plan cuts batches for (a GPU actor merges CPU-sized batches)."""
        return self.gpu if self.accelerator == "gpu" else self.cpu


def cluster_workers() -> Workers:
    """The connected cluster's actors: one per GPU, and one per CPU of the nodes without a GPU."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    gpus = sum(int(node["Resources"].get("GPU", 0)) for node in nodes)
    cpu_nodes = tuple(
        (node["NodeID"], int(node["Resources"].get("CPU", 0)))
        for node in nodes
        if not node["Resources"].get("GPU") and int(node["Resources"].get("CPU", 0)) > 0
    )
    cpus = sum(count for _, count in cpu_nodes)
    if not gpus and not cpus:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return Workers(cpu=cpus, gpu=gpus, cpu_nodes=cpu_nodes)


def merge_for_gpu(queue: collections.deque, first: tuple[Batch, int], limit: int) -> tuple[Batch, int]:
    """`first` plus queued first-try batches of its signature, up to `limit` runs, as one batch.

    The merged batch is padded to a power of two (a GPU actor compiles each signature at most
    log2(limit) times). A batch on a retry stays as it was (its checkpoint is keyed by it).
    """
    batch, attempt = first
    if attempt > 1:
        return first
    runs = list(batch.runs)
    for queued in list(queue):
        other, other_attempt = queued
        if other_attempt == 1 and other.signature == batch.signature and len(runs) + len(other.runs) <= limit:
            runs.extend(other.runs)
            queue.remove(queued)
    if len(runs) == len(batch.runs):
        return first
    padded = 1 << (len(runs) - 1).bit_length()
    return Batch(sweep=batch.sweep, runs=tuple(runs), padded_size=min(max(padded, batch.padded_size), limit)), 1


def run_batches(
    batches: list[Batch],
    results_root: str,
    sweep: str,
    *,
    workers: int | Workers,
    accelerator: str = "cpu",
    max_attempts: int,
    compilation_cache_dir: str | None,
    checkpoint_every: int = 0,
    progress: Progress | None = None,
    on_batch_done=None,
    worker_class: type = None,
) -> SweepOutcome:
    """Run `batches` on the actors of the connected Ray cluster (ray.init done).

    workers: a Workers (cluster_workers()), or a number of actors of kind `accelerator`. On a
    cluster with GPU and CPU-only nodes, CPU actors run the planned batches and each GPU actor
    takes several batches of one signature at a time, merged up to GPU_MAX_BATCH runs.
    An actor lost with its process or node is replaced once the cluster has room (a new actor
    must answer before it gets work); its batch goes back to the queue for any live actor. When
    replacements keep dying before they answer (MAX_FAILED_STARTS per actor in a row, nothing
    finishing in between), no more are started; the live actors drain the queue, and when none
    is left the sweep stops with `outcome.stopped` saying why (instead of starting actors forever).
    checkpoint_every: steps between a batch's checkpoints (0: none); a retried batch resumes
    from its last checkpoint.
    on_batch_done(batch): called in the driver after a batch's results are written (must return
    at once, e.g. orchestrator.tracking.Tracker.batch_done).
    worker_class: the actor body (default BatchWorker).
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestrator.plan import GPU_MAX_BATCH

    if not isinstance(workers, Workers):
        workers = Workers(cpu=0, gpu=workers) if accelerator == "gpu" else Workers(cpu=workers)
    outcome = SweepOutcome(workers=workers.cpu + workers.gpu)
    started = time.perf_counter()
    store = ResultsStore(results_root, sweep)
    remote_worker = ray.remote(worker_class or BatchWorker)
    base: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "SPREAD", "max_concurrency": 1}
    cpu_options = {**base, "runtime_env": {"env_vars": {"XLA_FLAGS": CPU_ACTOR_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}}}
    gpu_options = {**base, "num_gpus": 1}
    arguments = (results_root, sweep, compilation_cache_dir, checkpoint_every)
    cpu_slots = [node for node, cpus in workers.cpu_nodes for _ in range(cpus)]
    gpu_actors: set = set()

    def new_actor(kind: str, slot: int | None = None):
        if kind == "gpu":
            actor = remote_worker.options(**gpu_options).remote(*arguments)
            gpu_actors.add(actor)
            return actor
        if slot is not None and slot < len(cpu_slots):  # soft: the node if it has room, else anywhere
            strategy = NodeAffinitySchedulingStrategy(cpu_slots[slot], soft=True)
            return remote_worker.options(**{**cpu_options, "scheduling_strategy": strategy}).remote(*arguments)
        return remote_worker.options(**cpu_options).remote(*arguments)

    queue: collections.deque[tuple[Batch, int]] = collections.deque((batch, 1) for batch in batches)
    wanted = [("gpu", None)] * workers.gpu + [("cpu", slot) for slot in range(workers.cpu)]
    wanted = wanted[: len(batches)]  # GPU actors first
    compiled: dict[Any, set] = {}
    idle: list = []
    for kind, slot in wanted:
        actor = new_actor(kind, slot)
        compiled[actor] = set()
        idle.append(actor)
    lost: list[str] = []  # kinds of actors lost, to replace when the cluster has room
    joining: dict[Any, Any] = {}  # ping ref -> replacement actor not yet known to be placed
    in_flight: dict[Any, tuple[Any, Batch, int]] = {}
    failed_starts = 0  # replacement actors in a row that died before answering
    last_start_error = ""
    start_limit = MAX_FAILED_STARTS * max(1, len(wanted))

    def next_for(actor) -> tuple[Batch, int]:
        chosen = None
        for index, (batch, _) in enumerate(queue):
            if batch.signature in compiled[actor]:
                chosen = queue[index]
                del queue[index]
                break
        if chosen is None:
            chosen = queue.popleft()
        if actor in gpu_actors and workers.accelerator == "cpu":
            chosen = merge_for_gpu(queue, chosen, GPU_MAX_BATCH)
        return chosen

    def room_for(kind: str) -> bool:
        available = ray.available_resources()
        return available.get("GPU" if kind == "gpu" else "CPU", 0) >= 1

    try:
        while queue or in_flight:
            if failed_starts >= start_limit and not compiled and not joining:  # no live actor, none can start
                outcome.stopped = (
                    f"{failed_starts} actors in a row died before they could take a batch, so the cluster "
                    f"cannot run this sweep's actors; the last one: {last_start_error}"
                )
                break
            if lost and failed_starts < start_limit and (not compiled or room_for(lost[0])):
                actor = new_actor(lost.pop(0))
                joining[actor.ready.remote()] = actor
            while idle and queue:
                actor = idle.pop()
                batch, attempt = next_for(actor)
                in_flight[actor.run_batch.remote(batch, attempt)] = (actor, batch, attempt)
                if progress:
                    progress.started(batch)
            waiting = list(in_flight) + list(joining)
            if waiting:
                ready, _ = ray.wait(waiting, num_returns=1, timeout=WAIT_SECONDS)
            else:  # every actor lost and no room for a replacement yet: wait for the cluster to grow
                ready = []
                time.sleep(WAIT_SECONDS)
            if progress:
                progress.refresh()
            for ref in ready:
                if ref in joining:
                    actor = joining.pop(ref)
                    try:
                        ray.get(ref, timeout=0)
                    except (RayActorError, GetTimeoutError) as error:
                        lost.append("gpu" if actor in gpu_actors else "cpu")
                        failed_starts += 1
                        last_start_error = _error_text(error)
                        continue
                    failed_starts = 0
                    compiled[actor] = set()
                    idle.append(actor)
                    continue
                actor, batch, attempt = in_flight.pop(ref)
                try:
                    summary = ray.get(ref)
                except (RayTaskError, RayActorError) as error:
                    if isinstance(error, RayActorError):  # the actor died (its process or node): replace it
                        del compiled[actor]
                        lost.append("gpu" if actor in gpu_actors else "cpu")
                    else:
                        idle.append(actor)
                    message = _error_text(error)
                    if attempt < max_attempts:
                        queue.append((batch, attempt + 1))
                        if progress:
                            progress.retried(batch, attempt, message)
                    else:
                        run_keys = [run.run_key for run in batch.runs]
                        store.record_failure(batch.batch_key, run_keys, attempt, message)
                        outcome.failed_batches.append(
                            {"batch_key": batch.batch_key, "run_keys": run_keys, "error": message}
                        )
                        if progress:
                            progress.failed(batch, message)
                    continue
                idle.append(actor)
                compiled[actor].add(batch.signature)
                failed_starts = 0
                outcome.batches_done += 1
                outcome.runs_done += summary["runs"]
                outcome.runs_diverged += summary["diverged"]
                actor_key = (summary["host"], summary["pid"])
                outcome.actor_compute_seconds[actor_key] = (
                    outcome.actor_compute_seconds.get(actor_key, 0.0) + summary["compute_seconds"]
                )
                outcome.node_batches[summary["node"]] = outcome.node_batches.get(summary["node"], 0) + 1
                outcome.resumed_batches += summary["resumed_from_step"] is not None
                if progress:
                    progress.finished(batch, summary)
                if on_batch_done:
                    on_batch_done(batch)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        for actor in list(compiled) + list(joining.values()):
            ray.kill(actor, no_restart=True)
        outcome.seconds = time.perf_counter() - started
    return outcome


def _error_text(error: Exception) -> str:
    """The last line of the remote traceback (the exception itself), for one-line reports."""
    cause = getattr(error, "cause", None)
    if cause is not None and not isinstance(cause, type(error)):
        return f"{type(cause).__name__}: {cause}".strip()
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
