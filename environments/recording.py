"""Recorded Atari prediction streams: the file format, the cache, and replay.

This module is the one place that knows the recording schema. A recording is one Parquet
file (zstd-compressed), one row per stream step:

    frame        fixed_size_binary(256)   16 x 16 grayscale screen as 256 uint8 bytes, row-major
    action       int8      index in the game's minimal action set; -1 on a reset step
    raw_reward   int32     the emulator's reward for this step (0 on a reset step)
    cumulant     float32   raw_reward clipped to [-1, 1]
    gamma        float32   discount of this step: 0 on a reset step and on the stream's first step
    true_return  float32   G_t = sum_{i>=1} (prod_{j=1}^{i-1} gamma_{t+j}) cumulant_{t+i}; NaN when unknown

plus key/value metadata (JSON values) in the Parquet schema: format_version, game, rom_id,
policy, policy_sha256, ale_py_version, ale_seed, seed, length, gamma, episodes_finished, ...

Replay turns rows into device-ready `StreamStep`s: observation float32 [n, 275] =
[frame / 256 (256 values), one-hot action (18 slots), cumulant (1)], cumulant/gamma/true_return [n].
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from environments.core import StreamStep

FORMAT_VERSION = 1
FRAME_SIDE = 16
FRAME_SIZE = FRAME_SIDE * FRAME_SIDE  # 256
ACTION_SLOTS = 18  # the full ALE action set; a minimal set never has more
OBSERVATION_SIZE = FRAME_SIZE + ACTION_SLOTS + 1  # 275
RESET_ACTION = -1  # `action` value of a reset step
CACHE_DIR_ENV = "CCN_CACHE_DIR"
_PIXEL_SCALE = np.float32(1.0 / 256.0)  # exact power of two: frame / 256 == frame * _PIXEL_SCALE


# --------------------------------------------------------------------------- returns


def future_returns(cumulant: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """True returns of a stream, computed backward: G_t = c_{t+1} + gamma_{t+1} * G_{t+1}.

    cumulant, gamma: [T]. Returns float32 [T].

    A step with gamma 0 starts a new episode (a reset step), so it cuts the sum: the last step
    of a finished episode, just before a reset step r, gets G = c_r (0: reset steps carry no
    reward), and nothing of the next episode leaks in. Steps from the last reset step on belong
    to an episode that has not finished: their G is NaN.
    """
    cumulant = np.asarray(cumulant, dtype=np.float64)
    gamma = np.asarray(gamma, dtype=np.float64)
    returns = np.full(cumulant.shape, np.nan, dtype=np.float64)
    following = np.nan  # G_{t+1}
    for t in range(len(cumulant) - 2, -1, -1):
        next_gamma = gamma[t + 1]
        following = cumulant[t + 1] if next_gamma == 0.0 else cumulant[t + 1] + next_gamma * following
        returns[t] = following
    return returns.astype(np.float32)


# --------------------------------------------------------------------------- in memory


@dataclass(frozen=True, eq=False)
class Recording:
    """A recorded stream held in host memory (arrays are read-only and shared).

    frames [T, 256] uint8, action [T] int8 (-1 = reset), raw_reward [T] int32,
    cumulant / gamma / true_return [T] float32, metadata: dict of JSON values.
    """

    frames: np.ndarray
    action: np.ndarray
    raw_reward: np.ndarray
    cumulant: np.ndarray
    gamma: np.ndarray
    true_return: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        length = len(self.action)
        for name in ("frames", "raw_reward", "cumulant", "gamma", "true_return"):
            if len(getattr(self, name)) != length:
                raise ValueError(f"Recording column {name!r} has {len(getattr(self, name))} rows, "
                                 f"action has {length}")
        if self.frames.shape[1:] != (FRAME_SIZE,):
            raise ValueError(f"Recording frames must be [T, {FRAME_SIZE}], got {self.frames.shape}")
        if length and int(self.action.max(initial=RESET_ACTION)) >= ACTION_SLOTS:
            raise ValueError(f"Recording action index {int(self.action.max())} >= {ACTION_SLOTS} slots")

    def __len__(self) -> int:
        return len(self.action)

    @property
    def game(self) -> str:
        return str(self.metadata.get("game", "?"))

    def observations(self, start: int, stop: int) -> np.ndarray:
        """Observations of steps [start, stop): float32 [stop - start, 275]."""
        frames = self.frames[start:stop]
        action = self.action[start:stop]
        observation = np.zeros((len(action), OBSERVATION_SIZE), dtype=np.float32)
        np.multiply(frames, _PIXEL_SCALE, out=observation[:, :FRAME_SIZE], casting="unsafe")
        acted = np.flatnonzero(action != RESET_ACTION)
        observation[acted, FRAME_SIZE + action[acted].astype(np.intp)] = 1.0
        observation[:, OBSERVATION_SIZE - 1] = self.cumulant[start:stop]
        return observation

    def chunk(self, start: int, stop: int) -> StreamStep:
        """Steps [start, stop) as a StreamStep of fresh numpy arrays with a leading time axis."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"chunk [{start}, {stop}) outside the recording of {len(self)} steps")
        return StreamStep(
            observation=self.observations(start, stop),
            cumulant=self.cumulant[start:stop].copy(),
            gamma=self.gamma[start:stop].copy(),
            true_return=self.true_return[start:stop].copy(),
        )

    def episode_bounds(self) -> list[tuple[int, int]]:
        """[start, stop) of every finished episode (the stream's first step opens the first one)."""
        resets = np.flatnonzero(self.action == RESET_ACTION).tolist()
        starts = [0, *resets]
        return [(begin, end) for begin, end in zip(starts[:-1], starts[1:], strict=True) if end > begin]

    def episode_scores(self) -> list[int]:
        """Raw score (sum of unclipped rewards) of every finished episode, in order."""
        return [int(self.raw_reward[begin:end].sum()) for begin, end in self.episode_bounds()]


