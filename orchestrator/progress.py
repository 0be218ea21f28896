"""The terminal progress display: runs done / total, learner-steps per second, ETA, failures.

On a terminal one line is redrawn in place; elsewhere (CI logs, pipes) a line is printed per
finished batch, at the next refresh (after the freed actor got its next batch, so `running`
counts it). Learner-steps count completed runs' steps (a batch counts when it is written).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from orchestrator.plan import Batch


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def format_count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    """Counts batches as they finish and shows runs done / total, throughput, ETA, failures."""

    def __init__(self, total_runs: int, total_learner_steps: int, stream: TextIO | None = None):
        self.total_runs = total_runs
        self.total_learner_steps = total_learner_steps
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.started_at = time.perf_counter()
        self.runs_done = self.learner_steps_done = self.diverged = self.runs_failed = self.retries = 0
        self.running = 0
        self.changed = False  # a batch finished since the last line

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started_at
        rate = self.learner_steps_done / elapsed if elapsed > 0 else 0.0
        remaining = self.total_learner_steps - self.learner_steps_done
        eta = format_duration(remaining / rate) if rate > 0 else "?"
        return (
            f"runs {self.runs_done}/{self.total_runs}  {format_count(rate)} learner-steps/s  "
            f"ETA {eta}  elapsed {format_duration(elapsed)}  running {self.running}  "
            f"diverged {self.diverged}  failures {self.runs_failed}"
            + (f"  retries {self.retries}" if self.retries else "")
        )

    def _show(self, final: bool = False) -> None:
        if self.live:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def started(self, batch: Batch) -> None:
        self.running += 1

    def refresh(self) -> None:
        if self.live or self.changed:
            self._show()
            self.changed = False

    def finished(self, batch: Batch, summary: dict[str, Any]) -> None:
        self.running -= 1
        self.runs_done += summary["runs"]
        self.diverged += summary["diverged"]
        self.learner_steps_done += batch.learner_steps
        if summary.get("resumed_from_step"):
            self.message(
                f"batch {batch.batch_key[:12]} ({batch.learner} on {batch.task}) resumed from its checkpoint "
                f"at step {summary['resumed_from_step']:,}"
            )
        self.changed = True

    def retried(self, batch: Batch, attempt: int, error: str) -> None:
        self.running -= 1
        self.retries += 1
        self.message(
            f"batch {batch.batch_key[:12]} ({batch.learner} on {batch.task}) failed on try {attempt}, retrying: {error}"
        )

    def failed(self, batch: Batch, error: str) -> None:
        self.running -= 1
        self.runs_failed += len(batch.runs)
        self.total_learner_steps -= batch.learner_steps
        self.message(
            f"batch {batch.batch_key[:12]} ({batch.learner} on {batch.task}, {len(batch.runs)} runs) gave up: {error}"
        )

    def message(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self._show()

    def close(self) -> None:
        if self.live or self.changed:
            self._show(final=True)
            self.changed = False
