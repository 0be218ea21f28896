"""Reference levels of a sweep's tasks: the error of predicting 0 and of predicting the mean return.

Computed from each task's own stream (environments.reference), rebuilt from the `task_kind` and
`task_params` the runs recorded: animal-learning tasks over REFERENCE_SEEDS seeds x min(the runs'
steps, REFERENCE_STEPS) steps (cached on disk), Atari over its whole recording. A learner whose
error is not below `predict_mean` predicts no better than a constant.
"""

from __future__ import annotations

import dataclasses
import json

from analysis.results import Results

REFERENCE_SEEDS = 16
REFERENCE_STEPS = 100_000
IDENTITY_ONLY = ("policy_sha256",)  # task_params keys that identify a run but are no environment parameter


@dataclasses.dataclass(frozen=True)
class TaskLevels:
    """One task's reference levels (None with `problem` saying why when they could not be computed)."""

    task: str
    predict_zero: float | None
    predict_mean: float | None
    samples: int = 0
    source: str = ""  # what stream they were computed on, for people
    problem: str | None = None

    @property
    def known(self) -> bool:
        return self.predict_mean is not None


def reference_levels(
    results: Results, *, seeds: int = REFERENCE_SEEDS, max_steps: int = REFERENCE_STEPS, cache_dir=None
) -> dict[str, TaskLevels]:
    """task -> its TaskLevels, for every task of the results. Never raises for a task: a stream that
    cannot be built (e.g. Atari without its policy files) gives levels with a `problem`."""
    rows = results.sql(
        """SELECT task, any_value(task_kind), any_value(task_params), max(steps), count(DISTINCT task_params)
           FROM runs GROUP BY task ORDER BY task"""
    ).fetchall()
    return {
        task: _task_levels(task, kind, params, steps, variants, seeds, max_steps, cache_dir)
        for task, kind, params, steps, variants in rows
    }


def _task_levels(task, kind, params_json, steps, variants, seeds, max_steps, cache_dir) -> TaskLevels:
    if variants > 1:
        return TaskLevels(task, None, None, problem=f"its runs record {variants} different task parameter sets")
    try:
        import environments
        from environments.reference import cached_task_reference_levels
        from environments.reference import reference_levels as from_returns

        params = {k: v for k, v in json.loads(params_json or "{}").items() if k not in IDENTITY_ONLY}
        if environments.task_kind(kind).device:
            length = max(1, min(int(steps or max_steps), max_steps))
            levels = cached_task_reference_levels(kind, seeds=seeds, steps=length, cache_dir=cache_dir, **params)
            source = f"{seeds} seeds x {length:,} steps of the task's stream"
        else:
            stream = environments.task_kind(kind).host_stream(params)
            recording = getattr(stream, "recording", None)
            returns = recording.true_return if recording is not None else stream.take(max_steps).true_return
            levels = from_returns(returns)
            source = "the task's recording" if recording is not None else f"{max_steps:,} steps of the task's stream"
    except Exception as error:  # noqa: BLE001 (any failure to build a stream: say why, keep the report)
        return TaskLevels(task, None, None, problem=f"{type(error).__name__}: {error}")
    return TaskLevels(task, levels.predict_zero, levels.predict_mean, levels.samples, source)


def describe(levels: TaskLevels, fmt) -> str:
    """One line for people: 'task: predict 0 = ..., predict mean = ... (source)'; fmt formats a number."""
    if not levels.known:
        return f"{levels.task}: reference levels not available ({levels.problem})"
    return (
        f"{levels.task}: predict 0 = {fmt(levels.predict_zero)}, predict the mean return = "
        f"{fmt(levels.predict_mean)} (the error of a constant prediction; {levels.source})"
    )
