"""The progress line counts the batch an actor got right after finishing one."""

from __future__ import annotations

import io

from orchestrator.plan import Batch
from orchestrator.progress import Progress
from orchestrator.spec import load_spec


def test_a_finished_batch_is_reported_after_its_actor_got_the_next_one(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(
        'name = "p"\nsteps = 1000\nseeds = 3\n[[tasks]]\nkind = "trace_patterning"\n'
        '[[learners]]\nkind = "ccn"\nshape = "2:2:inf"\nstep_size = 0.01\n'
    )
    batches = [Batch(sweep="p", runs=(run,), padded_size=1) for run in load_spec(spec).runs]
    stream = io.StringIO()  # not a terminal: one line per finished batch
    progress = Progress(3, 3000, stream)
    progress.started(batches[0])
    progress.started(batches[1])
    progress.finished(batches[0], {"runs": 1, "diverged": 0})
    assert stream.getvalue() == ""  # not yet: the freed actor is about to get the next batch
    progress.started(batches[2])
    progress.refresh()
    progress.refresh()  # nothing new: no second line
    [line] = stream.getvalue().splitlines()
    assert "runs 1/3" in line and "running 2" in line
    progress.finished(batches[1], {"runs": 1, "diverged": 0})
    progress.close()
    assert "runs 2/3" in stream.getvalue().splitlines()[-1]


def test_batches_that_give_up_are_counted_and_the_display_goes_on():
    """Progress.failed is a method (a counter of the same name once shadowed it: the driver crashed at
    the first batch that gave up)."""
    from types import SimpleNamespace

    stream = io.StringIO()
    display = Progress(total_runs=6, total_learner_steps=600, stream=stream)
    batch = SimpleNamespace(runs=(1, 2, 3), learner="uoro", task="t", batch_key="ab" * 32, learner_steps=300)
    for _ in range(2):
        display.started(batch)
        display.failed(batch, "TypeError: boom")
    assert display.runs_failed == 6 and display.total_learner_steps == 0
    assert "gave up: TypeError: boom" in stream.getvalue() and "failures 6" in display.line()
