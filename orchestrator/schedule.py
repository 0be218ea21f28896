"""Ray scheduling: long-lived actors pull batches from the driver, write results, return.

The driver owns the plan (a queue of batches); actors own nothing durable. Each actor holds a
`BatchExecutor` (compiled programs, one per static signature) and declares its resources
(`num_cpus`, `num_gpus`); actors are spread over the cluster's nodes. The driver asks Ray for
one actor per batch waiting (demand-driven: pending actors are what makes an autoscaler add
nodes) and kills each actor as soon as nothing is left for it (so idle nodes can go). When an
actor is idle the driver hands it the next batch, preferring one whose program that actor
already compiled. A batch that raises is retried up to `max_attempts` tries, then recorded as
failed; a batch whose actor or node is lost goes back to the queue without using a try
(preemption is not failure). Ctrl-C stops the actors; what was written stays written.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import psutil

from cluster.loopback import address_is_loopback, keep_loopback
from orchestrator import interrupts
from orchestrator.plan import GPU_MAX_BATCH, Batch
from orchestrator.progress import Progress
from orchestrator.results import ResultsStore

WAIT_SECONDS = 0.5  # how often the progress line refreshes while batches run
MAX_FAILED_STARTS = 3  # replacement actors per wanted actor that may die in a row before the sweep stops
MAX_PREEMPTIONS = 10  # times a batch's actor may be lost under it (free retries) before the batch is failed
CPU_ACTOR_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"  # one core per CPU actor
# GPU actors per GPU (`ccn run --actors-per-gpu K`): 2 so that while one actor does host work
# (compiling, writing Parquet and checkpoints, starting) the other keeps the device busy; a
# guess until benchmarks/gpu.py measures it on an H100/H200 (docs/cluster.md)
DEFAULT_ACTORS_PER_GPU = 2
GPU_MEMORY_SHARED = 0.9  # of a GPU's memory, split evenly among its actors (the rest: CUDA contexts)
# JAX's preallocated share of the GPU per process (jaxlib reads it when its GPU backend starts;
# XLA_PYTHON_CLIENT_MEM_FRACTION is its deprecated name, and both at once is an error)
MEM_FRACTION_ENV = "XLA_CLIENT_MEM_FRACTION"
DEPRECATED_MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or used (a message for people)."""


