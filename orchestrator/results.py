"""The results store: one Parquet writer, completed-run discovery, failure records.

Layout under a results root (a local path or any pyarrow filesystem URI, e.g. s3://bucket/x):

    <root>/<sweep>/runs/learner=<kind>/task=<task>/<batch_key>.parquet      one row per run
    <root>/<sweep>/metrics/learner=<kind>/task=<task>/<batch_key>.parquet   one row per run per log point
    <root>/<sweep>/failures/<batch_key>.json                                a batch that gave up
    <root>/<sweep>/checkpoints/<batch_key>.ckpt                             an unfinished batch's state

Exactly-once: a batch's file name is derived from its run keys; each file is written under a
hidden temporary name and renamed (on object stores a single PUT). The metrics file is written
first and the runs file last: a run is complete exactly when its runs row exists. Before a
sweep is (re)scheduled, `remove_orphans` deletes metrics files whose runs file never appeared.

Checkpoints (orchestrator.checkpoint) hold a running batch's state every N steps, so a retried
or rerun batch resumes instead of starting over; the worker deletes a batch's checkpoint once
its runs file is written, and `remove_orphans` deletes any left over for complete batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.schema import TABLES

ATOMIC_RENAME_FILESYSTEMS = ("local", "hdfs")  # elsewhere (s3, gcs, ...) one PUT is already atomic


def open_filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a local path or a filesystem URI."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root)).replace(os.sep, "/")


@dataclass(frozen=True)
class RunRecord:
    """What the results say about one run."""

    status: str  # complete | diverged
    batch_key: str


class ResultsStore:
    """The results of one sweep under one root."""

    def __init__(self, root: str, sweep: str):
        self.root = root
        self.sweep = sweep
        self.filesystem, base = open_filesystem(root)
        self.base = f"{base.rstrip('/')}/{sweep}"

    # -- paths ----------------------------------------------------------------------------
    def table_dir(self, table: str) -> str:
        return f"{self.base}/{table}"

    def batch_path(self, table: str, learner: str, task: str, batch_key: str) -> str:
        return f"{self.base}/{table}/learner={learner}/task={task}/{batch_key}.parquet"

    def failure_path(self, batch_key: str) -> str:
        return f"{self.base}/failures/{batch_key}.json"

    def checkpoint_path(self, batch_key: str) -> str:
        return f"{self.base}/checkpoints/{batch_key}.ckpt"

    # -- writing --------------------------------------------------------------------------
    def _write_atomically(self, path: str, write) -> None:
        folder, name = path.rsplit("/", 1)
        self.filesystem.create_dir(folder, recursive=True)
        if self.filesystem.type_name not in ATOMIC_RENAME_FILESYSTEMS:
            write(path)
            return
        temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"  # hidden: readers skip it
        try:
            write(temporary)
            self.filesystem.move(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.filesystem.delete_file(temporary)
            raise

    def write_batch(self, learner: str, task: str, batch_key: str, runs: pa.Table, metrics: pa.Table) -> None:
        """Write a batch's metrics, then its runs (which mark the runs complete), atomically each."""
        for table, rows in (("metrics", metrics), ("runs", runs)):
            if not rows.schema.equals(TABLES[table], check_metadata=False):
                raise ValueError(f"{table} table does not have the {table} schema (build it with schema.to_table)")
            path = self.batch_path(table, learner, task, batch_key)
            self._write_atomically(path, lambda p, rows=rows: pq.write_table(rows, p, filesystem=self.filesystem))
        self.clear_failure(batch_key)

    def record_failure(self, batch_key: str, run_keys: list[str], attempts: int, error: str) -> None:
        """Note a batch that gave up after `attempts` tries, so `status` can report it."""
        record = {
            "batch_key": batch_key,
            "run_keys": sorted(run_keys),
            "attempts": attempts,
            "error": error,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

        def write(path):
            with self.filesystem.open_output_stream(path) as stream:
                stream.write(json.dumps(record, indent=1).encode())

        self._write_atomically(self.failure_path(batch_key), write)

    def clear_failure(self, batch_key: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.filesystem.delete_file(self.failure_path(batch_key))

    def write_checkpoint(self, batch_key: str, data: bytes) -> None:
        """Replace the batch's checkpoint atomically (a reader sees the old one or the new one)."""

        def write(path):
            with self.filesystem.open_output_stream(path) as stream:
                stream.write(data)

        self._write_atomically(self.checkpoint_path(batch_key), write)

    def read_checkpoint(self, batch_key: str) -> bytes | None:
        try:
            with self.filesystem.open_input_stream(self.checkpoint_path(batch_key)) as stream:
                return stream.read()
        except (FileNotFoundError, OSError):
            return None

    def delete_checkpoint(self, batch_key: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.filesystem.delete_file(self.checkpoint_path(batch_key))

    def checkpoint_keys(self) -> list[str]:
        """Batch keys that have a checkpoint."""
        return sorted(
            info.base_name[: -len(".ckpt")]
            for info in self._files(f"{self.base}/checkpoints")
            if info.base_name.endswith(".ckpt")
        )

    def _relative(self, path: str, table: str) -> str:
        """A file's path below the table's folder (`learner=.../task=.../<batch_key>.parquet`)."""
        prefix = self.table_dir(table).rstrip("/") + "/"
        if not path.startswith(prefix):
            raise ValueError(f"{path} is not under {prefix}")
        return path[len(prefix):]

    # -- reading --------------------------------------------------------------------------
    def _files(self, folder: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
        return [
            info
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File and not info.base_name.startswith((".", "_"))
        ]

    def dataset(self, table: str) -> ds.Dataset | None:
        """The table as a pyarrow dataset (hive partitioning), or None if nothing is written."""
        files = [info.path for info in self._files(self.table_dir(table)) if info.path.endswith(".parquet")]
        if not files:
            return None
        return ds.dataset(files, schema=TABLES[table], format="parquet", filesystem=self.filesystem)

    def completed_runs(self) -> dict[str, RunRecord]:
        """run_key -> its record, for every run with a row in the runs table (complete or diverged)."""
        dataset = self.dataset("runs")
        if dataset is None:
            return {}
        table = dataset.to_table(columns=["run_key", "status", "batch_key"])
        return {
            key: RunRecord(status, batch)
            for key, status, batch in zip(
                *(table[c].to_pylist() for c in ("run_key", "status", "batch_key")), strict=True
            )
        }

    def duplicate_run_keys(self) -> list[str]:
        """Run keys with more than one runs row (always empty unless two drivers raced)."""
        dataset = self.dataset("runs")
        if dataset is None:
            return []
        keys = dataset.to_table(columns=["run_key"])["run_key"].to_pylist()
        seen: set[str] = set()
        return sorted({k for k in keys if k in seen or seen.add(k)})

    def batches_without_metrics(self) -> list[str]:
        """Batch keys with a runs file but no metrics file (never written by ccn; always empty)."""
        runs = {self._relative(info.path, "runs") for info in self._files(self.table_dir("runs"))}
        metrics = {self._relative(info.path, "metrics") for info in self._files(self.table_dir("metrics"))}
        return sorted(path.rsplit("/", 1)[1][: -len(".parquet")] for path in runs - metrics)

    def failures(self) -> list[dict[str, Any]]:
        """Failure records of batches that gave up (a later success deletes its record)."""
        records = []
        for info in self._files(f"{self.base}/failures"):
            if info.path.endswith(".json"):
                with self.filesystem.open_input_stream(info.path) as stream:
                    records.append(json.loads(stream.read()))
        return records

    def remove_orphans(self) -> int:
        """Delete metrics files without a runs file, checkpoints of complete batches and leftover
        temporary files; returns how many.

        Only safe while no other driver writes this sweep (one driver per sweep).
        """
        runs = {self._relative(info.path, "runs") for info in self._files(self.table_dir("runs"))}
        removed = 0
        for info in self._files(self.table_dir("metrics")):
            if self._relative(info.path, "metrics") not in runs:
                self.filesystem.delete_file(info.path)
                removed += 1
        complete = {path.rsplit("/", 1)[1][: -len(".parquet")] for path in runs}
        for batch_key in set(self.checkpoint_keys()) & complete:
            self.delete_checkpoint(batch_key)
            removed += 1
        selector = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
        for info in self.filesystem.get_file_info(selector):
            if info.type == pafs.FileType.File and info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    self.filesystem.delete_file(info.path)
                    removed += 1
        return removed
