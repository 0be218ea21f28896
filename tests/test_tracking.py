"""W&B tracking: `ccn run --wandb offline` writes one offline run per batch inside the results tree,
with the batch's summaries, and never writes the API key anywhere."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import pytest

from orchestrator import cli, tracking

FAKE_KEY = "ccnfakekey" + "0123456789abcdef" * 2 + "zz"  # 44 characters, like a real key

SPEC = """
name = "wandb-test"
steps = 2000
seeds = [0]
log_every = 1000
batch_size = 2

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:500"
step_size = [0.01, 0.003]
"""


def read_offline_run(run_dir: Path, history: list | None = None):
    """The run record, config and final summary of an offline run's .wandb file (a LevelDB-style log);
    the logged rows (history) are appended to `history` when given. W&B's service may still be
    writing the file when `finish` returns: it is read again until it holds the exit record."""
    import time

    (path,) = run_dir.glob("*.wandb")
    deadline = time.monotonic() + 20
    while True:
        rows: list[dict] = []
        run, config, summary, finished = parse_offline_run(path.read_bytes(), rows)
        if finished or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert run is not None and finished
    if history is not None:
        history.extend(rows)
    return run, config, summary


def parse_offline_run(data: bytes, history: list):
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    run, config, summary, finished = None, {}, {}, False
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind not in (1, 4):  # FULL or LAST completes a record
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        pending = b""
        if record.HasField("run"):
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif record.HasField("history"):
            row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append({key: value for key, value in row.items() if not key.startswith("_")})  # no timestamps
        elif record.HasField("summary"):
            for item in record.summary.update:
                key = item.key or ".".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
        elif record.HasField("exit"):
            finished = True
    return run, config, summary, finished


def files_under(*roots: Path):
    for root in roots:
        if root.exists():
            yield from (path for path in root.rglob("*") if path.is_file())


def test_default_mode_is_opt_in_and_the_same_for_the_api_and_the_cli(monkeypatch):
    import inspect

    from orchestrator import api

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert tracking.default_mode() == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracking.default_mode() == "disabled"  # a key alone never sends a sweep anywhere
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.default_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking.default_mode() == "offline"
    assert tracking.Tracker.start("disabled", "results", "x") is None
    # `ccn run` and api.run_sweep both leave the choice to default_mode()
    assert inspect.signature(api.run_sweep).parameters["wandb"].default is None
    assert cli.build_parser().parse_args(["run", "x.toml"]).wandb is None


def table_of(run_dir: Path, name: str) -> dict:
    (path,) = (run_dir / "files" / "media" / "table").glob(f"{name}_*.table.json")
    return json.loads(path.read_text())


def test_offline_sweep_logs_from_the_actors_reply_and_never_the_key(tmp_path, monkeypatch, capsys):
    """One W&B run per batch, logged from the actor's reply: the batch's Parquet files are moved
    away before the tracker's thread gets the batch, and it still logs everything. `ccn wandb-sync`
    (which reads the Parquet) logs the same content. The API key is never written."""
    work = tmp_path / "work"
    home = tmp_path / "home"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("CCN_JAX_CACHE_DIR", str(tmp_path / "jax_cache"))
    spec = work / "sweep.toml"
    spec.write_text(textwrap.dedent(SPEC))
    results = work / "results"
    aside = tmp_path / "aside"
    moved: list[tuple[Path, Path]] = []
    batch_done = tracking.Tracker.batch_done

    def files_moved_first(self, batch, summary=None):  # in the driver, before the tracker's thread runs
        for table in ("runs", "metrics"):
            path = Path(self.store.batch_path(table, batch.learner, batch.task, batch.batch_key))
            target = aside / table / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            moved.append((target, path))
        batch_done(self, batch, summary)

    monkeypatch.setattr(tracking.Tracker, "batch_done", files_moved_first)
    code = cli.main(["run", str(spec), "--results", str(results), "--workers", "1", "--wandb", "offline"])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert len(moved) == 2 and "not logged" not in output.err
    monkeypatch.setattr(tracking.Tracker, "batch_done", batch_done)
    for target, path in moved:
        target.rename(path)

    wandb_root = results / "wandb-test" / "wandb"
    run_dirs = sorted((wandb_root / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1  # 2 runs in one batch of 2: one W&B run
    run_dir = run_dirs[0]
    assert list(run_dir.glob("*.wandb")), "no offline run file to sync"
    history: list[dict] = []
    run, config, summary = read_offline_run(run_dir, history)
    assert run.run_group == "wandb-test" and run.job_type == "ccn"
    assert config["sweep"] == "wandb-test" and config["task_kind"] == "trace_patterning"
    assert config["learner.total_columns"] == 4 and config["steps"] == 2000
    assert summary["run_count"] == 2 and summary["diverged"] == 0
    assert 0 < summary["best_final_error"] <= summary["median_final_error"] < 1
    assert not any(key.startswith("error/") and key[6:] not in ("min", "median", "max", "runs") for key in summary)
    curve = [row for row in history if "error/median" in row]  # the batch's curve: one row per log point
    assert [row["learner_step"] for row in curve] == [1000, 2000]
    assert all(row["error/min"] <= row["error/median"] <= row["error/max"] and row["error/runs"] == 2 for row in curve)
    table = table_of(run_dir, "runs")
    assert "run_key" in table["columns"] and "final_error" in table["columns"] and "step_size" in table["columns"]
    assert len(table["data"]) == 2 and all(row[-1] is not None for row in table["data"])
    finals = sorted(row[-1] for row in table["data"])
    assert curve[-1]["error/min"] == finals[0] and curve[-1]["error/max"] == finals[1]  # the last point: final errors
    assert table_of(run_dir, "curves")["columns"] == ["step", "min", "median", "max", "runs"]

    # the driver recorded the batch as logged: a sync afterwards logs nothing again
    marker = list((wandb_root / "logged" / "offline").glob("*.json"))
    assert len(marker) == 1
    assert cli.main(["wandb-sync", str(spec), "--results", str(results), "--wandb", "offline"]) == 0
    assert "0 batches logged now, 1 were already logged" in capsys.readouterr().out
    assert len(list((wandb_root / "wandb").glob("offline-run-*"))) == 1

    # logged again from the Parquet files (`sync`, marker deleted): the same content
    marker[0].unlink()
    assert cli.main(["wandb-sync", str(spec), "--results", str(results), "--wandb", "offline"]) == 0
    assert "1 batches logged now" in capsys.readouterr().out
    [again] = set((wandb_root / "wandb").glob("offline-run-*")) - {run_dir}
    synced: list[dict] = []
    _, _, synced_summary = read_offline_run(again, synced)
    assert table_of(again, "runs")["data"] == table["data"]
    assert table_of(again, "curves")["data"] == table_of(run_dir, "curves")["data"]
    assert [row for row in synced if "error/median" in row] == curve
    for name in ("run_count", "diverged", "best_final_error", "median_final_error", "wall_seconds"):
        assert synced_summary[name] == summary[name]

    key = FAKE_KEY.encode()
    leaked = [path for path in files_under(work, home, tmp_path) if key in path.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"
    assert FAKE_KEY not in output.out + output.err


def test_batch_digest_is_the_row_by_row_reading(tmp_path):
    """tracking.batch_digest (columnar) against a plain reading of the same rows: rows out of order,
    a diverged run, a null value, an even and an odd number of runs at a log point; both of its
    ways (a [log points, runs] grid, and sorting) give the same."""
    import math
    import statistics

    import pyarrow as pa

    runs = pa.table({
        "run_key": ["a", "b", "c", "d"], "seed": [0, 1, 2, 3],
        "status": ["complete", "diverged", "complete", "complete"],
        "diverged_at_step": [None, 150, None, None], "wall_seconds": [2.5] * 4,
    })  # fmt: skip
    rows = [  # (run, step, value)
        ("c", 200, 0.30), ("a", 100, 0.9), ("b", 100, 5.0), ("d", 200, 0.10), ("a", 200, 0.20), ("c", 100, 0.7),
        ("d", 100, None), ("b", 200, float("nan")), ("c", 300, 0.25), ("a", 300, 0.15), ("d", 300, 0.05),
    ]  # fmt: skip
    metrics = pa.table({
        "run_key": [r[0] for r in rows], "step": pa.array([r[1] for r in rows], pa.int64()),
        tracking.FINAL_ERROR_METRIC: pa.array([r[2] for r in rows], pa.float64()),
    })  # fmt: skip
    digest = tracking.batch_digest(runs, metrics)
    for layout in (True, False):  # the grid and the sorted computation agree
        other = tracking.batch_digest(runs, metrics, dense=layout)
        assert other.runs.equals(digest.runs) and other.curve.equals(digest.curve), layout

    status = dict(zip(runs["run_key"].to_pylist(), runs["status"].to_pylist(), strict=True))
    last = {key: max((r for r in rows if r[0] == key), key=lambda r: r[1])[2] for key in status}
    expected = [last[key] if status[key] == "complete" else None for key in status]
    assert digest.runs["final_error"].to_pylist() == expected == [0.15, None, 0.25, 0.05]
    assert digest.runs["run_key"].to_pylist() == ["a", "b", "c", "d"] and digest.wall_seconds == 2.5
    assert digest.runs["diverged_at_step"].to_pylist() == [None, 150, None, None]
    curve = []
    for step in sorted({r[1] for r in rows}):
        values = [r[2] for r in rows if r[1] == step and status[r[0]] == "complete" and r[2] is not None]
        values = [v for v in values if not math.isnan(v)]
        curve.append({"step": step, "min": min(values), "median": statistics.median(values), "max": max(values),
                      "runs": len(values)})  # fmt: skip
    assert digest.curve.to_pylist() == curve
    assert curve[0]["runs"] == 2 and curve[0]["median"] == 0.8  # d's null and diverged b left out


def test_the_actors_reply_carries_a_digest_only_for_wandb(tmp_path, monkeypatch):
    """W&B off (BatchWorker's default; run_sweep asks for digests only with a tracker): the reply's
    digest is None and batch_digest is never called; on (run_batches(digest=True)): the reply holds
    batch_digest of the tables the actor wrote. The actor body in-process, on a batch's tables."""
    import types

    import pyarrow as pa

    from orchestrator import schedule

    monkeypatch.setenv("CCN_PIN_CORES", "0")  # never pin the test process to one core
    monkeypatch.setattr(tracking, "batch_digest", counting := _Counting(tracking.batch_digest))
    runs = pa.table({
        "run_key": ["a", "b"], "seed": [0, 1], "status": ["complete", "diverged"], "diverged_at_step": [None, 100],
        "wall_seconds": [1.5, 1.5], "resumed_from_step": pa.array([None, None], pa.int64()),
    })  # fmt: skip
    metrics = pa.table({
        "run_key": ["a", "a", "b"], "step": pa.array([100, 200, 100], pa.int64()),
        tracking.FINAL_ERROR_METRIC: [0.5, 0.25, 9.0],
    })  # fmt: skip
    batch = types.SimpleNamespace(batch_key="e" * 64)
    off = schedule.BatchWorker(str(tmp_path), "wandb-test", None)._summary(batch, runs, 0.0, metrics)
    assert off["runs"] == 2 and off["diverged"] == 1 and off["digest"] is None and counting.calls == 0

    on = schedule.BatchWorker(str(tmp_path), "wandb-test", None, digest=True)._summary(batch, runs, 0.0, metrics)
    assert on["runs"] == 2 and on["diverged"] == 1 and counting.calls == 1
    expected = tracking.batch_digest(runs, metrics)
    assert on["digest"].runs.equals(expected.runs) and on["digest"].curve.equals(expected.curve)
    assert on["digest"].runs["final_error"].to_pylist() == [0.25, None]


class _Counting:
    """A function wrapped to count its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *arguments, **keywords):
        self.calls += 1
        return self.function(*arguments, **keywords)


@pytest.mark.parametrize("mode", ["offline"])
def test_wandb_errors_are_warnings_not_failures(tmp_path, mode):
    tracker = tracking.Tracker(mode, str(tmp_path / "results"), "missing")

    class Fake:
        batch_key = "0" * 64
        learner = "ccn"
        task = "none"

    tracker.batch_done(Fake())  # its files do not exist: a warning, no exception
    with pytest.warns(RuntimeWarning):
        warnings = tracker.close(timeout=10)
    assert warnings and "not logged" in warnings[0]


def test_a_hanging_wandb_never_holds_the_sweep(tmp_path, monkeypatch):
    import threading
    import time
    import types

    release = threading.Event()
    monkeypatch.setattr(tracking.Tracker, "_log", lambda self, batch, digest: release.wait(30))
    tracker = tracking.Tracker("offline", str(tmp_path), "slow")
    started = time.perf_counter()
    for _ in range(3):
        tracker.batch_done(types.SimpleNamespace(batch_key="f" * 64), {"digest": "?"})  # returns at once
    assert time.perf_counter() - started < 0.5
    with pytest.warns(RuntimeWarning, match="did not finish"):
        tracker.close(timeout=1.0)
    assert time.perf_counter() - started < 5
    release.set()
    tracker._thread.join(10)  # before monkeypatch restores the real _log


def test_wandb_sync_logs_every_batch_wandb_missed_exactly_once(tmp_path, monkeypatch, capsys):
    """A sweep run without W&B (as if its driver died with batches queued): `ccn wandb-sync` logs
    each finished batch once, in real offline W&B runs with ids of their own; a second sync logs none."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "home" / name.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("CCN_JAX_CACHE_DIR", str(tmp_path / "jax_cache"))
    spec = tmp_path / "sweep.toml"
    spec.write_text(textwrap.dedent(SPEC).replace("batch_size = 2", "batch_size = 1"))  # 2 batches
    results = tmp_path / "results"
    assert cli.main(["run", str(spec), "--results", str(results), "--workers", "1", "--quiet"]) == 0
    wandb_root = results / "wandb-test" / "wandb"
    assert not wandb_root.exists()  # W&B is opt-in: nothing logged by default

    assert cli.main(["wandb-sync", str(spec), "--results", str(results)]) == 2  # no mode chosen: refused
    assert "--wandb offline" in capsys.readouterr().err
    for expected in ("2 batches logged now, 0 were already logged", "0 batches logged now, 2 were already logged"):
        assert cli.main(["wandb-sync", str(spec), "--results", str(results), "--wandb", "offline"]) == 0
        assert expected in capsys.readouterr().out
    run_dirs = sorted((wandb_root / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2
    records = [read_offline_run(run_dir) for run_dir in run_dirs]
    batch_keys = sorted(config["batch_key"] for _, config, _ in records)
    assert len(set(batch_keys)) == 2  # each batch once
    assert sorted(path.stem for path in (wandb_root / "logged" / "offline").glob("*.json")) == batch_keys
    ids = {run.run_id for run, _, _ in records}
    assert len(ids) == 2 and not ids & set(batch_keys)  # ids of their own, not the batch key
    assert all(summary["run_count"] == 1 for _, _, summary in records)
