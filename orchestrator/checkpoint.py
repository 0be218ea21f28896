"""Batch checkpoints: a running batch's whole state at a chunk boundary, as one file.

A checkpoint holds everything needed to continue a batch exactly where it was: the carry of
every run (learner state, device-stream state, on-device metric reducers and divergence guard; leaves
[padded batch, ...] and the shared step counter), the host-side bookkeeping (steps done, each
run's divergence step, the metric rows logged so far, the compute seconds spent) and the
position of a replayed (recorded) stream. Every run is seeded and the program is the same, so a
batch resumed on the same kind of device (same platform and processor model, same jax/XLA)
ends with exactly (bitwise) the results of an uninterrupted one. The device is not recorded and
not checked: a checkpoint taken on one kind of device resumes on another (a CPU batch on a GPU,
or on a CPU of another generation), and that continuation is correct but compiled differently,
so its numbers may differ from an uninterrupted run's in the last bits, and more after a long
run, as between any two device kinds. The runs row's `device` is the resuming actor's.

Format: an uncompressed NumPy .npz: arrays `leaf_<i>` (the carry's leaves in tree order) and
`diverged_at`, plus `header`, a JSON document (batch key, run keys, padded size, steps done,
stream position, the carry's tree structure, metric rows). Stored by the results store
(orchestrator.results) under `<sweep>/checkpoints/<batch_key>.ckpt`. No Ray here.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = 1


@dataclass
class Checkpoint:
    batch_key: str
    run_keys: list[str]  # the batch's runs, in batch order
    padded_size: int
    steps_done: int
    structure: str  # str(treedef) of the carry: a checkpoint only restores into the same program
    leaves: list[np.ndarray]
    diverged_at: np.ndarray  # [runs] int64
    metric_rows: list[dict[str, Any]] = field(default_factory=list)
    stream_position: int | None = None  # steps taken from a replayed stream, None for device streams
    compute_seconds: float = 0.0  # executor seconds spent on the batch before this checkpoint


def encode(checkpoint: Checkpoint) -> bytes:
    header = {
        "format": FORMAT,
        "batch_key": checkpoint.batch_key,
        "run_keys": checkpoint.run_keys,
        "padded_size": checkpoint.padded_size,
        "steps_done": checkpoint.steps_done,
        "structure": checkpoint.structure,
        "metric_rows": checkpoint.metric_rows,
        "stream_position": checkpoint.stream_position,
        "compute_seconds": checkpoint.compute_seconds,
        "leaves": len(checkpoint.leaves),
    }
    arrays = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(checkpoint.leaves)}
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
             diverged_at=np.asarray(checkpoint.diverged_at, np.int64), **arrays)
    return buffer.getvalue()


def decode(data: bytes) -> Checkpoint:
    """Raises ValueError for a file that is not a checkpoint of this format."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            header = json.loads(archive["header"].tobytes().decode())
            if header.get("format") != FORMAT:
                raise ValueError(f"checkpoint format {header.get('format')!r}, expected {FORMAT}")
            leaves = [archive[f"leaf_{i}"] for i in range(header["leaves"])]
            diverged_at = archive["diverged_at"]
        return Checkpoint(
            batch_key=header["batch_key"],
            run_keys=list(header["run_keys"]),
            padded_size=int(header["padded_size"]),
            steps_done=int(header["steps_done"]),
            structure=header["structure"],
            leaves=leaves,
            diverged_at=diverged_at,
            metric_rows=header["metric_rows"],
            stream_position=header["stream_position"],
            compute_seconds=float(header["compute_seconds"]),
        )
    except (OSError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise ValueError(f"not a readable checkpoint: {error}") from None
    except ValueError as error:  # json.JSONDecodeError, pickled data, a bad format
        raise ValueError(f"not a readable checkpoint: {error}") from None


def resumable_batches(store) -> list[tuple[list[str], int]]:
    """(run keys, padded size) of every readable checkpoint in a ResultsStore (for planning).

    A checkpoint that cannot be decoded (empty, truncated, garbage) is set aside as
    `<batch_key>.ckpt.corrupt` with one warning line (store.set_aside); its batch starts over.
    """
    found = []
    for batch_key in store.checkpoint_keys():
        data = store.read_checkpoint(batch_key)
        if data is None:
            continue
        try:
            checkpoint = decode(data)
            if checkpoint.batch_key != batch_key:
                raise ValueError(f"it holds batch {checkpoint.batch_key[:12]}")
        except ValueError as problem:
            store.set_aside(store.checkpoint_path(batch_key), str(problem), note="its batch starts over")
            continue
        found.append((checkpoint.run_keys, checkpoint.padded_size))
    return found
