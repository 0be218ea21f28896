"""The results store: one Parquet writer, completed-run discovery, failure records.

Layout under a results root (a local path or any pyarrow filesystem URI, e.g. s3://bucket/x):

    <root>/<sweep>/runs/learner=<kind>/task=<task>/<batch_key>.parquet      one row per run
    <root>/<sweep>/metrics/learner=<kind>/task=<task>/<batch_key>.parquet   one row per run per log point
    <root>/<sweep>/failures/<batch_key>.json                                a batch that gave up
    <root>/<sweep>/checkpoints/<batch_key>.ckpt                             an unfinished batch's state
    <root>/<sweep>/checkpoints/<batch_key>.metrics/<first>-<last>.parquet   its metric rows, per checkpoint

Exactly-once: a batch's file name is derived from its run keys; each file is written under a
hidden temporary name and renamed (on object stores a single PUT). The metrics file is written
first and the runs file last: a run is complete exactly when its runs row exists. Before a
sweep is (re)scheduled, `remove_orphans` deletes metrics files whose runs file never appeared.

Damaged files: a runs, metrics, checkpoint or failure file that cannot be read (empty, truncated,
garbage: a killed writer, a power loss) is moved aside to `<sweep>/_corrupt/<its path>.corrupt`
(kept for inspection, invisible to readers) with one warning line naming it, and its batch
reruns; a runs file whose metrics file is damaged is moved aside too (`.superseded`). Local writes fsync the file
before the rename and the folder after it. A failed checkpoint write or failure record warns
and the sweep goes on.

Checkpoints (orchestrator.checkpoint) hold a running batch's state every N steps, so a retried
or rerun batch resumes instead of starting over; the worker deletes a batch's checkpoint once
its runs file is written, and `remove_orphans` deletes any left over for complete batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.schema import TABLES

ATOMIC_RENAME_FILESYSTEMS = ("local", "hdfs")  # elsewhere (s3, gcs, ...) one PUT is already atomic
CORRUPT_FOLDER = "_corrupt"  # <sweep>/_corrupt/<path below the sweep>.corrupt: files set aside
CORRUPT_SUFFIX = ".corrupt"  # a damaged file moved aside (kept for inspection; no reader sees it)
SUPERSEDED_SUFFIX = ".superseded"  # a runs file moved aside because its metrics file was damaged
FAILURE_KEYS = {"batch_key", "run_keys", "attempts", "error"}
DAMAGED = (ValueError, EOFError)  # what reading a damaged file raises (pyarrow.ArrowInvalid is a ValueError)
UNREADABLE = (pa.ArrowException, OSError, *DAMAGED)  # ... or an I/O error (maybe passing: not set aside)


def warn(text: str) -> None:
    """One warning line on stderr (the driver's, or the Ray worker's log)."""
    print(f"ccn: warning: {text}", file=sys.stderr, flush=True)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _fsync_local(path: str, directory: bool = False) -> None:
    """Flush a local file's (or folder's) data to the disk."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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

    def segment_dir(self, batch_key: str) -> str:
        """The folder of a checkpointed batch's metric segments (orchestrator.checkpoint)."""
        return f"{self.base}/checkpoints/{batch_key}.metrics"

    def segment_path(self, batch_key: str, name: str) -> str:
        return f"{self.segment_dir(batch_key)}/{name}.parquet"

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
            if self.filesystem.type_name == "local":  # on the disk before the name says it is complete
                _fsync_local(temporary)
            self.filesystem.move(temporary, path)
            if self.filesystem.type_name == "local":  # the rename itself survives a power loss
                _fsync_local(folder, directory=True)
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

    def record_failure(self, batch_key: str, run_keys: list[str], attempts: int, error: str) -> bool:
        """Note a batch that gave up after `attempts` tries, so `status` can report it.

        Never raises: when the record cannot be written it warns and returns False (the sweep
        goes on; the batch's runs stay missing, so the next `ccn run` retries them).
        """
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

        try:
            self._write_atomically(self.failure_path(batch_key), write)
        except Exception as problem:  # noqa: BLE001 - a failure record must never stop the sweep
            warn(f"cannot record the failure of batch {batch_key[:12]} at {self.failure_path(batch_key)}: "
                 f"{_one_line(problem)}; its runs stay missing and the next run retries them")
            return False
        return True

    def clear_failure(self, batch_key: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.filesystem.delete_file(self.failure_path(batch_key))

    def write_checkpoint(self, batch_key: str, data: bytes) -> bool:
        """Replace the batch's checkpoint atomically (a reader sees the old one or the new one).

        Never raises: a checkpoint that cannot be written warns and returns False, and the batch
        goes on (it only loses the chance to resume from this point).
        """

        def write(path):
            with self.filesystem.open_output_stream(path) as stream:
                stream.write(data)

        try:
            self._write_atomically(self.checkpoint_path(batch_key), write)
        except Exception as problem:  # noqa: BLE001 - a checkpoint is an optimisation, never a failure
            warn(f"cannot write the checkpoint {self.checkpoint_path(batch_key)}: {_one_line(problem)}; "
                 "the batch goes on without it")
            return False
        return True

    def read_checkpoint(self, batch_key: str) -> bytes | None:
        try:
            with self.filesystem.open_input_stream(self.checkpoint_path(batch_key)) as stream:
                return stream.read()
        except (FileNotFoundError, OSError):
            return None

    def delete_checkpoint(self, batch_key: str) -> None:
        """Delete the batch's checkpoint and its metric segments."""
        with contextlib.suppress(FileNotFoundError, OSError):
            self.filesystem.delete_file(self.checkpoint_path(batch_key))
        self.delete_segments(batch_key)

    def write_segment(self, batch_key: str, name: str, metrics: pa.Table) -> bool:
        """Write one metric segment of a checkpointed batch atomically (a metrics-schema table).

        Never raises (as write_checkpoint): a segment that cannot be written warns and returns
        False; the caller then writes no checkpoint naming it.
        """
        if not metrics.schema.equals(TABLES["metrics"], check_metadata=False):
            raise ValueError("a metric segment must have the metrics schema (build it with schema.metrics_table)")
        path = self.segment_path(batch_key, name)
        try:
            self._write_atomically(path, lambda p: pq.write_table(metrics, p, filesystem=self.filesystem))
        except Exception as problem:  # noqa: BLE001 - a checkpoint is an optimisation, never a failure
            warn(f"cannot write the metric segment {path}: {_one_line(problem)}; the batch goes on without "
                 "this checkpoint")
            return False
        return True

    def list_segments(self, batch_key: str) -> list[str]:
        """Names of the batch's metric segments on storage (listed or not by its checkpoint)."""
        return sorted(info.base_name[: -len(".parquet")] for info in self._files(self.segment_dir(batch_key))
                      if info.base_name.endswith(".parquet"))

    def read_segment(self, batch_key: str, name: str) -> pa.Table | None:
        """A metric segment's rows, or None when it is missing or cannot be read (the checkpoint is then not used)."""
        try:
            table = pq.read_table(self.segment_path(batch_key, name), filesystem=self.filesystem)
        except UNREADABLE:
            return None
        return table if table.schema.equals(TABLES["metrics"], check_metadata=False) else None

    def delete_segments(self, batch_key: str, keep: tuple[str, ...] | list[str] = ()) -> None:
        """Delete the batch's metric segments except `keep` (the folder too when none is kept)."""
        if not keep:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.filesystem.delete_dir(self.segment_dir(batch_key))
            return
        for name in set(self.list_segments(batch_key)) - set(keep):
            with contextlib.suppress(FileNotFoundError, OSError):
                self.filesystem.delete_file(self.segment_path(batch_key, name))

    def checkpoint_keys(self) -> list[str]:
        """Batch keys that have a checkpoint."""
        return sorted(
            info.base_name[: -len(".ckpt")]
            for info in self._files(f"{self.base}/checkpoints")
            if info.base_name.endswith(".ckpt")
        )

    def aside_path(self, path: str, suffix: str = CORRUPT_SUFFIX) -> str:
        """Where `set_aside` keeps a file of this sweep: `<sweep>/_corrupt/<its path below the sweep><suffix>`
        (a folder no reader of the tables looks into: pyarrow and DuckDB skip names starting with `_`)."""
        prefix = self.base.rstrip("/") + "/"
        relative = path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[1]
        return f"{self.base}/{CORRUPT_FOLDER}/{relative}{suffix}"

    def set_aside(self, path: str, reason: str, suffix: str = CORRUPT_SUFFIX, note: str = "its batch reruns") -> None:
        """Move a damaged file to `aside_path` (kept for inspection, invisible to readers) with one
        warning line; when it cannot be moved (read-only results) warn and leave it, readers skip it."""
        target = self.aside_path(path, suffix)
        try:
            if self.filesystem.get_file_info(target).type != pafs.FileType.NotFound:
                target = f"{target}-{uuid.uuid4().hex[:8]}"
            self.filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
            self.filesystem.move(path, target)
        except OSError as problem:
            warn(f"{path} cannot be read ({reason}) nor moved aside ({_one_line(problem)}); skipping it")
            return
        warn(f"{path} cannot be read ({reason}); moved to {target}; {note}")

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

    def _parquet_files(self, table: str) -> list[pafs.FileInfo]:
        """The table's Parquet files (not temporary ones, nor files set aside)."""
        return [info for info in self._files(self.table_dir(table)) if info.path.endswith(".parquet")]

    def dataset(self, table: str) -> ds.Dataset | None:
        """The table as a pyarrow dataset (hive partitioning), or None if nothing is written."""
        files = [info.path for info in self._parquet_files(table)]
        if not files:
            return None
        return ds.dataset(files, schema=TABLES[table], format="parquet", filesystem=self.filesystem)

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table | None:
        """The table's rows (these columns), or None if nothing is written.

        A file that cannot be read (or does not have the table's schema) is set aside with a
        warning (`set_aside`) and the rest is read: one damaged file never stops a reader.
        """
        dataset = self.dataset(table)
        if dataset is None:
            return None
        try:
            return dataset.to_table(columns=columns)
        except UNREADABLE:
            pass  # find the damaged files (the fast path above reads them all at once)
        parts = []
        for path in dataset.files:
            try:  # as the fast path reads it (an older schema version's missing columns are null)
                single = ds.dataset([path], schema=TABLES[table], format="parquet", filesystem=self.filesystem)
                part = single.to_table(columns=columns)
            except DAMAGED as problem:
                self.set_aside(path, _one_line(problem))
                continue
            except UNREADABLE as problem:  # an I/O error: skip the file now, leave it in place
                warn(f"{path} cannot be read now ({_one_line(problem)}); skipping it")
                continue
            parts.append(part)
        return pa.concat_tables(parts) if parts else None

    def completed_runs(self) -> dict[str, RunRecord]:
        """run_key -> its record, for every run with a row in the runs table (complete or diverged)."""
        table = self.read("runs", ["run_key", "status", "batch_key"])
        if table is None:
            return {}
        return {
            key: RunRecord(status, batch)
            for key, status, batch in zip(
                *(table[c].to_pylist() for c in ("run_key", "status", "batch_key")), strict=True
            )
        }

    def duplicate_run_keys(self) -> list[str]:
        """Run keys with more than one runs row (always empty unless two drivers raced)."""
        table = self.read("runs", ["run_key"])
        if table is None:
            return []
        keys = table["run_key"].to_pylist()
        seen: set[str] = set()
        return sorted({k for k in keys if k in seen or seen.add(k)})

    def batches_without_metrics(self) -> list[str]:
        """Batch keys with a runs file but no metrics file.

        ccn never leaves one (the metrics file is written first, and a damaged one is set aside
        with its runs file), but a metrics file deleted or moved outside ccn does: its runs still
        count as done, without curves (`ccn status` warns; delete the runs file to rerun them).
        A run without metrics rows in an existing file (diverged before its first log point) is
        normal and not listed.
        """
        runs = {self._relative(info.path, "runs") for info in self._parquet_files("runs")}
        metrics = {self._relative(info.path, "metrics") for info in self._parquet_files("metrics")}
        return sorted(path.rsplit("/", 1)[1][: -len(".parquet")] for path in runs - metrics)

    def failures(self) -> list[dict[str, Any]]:
        """Failure records of batches that gave up (a later success deletes its record)."""
        records = []
        for info in self._files(f"{self.base}/failures"):
            if info.path.endswith(".json"):
                try:
                    with self.filesystem.open_input_stream(info.path) as stream:
                        record = json.loads(stream.read())
                    if not isinstance(record, dict) or not record.keys() >= FAILURE_KEYS:
                        raise ValueError("not a failure record")
                except ValueError as problem:
                    self.set_aside(info.path, _one_line(problem), note="its runs count as missing")
                    continue
                except OSError as problem:
                    warn(f"{info.path} cannot be read now ({_one_line(problem)}); skipping it")
                    continue
                records.append(record)
        return records

    def _footer_problem(self, path: str) -> str | None:
        """Why a Parquet file's footer cannot be read (None when it can): catches empty, truncated
        and garbage files with one small read."""
        try:
            pq.read_metadata(path, filesystem=self.filesystem)
        except DAMAGED as problem:
            return _one_line(problem)
        except UNREADABLE:  # an I/O error says nothing about the file: leave it
            return None
        return None

    def set_aside_damaged_metrics(self) -> int:
        """Set aside every metrics file whose footer cannot be read, and its runs file (so the batch
        reruns); returns how many batches. Only safe while no other driver writes this sweep."""
        runs = {self._relative(info.path, "runs"): info.path for info in self._parquet_files("runs")}
        paired = [
            (info.path, runs[relative])
            for info in self._parquet_files("metrics")
            if (relative := self._relative(info.path, "metrics")) in runs
        ]
        threads = 1 if self.filesystem.type_name == "local" else 16  # object stores: one request each
        with ThreadPoolExecutor(threads) as pool:
            problems = list(pool.map(lambda pair: self._footer_problem(pair[0]), paired))
        damaged = 0
        for (metrics_path, runs_path), problem in zip(paired, problems, strict=True):
            if problem is None:
                continue
            self.set_aside(metrics_path, problem, note="its batch reruns (its runs file is set aside too)")
            with contextlib.suppress(OSError):
                target = self.aside_path(runs_path, SUPERSEDED_SUFFIX)
                self.filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
                self.filesystem.move(runs_path, target)
            damaged += 1
        return damaged

    def remove_orphans(self) -> int:
        """Set aside damaged metrics files (and their runs files), then delete metrics files without
        a runs file, checkpoints of complete batches and leftover temporary files; returns how many.

        Only safe while no other driver writes this sweep: run it holding the sweep's lease
        (orchestrator.lease).
        """
        self.read("runs", ["run_key"])  # sets aside damaged runs files (their batches rerun)
        self.set_aside_damaged_metrics()
        runs = {self._relative(info.path, "runs") for info in self._parquet_files("runs")}
        removed = 0
        for info in self._parquet_files("metrics"):
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
