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


def read_offline_run(run_dir: Path):
    """The run record, config and final summary of an offline run's .wandb file (a LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    run, config, summary = None, {}, {}
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
        elif record.HasField("summary"):
            for item in record.summary.update:
                key = item.key or ".".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    assert run is not None
    return run, config, summary


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


def test_offline_sweep_writes_one_run_per_batch_and_never_the_key(tmp_path, monkeypatch, capsys):
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

    code = cli.main(["run", str(spec), "--results", str(results), "--workers", "1", "--wandb", "offline"])
    output = capsys.readouterr()
    assert code == 0, output.err

    wandb_root = results / "wandb-test" / "wandb"
    run_dirs = sorted((wandb_root / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1  # 2 runs in one batch of 2: one W&B run
    run_dir = run_dirs[0]
    assert list(run_dir.glob("*.wandb")), "no offline run file to sync"
    run, config, summary = read_offline_run(run_dir)
    assert run.run_group == "wandb-test" and run.job_type == "ccn"
    assert config["sweep"] == "wandb-test" and config["task_kind"] == "trace_patterning"
    assert config["learner.total_columns"] == 4 and config["steps"] == 2000
    assert summary["run_count"] == 2 and summary["diverged"] == 0
    assert 0 < summary["best_final_error"] < 1
    assert sum(key.startswith("error/") for key in summary) == 2  # one learning curve per run
    table_files = list((run_dir / "files" / "media" / "table").glob("runs_*.table.json"))
    assert table_files
    table = json.loads(table_files[0].read_text())
    assert "run_key" in table["columns"] and "final_error" in table["columns"] and "step_size" in table["columns"]
    assert len(table["data"]) == 2 and all(row[-1] is not None for row in table["data"])
    assert list((run_dir / "files" / "media" / "table").glob("curves_*.table.json"))

    # the driver recorded the batch as logged: a sync afterwards logs nothing again
    assert len(list((wandb_root / "logged" / "offline").glob("*.json"))) == 1
    assert cli.main(["wandb-sync", str(spec), "--results", str(results), "--wandb", "offline"]) == 0
    assert "0 batches logged now, 1 were already logged" in capsys.readouterr().out
    assert len(list((wandb_root / "wandb").glob("offline-run-*"))) == 1

    key = FAKE_KEY.encode()
    leaked = [path for path in files_under(work, home, tmp_path) if key in path.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"
    assert FAKE_KEY not in output.out + output.err


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
    monkeypatch.setattr(tracking.Tracker, "_log", lambda self, batch: release.wait(30))
    tracker = tracking.Tracker("offline", str(tmp_path), "slow")
    started = time.perf_counter()
    for _ in range(3):
        tracker.batch_done(types.SimpleNamespace(batch_key="f" * 64))  # returns at once though logging hangs
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
