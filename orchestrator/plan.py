"""Planning: skip complete runs, group the rest by static signature, cut them into batches.

A batch is one compiled program: runs that share a static signature (everything that changes
array shapes or compiled code: learner kind and static config, task kind and parameters, steps,
log interval) vmapped together. All batches of one signature are padded to the same size, so an
actor compiles each signature once. A batch's key is derived from its runs' keys, so a retried
batch writes the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable
from typing import Any

from orchestrator.runs import Run

CPU_MAX_BATCH = 32  # runs per vmapped batch on a CPU core: throughput is flat from ~8 to 32, lower at 64
# runs per batch when the actors are not counted in advance (an elastic cluster): the smallest batch
# at full per-core throughput, so a sweep spreads over as many nodes as the cluster will add
CPU_ELASTIC_BATCH = 8
GPU_MAX_BATCH = 4096  # runs per vmapped batch on one GPU


def signature(run: Run) -> tuple[Any, ...]:
    """What selects the compiled program of a run (hashable)."""
    return (run.learner, run.config, run.task.kind, run.task.params, run.steps, run.log_every)


def batch_key_of(run_keys: Iterable[str]) -> str:
    """32 hex digits derived from the sorted run keys: the batch's file name."""
    return hashlib.sha256("\n".join(sorted(run_keys)).encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Runs executed together as one vmapped program.

    padded_size >= len(runs): the compiled batch size (padding repeats the last run; its
    results are dropped), equal for every batch of the same signature.
    """

    sweep: str
    runs: tuple[Run, ...]
    padded_size: int

    @property
    def batch_key(self) -> str:
        return batch_key_of(run.run_key for run in self.runs)

    @property
    def signature(self) -> tuple[Any, ...]:
        return signature(self.runs[0])

    @property
    def learner(self) -> str:
        return self.runs[0].learner

    @property
    def task(self) -> str:
        return self.runs[0].task.name

    @property
    def learner_steps(self) -> int:
        return len(self.runs) * self.runs[0].steps


def max_batch_size(accelerator: str) -> int:
    """The automatic cap on a batch: fill a CPU core's vector units, or a GPU."""
    return GPU_MAX_BATCH if accelerator == "gpu" else CPU_MAX_BATCH


def plan_batches(
    sweep: str,
    runs: Iterable[Run],
    *,
    workers: int | None,
    batch_size: int | None = None,
    accelerator: str = "cpu",
    resumable: Iterable[tuple[Iterable[str], int]] = (),
    max_batch: int | None = None,
) -> list[Batch]:
    """Group `runs` by signature and cut each group into near-equal batches.

    batch_size None (auto): at most `max_batch` (default `max_batch_size(accelerator)`; GPU actors
    sharing a GPU pass their share of it) and small enough that every
    one of `workers` actors gets work; with workers None (an elastic cluster, whose size the
    plan must not depend on) batches of CPU_ELASTIC_BATCH runs, one actor each. Batches come
    largest-work first (learner-steps x runs).
    resumable: (run keys, padded size) of checkpointed batches; one whose runs are all still to
    run is kept exactly as it was (same batch key), so it resumes from its checkpoint.
    """
    runs = list(runs)
    by_key = {run.run_key: run for run in runs}
    batches: list[Batch] = []
    for run_keys, padded_size in resumable:
        kept = [by_key.get(key) for key in run_keys]
        if kept and all(kept) and len({signature(run) for run in kept}) == 1 and padded_size >= len(kept):
            batches.append(Batch(sweep=sweep, runs=tuple(kept), padded_size=padded_size))
            for run in kept:
                del by_key[run.run_key]
    runs = [run for run in runs if run.run_key in by_key]
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(signature(run), []).append(run)
    total = sum(len(group) for group in groups.values()) + sum(len(batch.runs) for batch in batches)
    if total == 0:
        return []
    if batch_size is None:
        cap = max_batch_size(accelerator) if max_batch is None else max(1, min(max_batch, max_batch_size(accelerator)))
        if workers is None:
            batch_size = min(cap, CPU_ELASTIC_BATCH)
        else:
            batch_size = max(1, min(cap, math.ceil(total / max(1, workers))))
    for group in groups.values():
        count = math.ceil(len(group) / batch_size)
        base, extra = divmod(len(group), count)
        sizes = [base + (i < extra) for i in range(count)]
        start = 0
        for size in sizes:
            batches.append(Batch(sweep=sweep, runs=tuple(group[start : start + size]), padded_size=max(sizes)))
            start += size
    batches.sort(key=lambda b: b.padded_size * b.runs[0].steps, reverse=True)
    return batches
