"""environments.reference: the error of predicting 0 and of predicting the mean return, from a task's stream."""

from __future__ import annotations

import numpy as np
import pytest

from environments import make
from environments.reference import cached_task_reference_levels, reference_levels, task_reference_levels


def test_reference_levels_of_known_returns_skip_unknown_steps():
    levels = reference_levels([1.0, 3.0, np.nan, 1.0, 3.0])
    assert levels.predict_zero == pytest.approx(5.0)  # mean of 1, 9, 1, 9
    assert levels.predict_mean == pytest.approx(1.0)  # variance around the mean 2
    assert levels.mean_return == pytest.approx(2.0) and levels.samples == 4
    with pytest.raises(ValueError, match="no step has a known true return"):
        reference_levels([np.nan])


def test_device_task_levels_are_those_of_the_runs_own_streams(tmp_path, monkeypatch):
    """Seeds 0..k-1 of the vmapped device stream give exactly the true returns the host stream of each
    run seed gives (float64 sums over both), with list parameters as a spec writes them."""
    params = {"variant": "paper", "isi_range": [8, 12], "iti_range": [30, 50]}
    levels = task_reference_levels("trace_patterning", seeds=2, steps=3_000, **params)
    streams = [make("trace_patterning", seed=s, variant="paper", isi_range=(8, 12), iti_range=(30, 50)) for s in (0, 1)]
    direct = np.concatenate([stream.take(3_000).true_return for stream in streams])
    expected = reference_levels(direct)
    assert levels.samples == expected.samples == 6_000
    assert levels.predict_zero == pytest.approx(expected.predict_zero, rel=1e-9)
    assert levels.predict_mean == pytest.approx(expected.predict_mean, rel=1e-9)
    assert 0 < levels.predict_mean < levels.predict_zero  # the mean return is positive: predicting it beats 0

    monkeypatch.setenv("CCN_CACHE_DIR", str(tmp_path))
    cached = cached_task_reference_levels("trace_patterning", seeds=2, steps=3_000, **params)
    assert cached == levels and len(list((tmp_path / "reference-levels").glob("*.json"))) == 1
    assert cached_task_reference_levels("trace_patterning", seeds=2, steps=3_000, **params) == levels  # from the file
    with pytest.raises(ValueError, match="unknown parameter 'isi'"):
        task_reference_levels("trace_patterning", seeds=1, steps=10, variant="paper", isi=3)


def test_recorded_task_levels_use_the_whole_recording(tmp_path, monkeypatch):
    """Atari (host-only, recorded): every scored step of the recording; steps of the unfinished last
    episode (NaN true return) are skipped, as the msre measure skips them."""
    monkeypatch.setenv("CCN_CACHE_DIR", str(tmp_path))  # the recording's cache
    from environments.atari import make_atari_stream

    levels = task_reference_levels("atari", game="Breakout", policy="random", frames=3_000)
    returns = make_atari_stream("Breakout", "random", frames=3_000, progress=False).recording.true_return
    assert np.isnan(returns).any() and levels.samples == int((~np.isnan(returns)).sum()) > 0
    assert levels == reference_levels(returns)