def claim_core(lock_dir: str | None = None) -> int | None:
    """Pin this process to one CPU core that no other live process of this user on this machine claimed.

    XLA:CPU sizes its thread pool from the process's CPU affinity: an unpinned one-core actor
    runs ~1.8 threads busy on 2 cores for no gain (measured: 1.82 CPU-seconds per second, and
    13% slower than pinned), so actors on one machine crowd each other out. The claim is an
    exclusive flock on `<lock_dir>/core-<i>.lock`, held for the life of the process (the kernel
    drops it when the process dies, however it dies), so actors of different Ray nodes on one
    machine pick different cores. The folder is private to the user: `lock_dir`, else
    $CCN_CORE_LOCK_DIR, else /tmp/ccn-sweeps-cores-<uid>; it is created with mode 0700 and used
    only when it is a real folder (not a symlink) that this user owns and no one else can write.
    Returns the core, or None when every core is claimed or the locks cannot be used (then
    nothing is pinned: a lock problem never stops an actor). Call before JAX starts its backend.
    """
    import fcntl
    import stat

    # one folder per user and machine, whatever temporary folder each Ray node gives its workers
    default = os.path.join(CORE_LOCK_BASE, f"ccn-sweeps-cores-{os.geteuid()}")
    folder = lock_dir or os.environ.get("CCN_CORE_LOCK_DIR") or default
    log = logging.getLogger(__name__)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            log.warning("ccn: core locks in %s not used (not a folder only this user can write); not pinned", folder)
            return None
        for core in sorted(os.sched_getaffinity(0)):
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            descriptor = os.open(os.path.join(folder, f"core-{core}.lock"), flags, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(descriptor)
                continue
            try:
                os.sched_setaffinity(0, {core})
            except OSError:
                os.close(descriptor)
                raise
            _CLAIMED.append(descriptor)
            return core
    except (OSError, ValueError) as error:  # never stop the actor: run unpinned
        log.warning("ccn: core locks in %s not usable (%s); cores not pinned", folder, error)
    return None


CORE_LOCK_BASE = "/tmp"  # the default lock folder's parent (shared by every Ray node of the machine)
_CLAIMED: list[int] = []  # the open lock file of this process's core (kept open: closing would release it)


class BatchWorker:
    """A Ray actor body: runs batches with one executor, writes each batch's files atomically.

    digest: put tracking.batch_digest of each batch in the reply (what W&B logs; only the tracker
    reads it, so a sweep without W&B does not pay for it).
    """

    def __init__(
        self, results_root: str, sweep: str, compilation_cache_dir: str | None, checkpoint_every: int = 0,
        digest: bool = False,
    ):
        import ray

        self.core = None
        if os.environ.get(MEM_FRACTION_ENV):  # a GPU actor's share: a deprecated one from the node would clash
            os.environ.pop(DEPRECATED_MEM_FRACTION_ENV, None)
        if os.environ.get("JAX_PLATFORMS") == "cpu" and os.environ.get("CCN_PIN_CORES", "1") != "0":
            self.core = claim_core()  # a CPU actor: one core of its own, before JAX starts
        from orchestrator.execute import BatchExecutor

        self.store = ResultsStore(results_root, sweep)
        self.executor = BatchExecutor(compilation_cache_dir)
        self.executor.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.checkpoint_every = checkpoint_every
        self.digest = digest

    def ready(self) -> bool:
        """Answers once the actor is placed and started."""
        return True

    def run_batch(self, batch: Batch, attempt: int) -> dict[str, Any]:
        """Run and write one batch (resuming from its checkpoint); returns a summary for the driver.

        A batch whose runs file exists already is not computed again: an earlier actor wrote it
        and was lost before its reply reached the driver. Its summary says `existing`.
        """
        started = time.perf_counter()
        runs = self._written_runs(batch)
        if runs is not None:
            self.store.delete_checkpoint(batch.batch_key)
            summary = self._summary(batch, runs, started, self._written_metrics(batch) if self.digest else None)
            return {**summary, "compute_seconds": 0.0, "existing": True}
        runs, metrics = self.executor.tables(
            batch, attempt, checkpoints=self.store, checkpoint_every=self.checkpoint_every
        )
        self.store.write_batch(batch.learner, batch.task, batch.batch_key, runs, metrics)
        self.store.delete_checkpoint(batch.batch_key)
        return self._summary(batch, runs, started, metrics)

    def _written_runs(self, batch: Batch):
        """The batch's runs table if its runs file exists and reads back whole, else None."""
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        path = self.store.batch_path("runs", batch.learner, batch.task, batch.batch_key)
        try:
            if self.store.filesystem.get_file_info(path).type != pafs.FileType.File:
                return None
            runs = pq.read_table(path, filesystem=self.store.filesystem)
        except Exception:  # noqa: BLE001 - unreadable: compute the batch again and replace the file
            return None
        expected = sorted(run.run_key for run in batch.runs)
        return runs if "run_key" in runs.column_names and sorted(runs["run_key"].to_pylist()) == expected else None

    def _written_metrics(self, batch: Batch):
        """The batch's metrics table as written, or None when it cannot be read (then W&B reads it later)."""
        import pyarrow.parquet as pq

        path = self.store.batch_path("metrics", batch.learner, batch.task, batch.batch_key)
        try:
            return pq.read_table(path, filesystem=self.store.filesystem)
        except Exception:  # noqa: BLE001 - only the digest is missing: the tracker reads the files itself
            return None

    def _summary(self, batch: Batch, runs, started: float, metrics=None) -> dict[str, Any]:
        """The reply: counts for the driver and progress, and with `self.digest` the W&B digest
        (tracking.batch_digest) computed here from the tables just written, so the driver never
        reads them back (else None)."""
        import pyarrow.compute as pc

        count = runs.num_rows
        resumed = runs["resumed_from_step"][0].as_py() if count else None
        return {
            "batch_key": batch.batch_key,
            "runs": count,
            "diverged": int(pc.sum(pc.equal(runs["status"], "diverged")).as_py() or 0),
            "seconds": time.perf_counter() - started,  # compute and writing
            "compute_seconds": runs["wall_seconds"][0].as_py() if count else 0.0,
            "host": self.executor.host,
            "node": self.executor.node,
            "pid": os.getpid(),
            "resumed_from_step": resumed,
            "existing": False,
            "digest": _digest(runs, metrics) if self.digest else None,
        }


def _digest(runs, metrics):
    """tracking.batch_digest of the tables, or None (the tracker then reads the files): a digest
    that cannot be made must never fail a batch whose results are written."""
    from orchestrator.tracking import batch_digest

    if metrics is None:
        return None
    try:
        return batch_digest(runs, metrics)
    except Exception as error:  # noqa: BLE001
        logging.getLogger(__name__).warning("ccn: W&B digest not made (%s); the tracker reads the files", error)
        return None


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
    preempted: int = 0  # times a batch went back to the queue because its actor or node was lost
    already_written: int = 0  # batches found written by an actor lost before it replied (not recomputed)
    actors_started: int = 0  # actors asked of Ray (placed or not)

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
    handles SIGTERM as Ctrl-C). Ctrl-C while the embedded Ray starts stops what it started so far.
    """
    import ray

    if ray.is_initialized():
        return False
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    children_before = set() if address else {child.pid for child in psutil.Process().children()}
    try:
        started = _connect(address, num_cpus)
        interrupts.check()  # a Ctrl-C that Python dropped while Ray started (orchestrator.interrupts)
        return started
    except KeyboardInterrupt:
        if not address:  # the embedded Ray's processes started so far (an attached cluster is not ours)
            ray.shutdown()
            stop_started_processes(children_before)
        raise
    finally:
        if callable(on_sigterm):
            signal.signal(signal.SIGTERM, on_sigterm)


def stop_started_processes(children_before: Collection[int], grace: float = 2.0) -> None:
    """Stop this process's children that are not in `children_before`, and all their descendants.

    A Ctrl-C inside `ray.init` can land before Ray records the node it is starting; `ray.shutdown`
    then stops nothing, and the raylet's agents would outlive the driver by tens of seconds. Only
    what this driver started is stopped. The tree is frozen first (SIGSTOP, repeated until no new
    process appears), so that nothing in it starts another process while it is being stopped, then
    killed (SIGKILL): a Ray start that was interrupted has nothing to save.
    """
    frozen: dict[int, psutil.Process] = {}
    for _ in range(10):
        tree = [child for child in psutil.Process().children() if child.pid not in children_before]
        for child in list(tree):
            with contextlib.suppress(psutil.Error):
                tree += child.children(recursive=True)
        new = [process for process in tree if process.pid not in frozen]
        if not new:
            break
        for process in new:
            with contextlib.suppress(psutil.Error):
                process.suspend()
                frozen[process.pid] = process
    for process in frozen.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(list(frozen.values()), timeout=grace)


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


def check_actors_per_gpu(actors_per_gpu) -> int:
    """`actors_per_gpu` as a valid count (ValueError, one line, otherwise)."""
    if isinstance(actors_per_gpu, bool) or not isinstance(actors_per_gpu, int) or not 1 <= actors_per_gpu <= 64:
        raise ValueError(f"actors_per_gpu must be an integer from 1 to 64, got {actors_per_gpu!r}")
    return actors_per_gpu


def gpu_memory_fraction(actors_per_gpu: int) -> str:
    """Each GPU actor's share of its GPU's memory (GPU_MEMORY_SHARED / k, rounded down to 2 decimals)."""
    return f"{math.floor(GPU_MEMORY_SHARED / check_actors_per_gpu(actors_per_gpu) * 100) / 100:.2f}"


def gpu_actor_options(actors_per_gpu: int) -> dict[str, Any]:
    """The Ray options of a GPU actor when `actors_per_gpu` actors share each GPU: a fractional
    `num_gpus` (1/k, rounded down to Ray's 1e-4 resolution so k of them fit) and JAX's memory
    fraction in the actor's environment, set before its JAX starts (runtime_env env_vars)."""
    share = math.floor(10_000 / check_actors_per_gpu(actors_per_gpu)) / 10_000
    return {
        "num_gpus": 1 if actors_per_gpu == 1 else share,
        "runtime_env": {"env_vars": {MEM_FRACTION_ENV: gpu_memory_fraction(actors_per_gpu)}},
    }


@dataclass(frozen=True)
class Workers:
    """The actors a sweep may hold at once: `cpu` one-core actors and `gpu` GPU actors, `per_gpu`
    of them sharing each GPU (gpu_actor_options).

    cpu None: no fixed number (an elastic cluster): one CPU actor per queued batch, up to what
    the cluster can place; the actors Ray cannot place yet stay pending, which is the demand an
    autoscaler adds nodes for. cpu_nodes: (node id, CPUs) of the GPU-less nodes alive at the
    start, where the first CPU actors go (one per CPU, spread).
    """

    cpu: int | None
    gpu: int = 0
    cpu_nodes: tuple[tuple[str, int], ...] = ()
    per_gpu: int = 1

    @property
    def gpu_batch_limit(self) -> int:
        """The most runs a GPU actor merges into one batch: GPU_MAX_BATCH split among a GPU's actors."""
        return max(1, GPU_MAX_BATCH // self.per_gpu)

    @property
    def accelerator(self) -> str:
        """How batches are sized: 'gpu' on an all-GPU cluster, else 'cpu' (GPU actors merge them)."""
        return "gpu" if self.gpu and self.cpu == 0 else "cpu"

    @property
    def planned(self) -> int | None:
        """The actors the plan cuts batches for (a GPU actor merges CPU-sized batches); None: not
        counted in advance (plan.plan_batches then cuts batches of plan.CPU_ELASTIC_BATCH runs)."""
        return self.gpu if self.accelerator == "gpu" else self.cpu

    def describe(self) -> str:
        """The actors, for people: '2 CPU', 'up to 8 CPU', 'one CPU per batch' (+ GPU ones)."""
        cpu = "one CPU actor per batch" if self.cpu is None else f"up to {self.cpu} CPU actors"
        return cpu + (f" and {self.gpu} GPU actors ({self.per_gpu} per GPU)" if self.gpu else "")


def cluster_workers(
    max_actors: int | None = None, elastic: bool = True, actors_per_gpu: int = DEFAULT_ACTORS_PER_GPU
) -> Workers:
    """The actors the connected cluster's sweep may hold: `actors_per_gpu` per GPU alive, plus CPU actors.

    elastic (a cluster the sweep attached to, which may grow): CPU actors follow the queue (one
    per batch), up to `max_actors` in all when given; the nodes alive now do not limit them.
    Not elastic (the embedded local Ray): one CPU actor per CPU of the GPU-less nodes, at most
    `max_actors`. A cluster with GPUs and no GPU-less node alive is all-GPU: GPU actors only.
    """
    import ray

    check_actors_per_gpu(actors_per_gpu)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    gpus = actors_per_gpu * sum(int(node["Resources"].get("GPU", 0)) for node in nodes)
    cpu_nodes = tuple(
        (node["NodeID"], int(node["Resources"].get("CPU", 0)))
        for node in nodes
        if not node["Resources"].get("GPU") and int(node["Resources"].get("CPU", 0)) > 0
    )
    if max_actors is not None:
        gpus = min(gpus, max_actors)
    if gpus and not cpu_nodes:
        return Workers(cpu=0, gpu=gpus, per_gpu=actors_per_gpu)  # all-GPU: GPU-sized batches on GPU actors
    if elastic:
        cpus = None if max_actors is None else max(0, max_actors - gpus)
    else:
        cpus = max(1, sum(count for _, count in cpu_nodes))
        cpus = cpus if max_actors is None else max(0, min(cpus, max_actors - gpus))
    if cpus == 0 and not gpus:
        cpus = 1  # max_actors >= 1 always leaves room for one actor
    return Workers(cpu=cpus, gpu=gpus, cpu_nodes=cpu_nodes, per_gpu=actors_per_gpu)


def merge_for_gpu(
    queue: collections.deque, first: tuple[Batch, int], limit: int, keep: Collection[str] = (), leave: int = 0
) -> tuple[Batch, int]:
    """`first` plus queued first-try batches of its signature, up to `limit` runs, as one batch.

    The merged batch is padded to a power of two (a GPU actor compiles each signature at most
    log2(limit) times). A batch on a retry, or whose key is in `keep` (a preempted batch, which
    may have a checkpoint), stays as it was (its checkpoint is keyed by it). At least `leave`
    batches stay in the queue (for the CPU actors).
    """
    batch, attempt = first
    if attempt > 1 or batch.batch_key in keep:
        return first
    runs = list(batch.runs)
    for queued in list(queue):
        if len(queue) <= leave:
            break
        other, other_attempt = queued
        if other.batch_key in keep:
            continue
        if other_attempt == 1 and other.signature == batch.signature and len(runs) + len(other.runs) <= limit:
            runs.extend(other.runs)
            queue.remove(queued)
    if len(runs) == len(batch.runs):
        return first
    padded = 1 << (len(runs) - 1).bit_length()
    return Batch(sweep=batch.sweep, runs=tuple(runs), padded_size=min(max(padded, batch.padded_size), limit)), 1


def is_preemption(error: BaseException) -> bool:
    """Whether a batch's error means its actor, node or reply was lost (not the batch's own code).

    RayTaskError: the batch's code raised (an attempt). Any other RayError (RayActorError and
    its ActorDiedError / ActorUnavailableError, node death, OwnerDiedError, ObjectLostError,
    Ray's out-of-memory kill) is a preemption: the batch goes back to the queue for free.
    """
    from ray.exceptions import RayError, RayTaskError

    return isinstance(error, RayError) and not isinstance(error, RayTaskError)


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
    digest: bool = False,
    worker_class: type = None,
    max_preemptions: int | None = None,
) -> SweepOutcome:
    """Run `batches` on actors of the connected Ray cluster (ray.init done).

    workers: a Workers (cluster_workers()), or a number of actors of kind `accelerator`.
    Demand-driven: the driver asks Ray for one actor per batch waiting (up to workers.cpu CPU
    actors, unbounded when None, plus workers.gpu GPU actors); actors Ray cannot place yet stay
    pending, and an autoscaler adds nodes for them. A new actor gets work once it answers. An
    idle actor with nothing left to take is killed at once, and pending ones beyond the batches
    waiting are cancelled, so an autoscaler can remove idle nodes while the sweep drains. On a
    cluster with GPU and CPU-only nodes, CPU actors run the planned batches and each GPU actor
    takes several batches of one signature at a time, merged up to GPU_MAX_BATCH // per_gpu runs.
    workers.per_gpu GPU actors share each GPU (gpu_actor_options: a fractional num_gpus and a
    share of its memory each); they run batches of any signatures side by side.

    Attempts count errors of the batch's own code (RayTaskError): up to `max_attempts` tries,
    then it is recorded as failed. Preemption is not failure: a batch whose actor, node or reply
    is lost (is_preemption) goes back to the queue without using an attempt, and its actor is
    replaced; the next actor skips the compute when the lost one had written the runs file, and
    resumes from the batch's last checkpoint (checkpoint_every steps; 0: none) otherwise. A batch
    whose actors are lost more than `max_preemptions` times (default MAX_PREEMPTIONS: a batch
    that kills its own actor, e.g. out of memory) is recorded as failed, saying so. When new
    actors keep dying before they answer (MAX_FAILED_STARTS per actor in a row, nothing
    finishing in between), no more are started; the live actors drain the queue, and when none
    is left the sweep stops with `outcome.stopped` saying why (instead of starting actors forever).
    on_batch_done(batch, summary): called in the driver after a batch's results are written, with
    the actor's reply; must return at once, e.g. orchestrator.tracking.Tracker.batch_done.
    digest: the actors put the batch's W&B digest in their reply (`summary["digest"]`, what the
    tracker logs); off (the default), it is None and costs nothing.
    worker_class: the actor body (default BatchWorker).
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not isinstance(workers, Workers):
        workers = Workers(cpu=0, gpu=workers) if accelerator == "gpu" else Workers(cpu=workers)
    max_preemptions = MAX_PREEMPTIONS if max_preemptions is None else max_preemptions
    started = time.perf_counter()
    store = ResultsStore(results_root, sweep)
    remote_worker = ray.remote(worker_class or BatchWorker)
    base: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "SPREAD", "max_concurrency": 1}
    cpu_options = {**base, "runtime_env": {"env_vars": {"XLA_FLAGS": CPU_ACTOR_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}}}
    gpu_options = {**base, **gpu_actor_options(workers.per_gpu)}
    arguments = (results_root, sweep, compilation_cache_dir, checkpoint_every, digest)
    cpu_slots = [node for node, cpus in workers.cpu_nodes for _ in range(cpus)]
    cpu_limit = len(batches) if workers.cpu is None else workers.cpu
    limits = {"gpu": min(workers.gpu, len(batches)), "cpu": min(cpu_limit, len(batches))}
    outcome = SweepOutcome(workers=limits["gpu"] + limits["cpu"])
    kind_of: dict[Any, str] = {}  # every actor held (joining, idle or busy) -> "cpu" | "gpu"
    slots_used = 0

    def new_actor(kind: str):
        nonlocal slots_used
        if kind == "gpu":
            actor = remote_worker.options(**gpu_options).remote(*arguments)
        elif slots_used < len(cpu_slots):  # soft: that node if it has room, else anywhere
            strategy = NodeAffinitySchedulingStrategy(cpu_slots[slots_used], soft=True)
            actor = remote_worker.options(**{**cpu_options, "scheduling_strategy": strategy}).remote(*arguments)
            slots_used += 1
        else:
            actor = remote_worker.options(**cpu_options).remote(*arguments)
        kind_of[actor] = kind
        outcome.actors_started += 1
        return actor

    def release(actor) -> None:
        kind_of.pop(actor, None)
        compiled.pop(actor, None)
        with contextlib.suppress(Exception):  # already dead: nothing to release
            ray.kill(actor, no_restart=True)

    queue: collections.deque[tuple[Batch, int]] = collections.deque((batch, 1) for batch in batches)
    preempted: dict[str, int] = {}  # batch key -> times its actor was lost under it
    compiled: dict[Any, set] = {}  # actors that answered -> signatures they compiled
    idle: list = []
    joining: dict[Any, Any] = {}  # ping ref -> new actor not yet known to be placed and started
    in_flight: dict[Any, tuple[Any, Batch, int]] = {}
    failed_starts = 0  # new actors in a row that died before answering
    last_start_error = ""
    start_limit = MAX_FAILED_STARTS * max(1, limits["gpu"] + limits["cpu"])

    def next_for(actor) -> tuple[Batch, int]:
        chosen = None
        for index, (batch, _) in enumerate(queue):
            if batch.signature in compiled[actor]:
                chosen = queue[index]
                del queue[index]
                break
        if chosen is None:
            chosen = queue.popleft()
        if kind_of[actor] == "gpu" and workers.accelerator == "cpu":
            # leave a batch for each CPU actor the GPU-less nodes alive at the start can place now
            cpu_actors = sum(1 for kind in kind_of.values() if kind == "cpu")
            limit = workers.gpu_batch_limit  # k actors of one GPU each merge up to GPU_MAX_BATCH // k runs
            chosen = merge_for_gpu(queue, chosen, limit, keep=preempted, leave=min(len(cpu_slots), cpu_actors))
        return chosen

    def follow_demand() -> None:
        """Hold one actor per batch queued or running (up to the limits): ask for missing ones,
        cancel pending ones beyond the queue, kill idle ones when the queue is empty."""
        nonlocal idle
        if not queue:
            for actor in idle:
                release(actor)
            idle = []
        surplus = len(kind_of) - len(queue) - len(in_flight)
        for ref in reversed(list(joining)):  # the newest first: the least likely to be placed yet
            if surplus <= 0:
                break
            release(joining.pop(ref))
            surplus -= 1
        if failed_starts >= start_limit:
            return
        needed = len(queue) + len(in_flight)
        for kind in ("gpu", "cpu"):
            held = sum(1 for k in kind_of.values() if k == kind)
            while held < limits[kind] and len(kind_of) < needed:
                actor = new_actor(kind)
                joining[actor.ready.remote()] = actor
                held += 1

    def give_up(batch: Batch, attempts: int, message: str) -> None:
        run_keys = [run.run_key for run in batch.runs]
        try:
            store.record_failure(batch.batch_key, run_keys, attempts, message)
        except Exception as error:  # noqa: BLE001 - the sweep goes on; the failure is in the outcome
            warning = f"ccn: warning: could not record the failure of batch {batch.batch_key[:12]}: {error}"
            if progress:
                progress.message(warning)
            else:
                print(warning, file=sys.stderr)
        outcome.failed_batches.append({"batch_key": batch.batch_key, "run_keys": run_keys, "error": message})
        if progress:
            progress.failed(batch, message)

    try:
        while queue or in_flight:
            follow_demand()
            if failed_starts >= start_limit and not compiled and not joining:  # no live actor, none can start
                outcome.stopped = (
                    f"{failed_starts} actors in a row died before they could take a batch, so the cluster "
                    f"cannot run this sweep's actors; the last one: {last_start_error}"
                )
                break
            while idle and queue:
                actor = idle.pop()
                batch, attempt = next_for(actor)
                in_flight[actor.run_batch.remote(batch, attempt)] = (actor, batch, attempt)
                if progress:
                    progress.started(batch)
            waiting = list(in_flight) + list(joining)
            if waiting:
                ready, _ = ray.wait(waiting, num_returns=1, timeout=WAIT_SECONDS)
            else:  # every actor lost and none may start: the check above stops the sweep
                ready = []
                time.sleep(WAIT_SECONDS)
            interrupts.check()  # also a Ctrl-C that Python dropped (orchestrator.interrupts)
            if progress:
                progress.refresh()
            for ref in ready:
                if ref in joining:
                    actor = joining.pop(ref)
                    try:
                        ray.get(ref, timeout=0)
                    except (RayError, GetTimeoutError) as error:
                        release(actor)
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
                except RayError as error:
                    message = _error_text(error)
                    if is_preemption(error):  # the actor, its node or the reply was lost: not the batch's fault
                        release(actor)
                        lost = preempted[batch.batch_key] = preempted.get(batch.batch_key, 0) + 1
                        outcome.preempted += 1
                        if lost > max_preemptions:
                            give_up(batch, attempt, f"its actor was lost {lost} times (node lost or preempted, "
                                    f"or the batch kills its own actor, e.g. out of memory); the last: {message}")
                        else:
                            queue.appendleft((batch, attempt))  # first in line for the next actor
                            if progress:
                                progress.message(f"batch {batch.batch_key[:12]} lost its actor ({message}); "
                                                 "requeued (not counted as a try)")
                        continue
                    idle.append(actor)
                    if attempt < max_attempts:
                        queue.append((batch, attempt + 1))
                        if progress:
                            progress.retried(batch, attempt, message)
                    else:
                        give_up(batch, attempt, message)
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
                if summary.get("existing"):
                    outcome.already_written += 1
                else:
                    outcome.resumed_batches += summary["resumed_from_step"] is not None
                if progress:
                    progress.finished(batch, summary)
                if on_batch_done:
                    on_batch_done(batch, summary)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        for actor in list(kind_of):
            release(actor)
        outcome.seconds = time.perf_counter() - started
    return outcome


def _error_text(error: Exception) -> str:
    """The last line of the remote traceback (the exception itself), for one-line reports."""
    cause = getattr(error, "cause", None)
    if cause is not None and not isinstance(cause, type(error)):
        return f"{type(cause).__name__}: {cause}".strip()
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
