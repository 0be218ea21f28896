"""Percentile bootstrap confidence intervals over seeds (vectorised numpy, seeded)."""

from __future__ import annotations

import dataclasses

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over seeds with its percentile bootstrap interval; n: seeds behind it."""

    mean: float
    low: float
    high: float
    n: int
    paired: bool | None = None  # for differences: resampled by matching seed (True) or independently

    def format(self, digits: int = 4) -> str:
        if self.n == 0 or not np.isfinite(self.mean):
            return "-"
        return f"{self.mean:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"


EMPTY = Interval(float("nan"), float("nan"), float("nan"), 0)


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of `resamples` resamples with replacement of values[seeds, ...] -> [resamples, ...]."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(values), size=(resamples, len(values)))  # [resamples, seeds]
    return values[index].mean(axis=1)


def _interval(values: np.ndarray, means: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return np.asarray(values).mean(axis=0), low, high


def bootstrap_ci(values, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean of values[seeds] with its percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return EMPTY
    mean, low, high = _interval(values, bootstrap_means(values, resamples, seed), level)
    return Interval(float(mean), float(low), float(high), len(values))


def bootstrap_curve(values, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0):
    """values[seeds, points] -> (mean[points], low[points], high[points])."""
    values = np.asarray(values, dtype=np.float64)
    return _interval(values, bootstrap_means(values, resamples, seed), level)


def bootstrap_difference(
    a: dict[int, float], b: dict[int, float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> Interval:
    """mean(a) - mean(b) for per-seed values {seed: value}, with its bootstrap interval.

    Paired by seed (resampling the per-seed differences) when the two share at least two seeds,
    using only the shared seeds; otherwise each side is resampled independently. n: seeds used
    (shared seeds when paired, the smaller side otherwise).
    """
    shared = sorted(a.keys() & b.keys())
    if len(shared) >= 2:
        differences = np.array([a[s] - b[s] for s in shared])
        mean, low, high = _interval(differences, bootstrap_means(differences, resamples, seed), level)
        return Interval(float(mean), float(low), float(high), len(shared), paired=True)
    if not a or not b:
        return EMPTY
    values_a, values_b = np.array(list(a.values())), np.array(list(b.values()))
    means = bootstrap_means(values_a, resamples, seed) - bootstrap_means(values_b, resamples, seed + 1)
    mean, low, high = _interval(np.array([values_a.mean() - values_b.mean()]), means, level)
    return Interval(
        float(mean[()] if np.ndim(mean) else mean), float(low), float(high), min(len(a), len(b)), paired=False
    )
