"""Damaged storage: an unreadable runs, metrics or checkpoint file is set aside and its batch reruns.

Each case damages three files of one kind (one empty, one truncated, one garbage), then
`ccn plan`, `ccn status` and `ccn run` must go on: one warning line per damaged file, the file
kept as `<sweep>/_corrupt/<path>.corrupt`, and the sweep ends complete with every run exactly once. A results
folder made read-only mid-sweep (a tmpfs remounted read-only: root ignores chmod) stops the
driver with one clear error and keeps everything already written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from orchestrator import api, cli
from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec

SPEC = """
name = "faults"
steps = 2000
seeds = [0, 1, 2]
log_every = 500
checkpoint_every = 1000
batch_size = 1

[[tasks]]
kind = "trace_patterning"

[[learners]]
kind = "ccn"
shape = "4:2:500"
step_size = [0.01]
"""
LOG_POINTS = 4


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import ray

    os.environ["CCN_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    os.environ.pop("CCN_JAX_CACHE_DIR", None)


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(np.random.default_rng(0).integers(0, 256, max(len(data), 64), dtype=np.uint8).tobytes())


def assert_exactly_once(results: Path, spec: Path) -> None:
    sweep = load_spec(spec)
    runs = duckdb.sql(f"SELECT run_key FROM read_parquet('{results}/faults/runs/**/*.parquet')").fetchall()
    assert sorted(key for (key,) in runs) == sorted(run.run_key for run in sweep.runs)  # each once
    count, distinct, keys = duckdb.sql(
        f"SELECT count(*), count(DISTINCT (run_key, step)), count(DISTINCT run_key) "
        f"FROM read_parquet('{results}/faults/metrics/**/*.parquet')"
    ).fetchall()[0]
    assert count == distinct == len(sweep.runs) * LOG_POINTS and keys == len(sweep.runs)
    status = api.sweep_status(spec, str(results))
    assert (status.complete, status.missing, status.failed, status.duplicates) == (len(sweep.runs), 0, 0, [])
    assert status.batches_without_metrics == []


@pytest.fixture(scope="module")
def finished(local_ray, tmp_path_factory) -> Path:
    """A finished sweep's results, copied by each test that damages them."""
    folder = tmp_path_factory.mktemp("finished")
    spec = folder / "faults.toml"
    spec.write_text(textwrap.dedent(SPEC))
    assert api.run_sweep(spec, str(folder / "results"), progress=False).ok
    return folder / "results"


@pytest.mark.parametrize("table", ["runs", "metrics", "checkpoints"])
def test_damaged_files_are_set_aside_and_their_batches_rerun(finished, tmp_path, capsys, table):
    spec = tmp_path / "faults.toml"
    spec.write_text(textwrap.dedent(SPEC))
    results = tmp_path / "results"
    shutil.copytree(finished, results)
    store = ResultsStore(str(results), "faults")
    parquet = sorted((results / "faults" / ("metrics" if table == "metrics" else "runs")).glob("**/*.parquet"))
    assert len(parquet) == 3
    if table == "checkpoints":  # three unfinished batches, each with a damaged checkpoint
        damaged = []
        for runs_file in parquet:
            batch_key = runs_file.stem
            runs_file.unlink()
            [metrics_file] = (results / "faults" / "metrics").glob(f"**/{batch_key}.parquet")
            metrics_file.unlink()
            checkpoint = Path(store.checkpoint_path(batch_key))
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_bytes(b"PK\x03\x04" + os.urandom(2000))
            damaged.append(checkpoint)
    else:
        damaged = parquet
    for path, how in zip(damaged, ("empty", "truncated", "garbage"), strict=True):
        damage(path, how)
    capsys.readouterr()

    assert cli.main(["plan", str(spec), "--results", str(results)]) == 0
    assert cli.main(["status", str(spec), "--results", str(results)]) == 0
    assert cli.main(["run", str(spec), "--results", str(results), "--quiet"]) == 0
    out, err = capsys.readouterr()
    for path in damaged:
        warnings = [line for line in err.splitlines() if line.startswith("ccn: warning:") and str(path) in line]
        assert len(warnings) == 1, err  # one line naming it
        aside = Path(store.aside_path(str(path)))
        assert aside.name == path.name + ".corrupt" and aside.is_relative_to(results / "faults" / "_corrupt")
        assert "cannot be read" in warnings[0] and f"moved to {aside}" in warnings[0]
        assert aside.exists()  # kept for inspection, out of the readers' way (the rerun wrote `path` anew)
    assert "3 ran now" in out, out
    assert_exactly_once(results, spec)
    assert not list((results / "faults" / "checkpoints").glob("*.ckpt"))
    if table == "metrics":  # the damaged files' runs files went aside too (their batches reran)
        assert len(list((results / "faults" / "_corrupt" / "runs").glob("**/*.parquet.superseded"))) == 3
    import analysis

    loaded = analysis.load(str(results), "faults")  # readers of whole folders skip what was set aside
    assert loaded is not None


