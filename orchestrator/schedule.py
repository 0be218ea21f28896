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
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from orchestrator.plan import Batch
from orchestrator.progress import Progress
from orchestrator.results import ResultsStore

WAIT_SECONDS = 0.5  # how often the progress line refreshes while batches run
CPU_ACTOR_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"  # one core per CPU actor


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or used (a message for people)."""


class BatchWorker:
    """A Ray actor body: runs batches with one executor, writes each batch's files atomically."""

    def __init__(self, results_root: str, sweep: str, compilation_cache_dir: str | None):
        from orchestrator.execute import BatchExecutor

        self.store = ResultsStore(results_root, sweep)
        self.executor = BatchExecutor(compilation_cache_dir)

    def run_batch(self, batch: Batch, attempt: int) -> dict[str, Any]:
        """Run and write one batch; returns a summary for the driver."""
        started = time.perf_counter()
        runs, metrics = self.executor.tables(batch, attempt)
        self.store.write_batch(batch.learner, batch.task, batch.batch_key, runs, metrics)
        statuses = runs["status"].to_pylist()
        return {
            "batch_key": batch.batch_key,
            "runs": len(statuses),
            "diverged": statuses.count("diverged"),
            "seconds": time.perf_counter() - started,  # compute and writing
            "compute_seconds": runs["wall_seconds"][0].as_py() if len(statuses) else 0.0,
            "host": self.executor.host,
            "pid": os.getpid(),
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
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r}: {error.strerror or error}. "
            "Is it running (ray start --head) and is the address right?"
        ) from None


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Attach to `address` or start an embedded local Ray; returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_address(address)
        if address != "auto":  # Ray lets a (possibly stale) $RAY_ADDRESS override an explicit address
            os.environ.pop("RAY_ADDRESS", None)
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as error:  # noqa: BLE001 - Ray raises many kinds; one line for people
            raise ClusterError(f"cannot attach to the Ray cluster at {address!r}: {error}") from None
        return True
    # Ray runs worker processes at niceness 15 by default; a local sweep is the user's foreground
    # work, so its actors run at normal priority unless $RAY_worker_niceness says otherwise.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def cluster_workers(gpus_per_worker: float) -> tuple[int, str]:
    """How many actors the connected cluster fits, and the accelerator kind ('gpu' or 'cpu')."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and gpus_per_worker:
        return max(1, int(gpus / gpus_per_worker)), "gpu"
    return max(1, int(resources.get("CPU", 1))), "cpu"


def run_batches(
    batches: list[Batch],
    results_root: str,
    sweep: str,
    *,
    workers: int,
    accelerator: str,
    max_attempts: int,
    compilation_cache_dir: str | None,
    progress: Progress | None = None,
    on_batch_done=None,
) -> SweepOutcome:
    """Run `batches` on `workers` actors of the connected Ray cluster (ray.init done).

    on_batch_done(batch): called in the driver after a batch's results are written (must return
    at once, e.g. orchestrator.tracking.Tracker.batch_done).
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    outcome = SweepOutcome(workers=workers)
    started = time.perf_counter()
    store = ResultsStore(results_root, sweep)
    options: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "SPREAD", "max_concurrency": 1}
    if accelerator == "gpu":
        options["num_gpus"] = 1
    else:
        options["runtime_env"] = {"env_vars": {"XLA_FLAGS": CPU_ACTOR_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}}
    actor_class = ray.remote(BatchWorker).options(**options)

    def new_actor():
        return actor_class.remote(results_root, sweep, compilation_cache_dir)

    queue: collections.deque[tuple[Batch, int]] = collections.deque((batch, 1) for batch in batches)
    actors = [new_actor() for _ in range(min(workers, len(batches)))]
    compiled: dict[Any, set] = {actor: set() for actor in actors}
    idle = list(actors)
    in_flight: dict[Any, tuple[Any, Batch, int]] = {}

    def next_for(actor) -> tuple[Batch, int]:
        for index, (batch, attempt) in enumerate(queue):
            if batch.signature in compiled[actor]:
                del queue[index]
                return batch, attempt
        return queue.popleft()

    try:
        while queue or in_flight:
            while idle and queue:
                actor = idle.pop()
                batch, attempt = next_for(actor)
                in_flight[actor.run_batch.remote(batch, attempt)] = (actor, batch, attempt)
                if progress:
                    progress.started(batch)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_SECONDS)
            if progress:
                progress.refresh()
            for ref in ready:
                actor, batch, attempt = in_flight.pop(ref)
                try:
                    summary = ray.get(ref)
                except (RayTaskError, RayActorError) as error:
                    if isinstance(error, RayActorError):  # the actor died: replace it
                        del compiled[actor]
                        actor = new_actor()
                        compiled[actor] = set()
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
                outcome.batches_done += 1
                outcome.runs_done += summary["runs"]
                outcome.runs_diverged += summary["diverged"]
                actor_key = (summary["host"], summary["pid"])
                outcome.actor_compute_seconds[actor_key] = (
                    outcome.actor_compute_seconds.get(actor_key, 0.0) + summary["compute_seconds"]
                )
                if progress:
                    progress.finished(batch, summary)
                if on_batch_done:
                    on_batch_done(batch)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        for actor in compiled:
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