# --------------------------------------------------------------------------- on disk


def _schema(metadata: dict[str, Any]) -> pa.Schema:
    return pa.schema(
        [
            ("frame", pa.binary(FRAME_SIZE)),  # 256 uint8 bytes: fast to read, unlike a list<uint8>
            ("action", pa.int8()),
            ("raw_reward", pa.int32()),
            ("cumulant", pa.float32()),
            ("gamma", pa.float32()),
            ("true_return", pa.float32()),
        ],
        metadata={key: json.dumps(value) for key, value in metadata.items()},
    )


def write_recording(path: str | os.PathLike, recording: Recording) -> Path:
    """Write `recording` to `path` atomically (temporary file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**recording.metadata, "format_version": FORMAT_VERSION, "length": len(recording)}
    frames = np.ascontiguousarray(recording.frames, dtype=np.uint8)
    frame_column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(FRAME_SIZE), len(frames),
                                                        [None, pa.py_buffer(frames.tobytes())])
    table = pa.Table.from_arrays(
        [
            frame_column,
            pa.array(np.asarray(recording.action, dtype=np.int8)),
            pa.array(np.asarray(recording.raw_reward, dtype=np.int32)),
            pa.array(np.asarray(recording.cumulant, dtype=np.float32)),
            pa.array(np.asarray(recording.gamma, dtype=np.float32)),
            pa.array(np.asarray(recording.true_return, dtype=np.float32)),
        ],
        schema=_schema(metadata),
    )
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        pq.write_table(table, temporary, compression="zstd", row_group_size=1 << 16)
        os.chmod(temporary, 0o644)  # a cache others may read (mkstemp creates files 0600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _read_recording(path: Path) -> Recording:
    table = pq.read_table(path)
    raw_metadata = table.schema.metadata or {}
    metadata = {key.decode(): json.loads(value) for key, value in raw_metadata.items()}
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: recording format version {version!r}, this code reads "
                         f"{FORMAT_VERSION}; delete the file (it is a cache) and record again")

    def column(name: str, dtype: type) -> np.ndarray:
        values = table.column(name).combine_chunks()
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=dtype)

    frame_column = table.column("frame").combine_chunks()
    if frame_column.type != pa.binary(FRAME_SIZE):
        raise ValueError(f"{path}: column 'frame' is {frame_column.type}, expected "
                         f"fixed_size_binary[{FRAME_SIZE}]; delete the file (it is a cache) and record again")
    if frame_column.null_count:
        raise ValueError(f"{path}: {frame_column.null_count} frames are missing (null)")
    frames = np.frombuffer(frame_column.buffers()[1], dtype=np.uint8, count=len(frame_column) * FRAME_SIZE,
                           offset=frame_column.offset * FRAME_SIZE)
    recording = Recording(
        frames=frames.reshape(-1, FRAME_SIZE),
        action=column("action", np.int8),
        raw_reward=column("raw_reward", np.int32),
        cumulant=column("cumulant", np.float32),
        gamma=column("gamma", np.float32),
        true_return=column("true_return", np.float32),
        metadata=metadata,
        path=path,
    )
    for name in ("frames", "action", "raw_reward", "cumulant", "gamma", "true_return"):
        getattr(recording, name).setflags(write=False)
    return recording


_LOADED: dict[tuple[str, int, int], Recording] = {}
_LOADED_LOCK = threading.Lock()


def load_recording(path: str | os.PathLike) -> Recording:
    """Load a recording, once per process: later calls for the same unchanged file share it."""
    path = Path(path).resolve()
    status = path.stat()
    key = (str(path), status.st_mtime_ns, status.st_size)
    with _LOADED_LOCK:
        recording = _LOADED.get(key)
        if recording is None:
            recording = _read_recording(path)
            for stale in [other for other in _LOADED if other[0] == key[0]]:
                del _LOADED[stale]
            _LOADED[key] = recording
    return recording


def forget_loaded_recordings() -> None:
    """Drop the in-process cache of loaded recordings (frees their memory once unreferenced)."""
    with _LOADED_LOCK:
        _LOADED.clear()


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """Where recordings are cached: $CCN_CACHE_DIR/atari, else ~/.cache/ccn-sweeps/atari."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root).expanduser() / "atari"
    return Path.home() / ".cache" / "ccn-sweeps" / "atari"


