"""Batch checkpoints: a running batch's whole state at a chunk boundary, as one file.

A checkpoint holds everything needed to continue a batch exactly where it was: the carry of
every run (learner state, device-stream state, on-device metric reducers, finite flags; leaves
[padded batch, ...] and the shared step counter), the host-side bookkeeping (steps done, each
run's divergence step, the metric rows logged so far, the compute seconds spent) and the
position of a replayed (recorded) stream. Since every run is seeded and the compiled program is
the same, a resumed batch ends with exactly the results of an uninterrupted one.

Format: an uncompressed NumPy .npz: arrays `leaf_<i>` (the carry's leaves in tree order) and
`diverged_at`, plus `header`, a JSON document (batch key, run keys, padded size, steps done,
stream position, the carry's tree structure, metric rows). Stored by the results store
(orchestrator.results) under `<sweep>/checkpoints/<batch_key>.ckpt`. No Ray here.
"""

from __future__ import annotations

import io
import json
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
    except (OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"not a readable checkpoint: {error}") from None
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


def resumable_batches(store) -> list[tuple[list[str], int]]:
    """(run keys, padded size) of every readable checkpoint in a ResultsStore (for planning)."""
    found = []
    for batch_key in store.checkpoint_keys():
        data = store.read_checkpoint(batch_key)
        if data is None:
            continue
        try:
            checkpoint = decode(data)
        except ValueError:
            continue
        found.append((checkpoint.run_keys, checkpoint.padded_size))
    return found
