"""Batch checkpoints: a running batch's whole state at a chunk boundary, as one file.

A checkpoint holds everything needed to continue a batch exactly where it was: the carry of
every run (learner state, device-stream state, on-device metric reducers and divergence guard; leaves
[padded batch, ...] and the shared step counter), the host-side bookkeeping (steps done, each
run's divergence step, the compute seconds spent, the metric segments logged so far) and the
position of a replayed (recorded) stream. Every run is seeded and the program is the same, so a
batch resumed on the same kind of device (same platform and processor model, same jax/XLA)
ends with exactly (bitwise) the results of an uninterrupted one. The device is not recorded and
not checked: a checkpoint taken on one kind of device resumes on another (a CPU batch on a GPU,
or on a CPU of another generation), and that continuation is correct but compiled differently,
so its numbers may differ from an uninterrupted run's in the last bits, and more after a long
run, as between any two device kinds. The runs row's `device` is the resuming actor's.

Format 2: an uncompressed NumPy .npz: arrays `leaf_<i>` (the carry's leaves in tree order) and
`diverged_at`, plus `header`, a small JSON document (format, batch key, run keys, padded size,
steps done, stream position, compute seconds, the carry's tree structure, segments). Metric rows
are not in the checkpoint: each checkpoint adds one Parquet segment of the rows logged since the
previous one (`<sweep>/checkpoints/<batch_key>.metrics/<first step>-<last step>.parquet`, written
before the checkpoint), and `segments` names those the checkpoint covers (in order), so the bytes
written grow linearly with a run's length and a segment left by a crashed attempt is ignored.
Stored by the results store (orchestrator.results) under `<sweep>/checkpoints/<batch_key>.ckpt`.
A checkpoint of another format is not resumed (its batch starts over). No Ray here.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = 2  # 2: metric rows in Parquet segments beside the checkpoint (1: in the header)


@dataclass
class Checkpoint:
    batch_key: str
    run_keys: list[str]  # the batch's runs, in batch order
    padded_size: int
    steps_done: int
    structure: str  # str(treedef) of the carry: a checkpoint only restores into the same program
    leaves: list[np.ndarray]
    diverged_at: np.ndarray  # [runs] int64
    segments: list[str] = field(default_factory=list)  # metric segments it covers, in step order
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
        "segments": list(checkpoint.segments),
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
            segments=[str(name) for name in header["segments"]],
            stream_position=header["stream_position"],
            compute_seconds=float(header["compute_seconds"]),
        )
    except (OSError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise ValueError(f"not a readable checkpoint: {error}") from None
    except ValueError as error:  # json.JSONDecodeError, pickled data, a bad format
        raise ValueError(f"not a readable checkpoint: {error}") from None


HEADER_DAMAGE = (KeyError, TypeError, AttributeError, IndexError, EOFError, zipfile.BadZipFile, UnicodeDecodeError,
                 ValueError)  # what parsing a damaged .npz or header raises (json.JSONDecodeError is a ValueError)


def read_header(store, batch_key: str) -> dict[str, Any]:
    """The JSON header of the batch's checkpoint in a ResultsStore, read alone (for planning).

    Reads through a random-access file (`store.filesystem.open_input_file`; ranged reads on
    object stores): the zip directory and the `header` member only, never the state arrays, so
    it costs a few KB however large the checkpoint. Checks what planning uses: `batch_key`
    (this batch's), `run_keys` (strings), `padded_size` (>= the runs); other keys are returned
    as stored, unchecked. Raises ValueError for a file that is not a readable checkpoint, OSError
    when it cannot be read now (FileNotFoundError: there is none).
    """
    with store.filesystem.open_input_file(store.checkpoint_path(batch_key)) as file:
        try:
            archive = np.load(file, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with archive:
                header = json.loads(archive["header"].tobytes().decode())
        except OSError:
            raise  # an I/O error says nothing about the file
        except HEADER_DAMAGE as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"not a readable checkpoint: {reason}") from None
    if not isinstance(header, dict) or not isinstance(header.get("batch_key"), str):
        raise ValueError("not a readable checkpoint: no batch key in its header")
    if header["batch_key"] != batch_key:
        raise ValueError(f"it holds batch {header['batch_key'][:12]}")
    run_keys, padded_size = header.get("run_keys"), header.get("padded_size")
    if not isinstance(run_keys, list) or not run_keys or not all(isinstance(key, str) for key in run_keys):
        raise ValueError("its header's run_keys is not a list of run keys")
    if isinstance(padded_size, bool) or not isinstance(padded_size, int) or padded_size < len(run_keys):
        raise ValueError(f"its header's padded_size {padded_size!r} is not a size for {len(run_keys)} runs")
    return header


def resumable_batches(store) -> list[tuple[list[str], int]]:
    """(run keys, padded size) of every readable checkpoint in a ResultsStore (for planning).

    Reads each checkpoint's header only (`read_header`). A checkpoint that cannot be read
    (empty, truncated, garbage) is set aside as `<batch_key>.ckpt.corrupt` with one warning
    line (store.set_aside); its batch starts over. One that cannot be read now (an I/O error)
    is skipped with a warning and left in place.
    """
    found = []
    for batch_key in store.checkpoint_keys():
        try:
            header = read_header(store, batch_key)
        except FileNotFoundError:
            continue  # deleted since it was listed
        except ValueError as problem:
            store.set_aside(store.checkpoint_path(batch_key), str(problem), note="its batch starts over")
            continue
        except OSError as problem:
            from orchestrator.results import warn

            warn(f"{store.checkpoint_path(batch_key)} cannot be read now ({' '.join(str(problem).split())}); "
                 "planning without it")
            continue
        found.append((list(header["run_keys"]), int(header["padded_size"])))
    return found