def cache_key(inputs: dict[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of everything that determines a recording."""
    canonical = json.dumps({**inputs, "format_version": FORMAT_VERSION}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------- replay


def replay(
    recording: Recording | str | os.PathLike,
    chunk_steps: int,
    *,
    start: int = 0,
    stop: int | None = None,
    device: Any = None,
) -> Iterator[StreamStep]:
    """Yield steps [start, stop) of a recording as StreamSteps of `chunk_steps` steps each.

    Every chunk has observation float32 [n, 275] and cumulant / gamma / true_return [n];
    the last chunk may be shorter. With `device` (a jax.Device) each chunk is put on it.
    """
    if chunk_steps <= 0:
        raise ValueError(f"chunk_steps must be positive, got {chunk_steps}")
    if not isinstance(recording, Recording):
        recording = load_recording(recording)
    stop = len(recording) if stop is None else stop
    for begin in range(start, stop, chunk_steps):
        chunk = recording.chunk(begin, min(begin + chunk_steps, stop))
        if device is not None:
            import jax

            chunk = jax.device_put(chunk, device)
        yield chunk


def checked_step_count(num_steps: int) -> int:
    """num_steps as an int; ValueError unless it is a non-negative integer (bools rejected)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 0:
        raise ValueError(f"take: num_steps must be a non-negative integer, got {num_steps!r}")
    return int(num_steps)


class EndOfStream(IndexError):
    """Raised by `take` when a recorded stream has fewer steps left than asked for."""


class RecordedStream:
    """Host-side stream over a recording (environments.core.HostStream): `take(n)` returns the next n steps.

    take(n) -> StreamStep(observation [n, 275] float32, cumulant / gamma / true_return [n] float32)
    continuing where the previous take stopped. Past the end it raises EndOfStream, unless the
    stream was made with wrap=True (then it starts again at step 0, whose gamma is 0).
    """

    observation_size = OBSERVATION_SIZE

    def __init__(self, recording: Recording, *, wrap: bool = False) -> None:
        if len(recording) == 0:
            raise ValueError("cannot stream an empty recording")
        self.recording = recording
        self.wrap = wrap
        self.position = 0  # index of the next step take() returns (modulo length when wrapping)
        self.steps_taken = 0

    def __len__(self) -> int:
        return len(self.recording)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.recording.metadata

    @property
    def remaining(self) -> int | None:
        """Steps left before the end (None when wrapping: unlimited)."""
        return None if self.wrap else len(self.recording) - self.position

    def take(self, num_steps: int) -> StreamStep:
        """The next num_steps steps as a StreamStep of numpy arrays with a leading time axis [n]."""
        n = checked_step_count(num_steps)
        length = len(self.recording)
        if not self.wrap and self.position + n > length:
            raise EndOfStream(
                f"the recorded {self.recording.game} stream has {length:,} steps; {self.position:,} "
                f"were taken and {n:,} more were asked for. Record more frames, or make the stream "
                f"with wrap=True to start again from its first step."
            )
        pieces = []
        remaining = n
        while remaining > 0 or not pieces:
            stop = min(self.position + remaining, length)
            pieces.append(self.recording.chunk(self.position, stop))
            remaining -= stop - self.position
            self.position = stop % length if self.wrap else stop
        self.steps_taken += n
        if len(pieces) == 1:
            return pieces[0]
        return StreamStep(*(np.concatenate(parts) for parts in zip(*pieces, strict=True)))

    def seek(self, steps_taken: int) -> None:
        """Continue as if `steps_taken` steps had been taken since the start (resuming a checkpoint)."""
        length = len(self.recording)
        if steps_taken < 0 or (not self.wrap and steps_taken > length):
            raise EndOfStream(f"cannot seek to step {steps_taken:,} of a {length:,}-step recorded stream")
        self.position = steps_taken % length if self.wrap else steps_taken
        self.steps_taken = steps_taken

    def reset(self) -> None:
        """Go back to the stream's first step."""
        self.position = 0
        self.steps_taken = 0