def test_a_report_reads_around_damaged_files_it_finds_before_ccn_status(finished, tmp_path, capsys):
    import analysis

    results = tmp_path / "results"
    shutil.copytree(finished, results)
    runs_files = sorted((results / "faults" / "runs").glob("**/*.parquet"))
    metrics_files = sorted((results / "faults" / "metrics").glob("**/*.parquet"))
    damage(runs_files[0], "truncated")
    damage(metrics_files[1], "garbage")
    capsys.readouterr()
    loaded = analysis.load(str(results), "faults")
    err = capsys.readouterr().err
    for path in (runs_files[0], metrics_files[1]):
        assert len([line for line in err.splitlines() if line.startswith("ccn: warning:") and str(path) in line]) == 1
    assert loaded.runs().count("*").fetchall()[0][0] == 2  # the readable runs, nothing made up


def test_failed_checkpoint_writes_and_failure_records_only_warn(tmp_path, capsys):
    store = ResultsStore(str(tmp_path), "faults")
    (tmp_path / "faults").mkdir()
    (tmp_path / "faults" / "checkpoints").write_text("a file where a folder is expected")
    (tmp_path / "faults" / "failures").write_text("a file where a folder is expected")
    assert store.write_checkpoint("k" * 16, b"state") is False
    assert store.record_failure("k" * 16, ["a"], 3, "boom") is False
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("ccn: warning: cannot") for line in err)
    assert "the batch goes on" in err[0] and "next run retries them" in err[1]


def test_local_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import orchestrator.results as results_module

    synced = []
    real = results_module._fsync_local
    monkeypatch.setattr(results_module, "_fsync_local", lambda p, directory=False: synced.append((p, directory)) or
                        real(p, directory))
    store = ResultsStore(str(tmp_path), "faults")
    store.write_checkpoint("abc", b"state")
    [(file, file_is_folder), (folder, folder_is_folder)] = synced
    assert (file_is_folder, folder_is_folder) == (False, True)
    assert Path(file).name.startswith(".abc.ckpt.") and file.endswith(".tmp")  # the temporary, before the rename
    assert folder == str(tmp_path / "faults" / "checkpoints")


# -- read-only results mid-sweep ----------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of our own (remountable read-only; root ignores chmod), unmounted at the end."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.timeout(600)
def test_results_made_read_only_mid_sweep_stop_the_driver_and_keep_what_was_written(local_ray, tmpfs, tmp_path):
    import ray

    spec = tmp_path / "faults.toml"
    spec.write_text(textwrap.dedent(SPEC).replace("steps = 2000", "steps = 20000").replace("[0, 1, 2]", "[0, 1, 2, 3]"))
    results = tmpfs / "results"
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "CCN_LEASE_EXPIRY": "4", "WANDB_MODE": "disabled"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", str(results), "--address", address,
         "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    runs_dir = results / "faults" / "runs"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None and not list(runs_dir.glob("**/*.parquet")):
            time.sleep(0.05)
        written = {p: p.read_bytes() for p in (results / "faults").glob("*/**/*.parquet")}
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert written and driver.returncode == 1, out + err
    [stop] = [line for line in err.splitlines() if line.startswith("ccn: the sweep stopped")]
    assert "Read-only file system" in stop and "everything written before is kept" in stop, err
    assert "Traceback" not in err
    for path, data in written.items():  # nothing already written was lost
        assert path.read_bytes() == data

    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    report = api.run_sweep(spec, str(results), progress=False, takeover=True, lease_expiry=4)
    assert report.ok and report.already_done >= len([p for p in written if "/runs/" in str(p)])
    total = len(load_spec(spec).runs)
    keys = duckdb.sql(f"SELECT run_key FROM read_parquet('{results}/faults/runs/**/*.parquet')").fetchall()
    assert len(keys) == len(set(keys)) == total
