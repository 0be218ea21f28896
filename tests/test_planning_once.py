"""Planning reads checkpoint headers only, and `run_sweep` reads the results once (issue 15, item 2)."""

from __future__ import annotations

import io
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from orchestrator import api, checkpoint
from orchestrator.plan import batch_key_of
from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec

SPEC = """
name = "once"
steps = 400
seeds = [0, 1]
log_every = 200

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:200"
step_size = [0.01, 0.003]
"""


def spec_path(tmp_path: Path) -> Path:
    path = tmp_path / "once.toml"
    path.write_text(textwrap.dedent(SPEC))
    return path


class CountingFile:
    """A file that counts the bytes read through it (pyarrow NativeFile underneath)."""

    def __init__(self, file, counter: dict):
        self.file, self.counter = file, counter

    def read(self, size=None):
        data = self.file.read() if size is None or size < 0 else self.file.read(size)
        self.counter["bytes"] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


class CountingFileSystem:
    """A real pyarrow filesystem whose input files and streams count the bytes read."""

    def __init__(self, filesystem):
        self.filesystem, self.counter = filesystem, {"bytes": 0, "opened": 0}

    def open_input_file(self, path):
        self.counter["opened"] += 1
        return CountingFile(self.filesystem.open_input_file(path), self.counter)

    def open_input_stream(self, path):
        self.counter["opened"] += 1
        return CountingFile(self.filesystem.open_input_stream(path), self.counter)

    def __getattr__(self, name):
        return getattr(self.filesystem, name)


def a_checkpoint(run_keys: list[str], padded_size: int, megabytes: float = 0.01) -> checkpoint.Checkpoint:
    leaf = np.arange(int(megabytes * 2**20 / 4), dtype=np.float32)
    return checkpoint.Checkpoint(
        batch_key=batch_key_of(run_keys), run_keys=run_keys, padded_size=padded_size, steps_done=200,
        structure="tree", leaves=[leaf, np.zeros((padded_size, 3))], diverged_at=np.full(padded_size, -1),
    )


def test_planning_reads_the_header_of_a_large_checkpoint_not_its_arrays(tmp_path):
    store = ResultsStore(str(tmp_path / "results"), "once")
    saved = a_checkpoint(["run-a", "run-b"], padded_size=4, megabytes=8)
    store.write_checkpoint(saved.batch_key, checkpoint.encode(saved))
    size = os.path.getsize(store.checkpoint_path(saved.batch_key))
    assert size > 8 * 2**20

    store.filesystem = CountingFileSystem(store.filesystem)
    assert checkpoint.resumable_batches(store) == [(["run-a", "run-b"], 4)]
    assert store.filesystem.counter["opened"] == 1
    assert 0 < store.filesystem.counter["bytes"] < 64 * 1024, store.filesystem.counter  # < 1% of the file
    header = checkpoint.read_header(store, saved.batch_key)
    assert header["batch_key"] == saved.batch_key and header["steps_done"] == 200
    assert checkpoint.decode(store.read_checkpoint(saved.batch_key)).leaves[0].shape == saved.leaves[0].shape


