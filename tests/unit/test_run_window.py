"""The fold keeps run lengths so wait estimates need no walk of every job ever recorded."""

from __future__ import annotations

from events.types import JobCompleted, JobDispatched, JobFailed, JobRequeued, JobSpec, JobSubmitted
from projections.fold import apply_event
from projections.state import QueueState
from projections.views import DAY, mean_run_seconds

SPEC = JobSpec(config_name="train", command=("python", "train.py"), num_processes=0)


def run(state: QueueState, job_id: str, start: float, end: float, *, fails: bool = False) -> None:
    seq = state.last_seq
    if job_id not in state.jobs:
        apply_event(state, JobSubmitted(job_id=job_id, user_id=1, spec=SPEC, priority=10),
                    seq + 1, start)
        seq += 1
    apply_event(state, JobDispatched(job_id=job_id, attempt=1), seq + 1, start)
    if fails:
        apply_event(state, JobFailed(job_id=job_id, error="lost", retryable=True), seq + 2, end)
        apply_event(state, JobRequeued(job_id=job_id, attempt=2, reason="lost"), seq + 3, end)
    else:
        apply_event(state, JobCompleted(job_id=job_id, exit_code=0), seq + 2, end)


def test_mean_run_covers_the_runs_that_ended_in_the_last_day() -> None:
    state = QueueState()
    assert mean_run_seconds(state, now=0.0) is None
    run(state, "old", start=0.0, end=1000.0)            # ended more than a day before `now`
    run(state, "a", start=DAY, end=DAY + 100.0)
    run(state, "b", start=DAY + 100.0, end=DAY + 400.0, fails=True)  # a retried attempt
    run(state, "b", start=DAY + 400.0, end=DAY + 500.0)
    now = DAY + 1000.0 + 1.0
    assert mean_run_seconds(state, now) == (100.0 + 300.0 + 100.0) / 3
    assert mean_run_seconds(state, now=3 * DAY) is None