def test_unreadable_checkpoints_are_set_aside_and_the_readable_ones_planned(tmp_path, capsys):
    store = ResultsStore(str(tmp_path / "results"), "once")
    good = a_checkpoint(["run-a", "run-b"], padded_size=2)
    store.write_checkpoint(good.batch_key, checkpoint.encode(good))
    whole = checkpoint.encode(a_checkpoint(["run-c"], padded_size=1, megabytes=0.1))
    other = a_checkpoint(["run-d"], padded_size=1)

    def npz(header, **arrays) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, header=np.frombuffer(header, np.uint8), leaf_0=np.zeros(1000), **arrays)
        return buffer.getvalue()

    header = {"format": checkpoint.FORMAT, "batch_key": "6" * 32, "run_keys": 7, "padded_size": 1}
    npy = Path(tmp_path / "array.npy")
    np.save(npy, np.zeros(8))
    damaged = {
        "1" * 32: b"",  # empty
        "2" * 32: whole[: len(whole) // 2],  # truncated
        "3" * 32: b"PK\x03\x04" + os.urandom(2000),  # garbage that starts like a zip
        "4" * 32: b"PK",  # shorter than a zip's end record
        "5" * 32: checkpoint.encode(other),  # another batch's checkpoint under this name
        "6" * 32: npz(json.dumps(header).encode()),  # run_keys is not a list
        "7" * 32: npy.read_bytes(),  # an .npy, not an .npz
        "8" * 32: npz(json.dumps({**header, "batch_key": "8" * 32, "run_keys": ["a", "b"]}).encode()),  # padded 1
        "9" * 32: npz(b"{not json"),
        "a" * 32: npz(b"[]"),  # JSON, not a header
    }
    for key, data in damaged.items():
        store.write_checkpoint(key, data)
    capsys.readouterr()

    assert checkpoint.resumable_batches(store) == [(["run-a", "run-b"], 2)]
    err = capsys.readouterr().err
    for key in damaged:
        path = store.checkpoint_path(key)
        [line] = [line for line in err.splitlines() if path in line]
        assert line.startswith("ccn: warning:") and "cannot be read" in line and "its batch starts over" in line
        assert not os.path.exists(path) and os.path.exists(store.aside_path(path))
    assert "it holds batch" in err and "run_keys is not a list" in err and "padded_size 1 is not a size" in err
    assert store.checkpoint_keys() == [good.batch_key]
    assert checkpoint.resumable_batches(store) == [(["run-a", "run-b"], 2)] and not capsys.readouterr().err


def test_plan_keeps_a_checkpointed_batch_whole_from_its_header(tmp_path):
    spec = spec_path(tmp_path)
    runs = load_spec(spec).runs
    kept = [runs[3].run_key, runs[1].run_key]
    store = ResultsStore(str(tmp_path / "results"), "once")
    saved = a_checkpoint(kept, padded_size=3)
    store.write_checkpoint(saved.batch_key, checkpoint.encode(saved))
    plan = api.plan_sweep(spec, str(tmp_path / "results"), workers=4, batch_size=1)
    assert [[run.run_key for run in batch.runs] for batch in plan.batches if len(batch.runs) > 1] == [kept]
    assert sorted(len(batch.runs) for batch in plan.batches) == [1, 1, 2]
    again = plan.recut(workers=1, accelerator="cpu")
    assert again.batches[0].padded_size == 3 and again.done == plan.done and again.todo == plan.todo


@pytest.fixture
def counted(monkeypatch):
    """Count ResultsStore.completed_runs and checkpoint.resumable_batches calls (the real ones run)."""
    calls = {"completed_runs": 0, "resumable_batches": 0}
    completed_runs, resumable_batches = ResultsStore.completed_runs, checkpoint.resumable_batches

    def counting_completed_runs(self):
        calls["completed_runs"] += 1
        return completed_runs(self)

    def counting_resumable_batches(store):
        calls["resumable_batches"] += 1
        return resumable_batches(store)

    monkeypatch.setattr(ResultsStore, "completed_runs", counting_completed_runs)
    monkeypatch.setattr(checkpoint, "resumable_batches", counting_resumable_batches)
    monkeypatch.setattr(api, "resumable_batches", counting_resumable_batches)
    return calls


def test_run_sweep_reads_the_results_and_checkpoints_once(tmp_path, counted, monkeypatch):
    import ray

    assert not ray.is_initialized()
    monkeypatch.setenv("CCN_JAX_CACHE_DIR", str(tmp_path / "jax_cache"))
    spec, results = spec_path(tmp_path), str(tmp_path / "results")
    report = api.run_sweep(spec, results, workers=1, batch_size=2, progress=False)
    assert report.ok and report.ran == 4 and report.already_done == 0
    assert counted == {"completed_runs": 1, "resumable_batches": 1}
    assert not ray.is_initialized()  # the embedded Ray it started is stopped

    report = api.run_sweep(spec, results, workers=1, progress=False)  # nothing left: no Ray at all
    assert report.ok and report.ran == 0 and report.already_done == 4
    assert counted == {"completed_runs": 2, "resumable_batches": 2}
