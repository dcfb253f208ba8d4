"""Every projection over the recorded logs in ``fixtures/``, compared with syrupy snapshots.

The logs are audit exports (``events/export.py``) that ``ops/make_fixtures.py`` recorded
through the real engine. They are history: they are read as they are, their hash chain
is verified, and each projection of the state they fold to (at the end, and halfway) is
compared with the committed snapshot. ``now`` is fixed: a minute after the last event.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import pytest

from events.codec import decode_event
from events.envelope import Recorded
from events.export import row_from_export
from events.log import verify_rows
from events.types import JobDispatched
from projections.fold import apply, fold
from projections.state import QueueState
from projections.views import DAY, avg_wait_seconds, gpu_allocation, snapshot, stats
from service import scheduler

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LOGS = ["busy_day.jsonl", "approval_day.jsonl", "restart.jsonl"]


@cache
def recorded(name: str) -> tuple[Recorded, ...]:
    """The fixture's events, after checking its hash chain."""
    lines = (FIXTURES / name).read_bytes().splitlines()
    rows = [row_from_export(msgspec.json.decode(line)) for line in lines]
    assert verify_rows(rows) == len(rows)
    return tuple(
        Recorded(seq=seq, at=at, actor=actor, correlation_id=corr, causation_id=cause,
                 event=decode_event(type_, data), data=data, hash=digest)
        for seq, at, type_, actor, corr, cause, data, digest in rows
    )


def cut(name: str, point: str) -> tuple[QueueState, float]:
    """The state folded up to ``point`` (``end`` or ``half``) and the ``now`` to view it at."""
    records = recorded(name)
    until = len(records) if point == "end" else len(records) // 2
    return fold(records[:until]), records[until - 1].at + 60.0


def pending_order(state: QueueState, now: float) -> list[dict[str, Any]]:
    return [
        {
            "position": scheduler.position(state, job, now),
            "job_id": job.job_id,
            "user_id": job.user_id,
            "team_id": job.team_id,
            "effective_priority": scheduler.job_effective_priority(job, now, state.settings),
            "queued_at": job.queued_at,
            "num_processes": job.spec.num_processes,
        }
        for job in scheduler.pending_in_order(state, now)
    ]


def explanations(state: QueueState, now: float) -> dict[str, scheduler.Explanation]:
    waiting = [job_id for job_id, job in state.jobs.items()
               if job.status in ("pending", "blocked")]
    return {job_id: scheduler.explain(state, job_id, now) for job_id in waiting}


PROJECTIONS = {
    "snapshot": lambda state, now: snapshot(state),
    "stats": stats,
    "gpu_allocation": lambda state, now: gpu_allocation(state),
    "pending_order": pending_order,
    "explain": explanations,
}


# every projection at the end of each log; all but the (large) full snapshot halfway too
CASES = [
    pytest.param(name, point, projection, id=f"{name}-{point}-{projection}")
    for name in LOGS
    for point in ("half", "end")
    for projection in sorted(PROJECTIONS)
    if point == "end" or projection != "snapshot"
]


@pytest.mark.parametrize(("name", "point", "projection"), CASES)
def test_projection_of_a_recorded_log(
    name: str, point: str, projection: str, snapshot_json: Any
) -> None:
    state, now = cut(name, point)
    assert PROJECTIONS[projection](state, now) == snapshot_json


@pytest.mark.parametrize("name", LOGS)
def test_the_recorded_logs_are_what_they_claim(name: str) -> None:
    """Guards against a fixture that quietly lost what it is there to show."""
    records = recorded(name)
    types = {r.type for r in records}
    state, _ = cut(name, "end")
    assert {"job.submitted", "job.dispatched", "job.completed", "job.failed"} <= types
    assert len({r.at for r in records}) < len(records)  # some commits hold many events
    if name == "busy_day.jsonl":
        assert len(state.users) >= 8 and len({u.team_id for u in state.users.values()}) >= 3
        assert sum(r.type == "job.submitted" for r in records) >= 200
        assert {"job.cancelled", "job.priority_changed", "job.requeued",
                "queue.settings_changed", "queue.entries_purged"} <= types
    if name == "approval_day.jsonl":
        reasons = {r.event.reason for r in records if r.type == "job.rejected"}  # type: ignore[union-attr]
        assert "approval expired" in reasons and len(reasons) >= 3
        assert "job.approved" in types
    if name == "restart.jsonl":
        errors = {r.event.error for r in records if r.type == "job.failed"}  # type: ignore[union-attr]
        assert "process lost while the server was down" in errors
        # a job that ended while the server was down ended then, not when it was learned
        (late,) = [r for r in records if getattr(r.event, "ended_at", None) is not None]
        assert late.event.ended_at < late.at  # type: ignore[union-attr]
        assert state.jobs[late.event.job_id].completed_at == late.event.ended_at  # type: ignore[union-attr]


@pytest.mark.parametrize("name", LOGS)
def test_avg_wait_is_the_mean_over_the_entries_of_jobs_started_in_the_last_day(
    name: str,
) -> None:
    """SPEC 7's formula read straight off the job entries, at every instant of the log:
    a re-queued job counts once, with the start it has now (or not at all, while it waits
    again)."""
    records = recorded(name)
    state = QueueState()
    requeued_jobs_started_again = 0
    for record in records:
        apply(state, record)
        if record.type == "job.dispatched" and record.event.attempt > 1:  # type: ignore[union-attr]
            requeued_jobs_started_again += 1
        for now in (record.at, record.at + 3600.0, record.at + DAY - 1.0, record.at + DAY + 1.0):
            waits = [job.started_at - job.queued_at for job in state.jobs.values()
                     if job.started_at is not None and job.started_at >= now - DAY]
            expected = sum(waits) / len(waits) if waits else None
            got = avg_wait_seconds(state, now)
            assert got == pytest.approx(expected, abs=1e-6), f"at seq {record.seq}, now {now}"
    assert requeued_jobs_started_again > 0  # the log shows the case this test is about


@pytest.mark.parametrize("name", LOGS)
def test_folding_event_by_event_equals_folding_the_whole_log(name: str) -> None:
    records = recorded(name)
    one_by_one = QueueState()
    for record in records:
        apply(one_by_one, record)
    half = len(records) // 2
    in_two_parts = fold(records[half:], fold(records[:half]))
    whole = snapshot(fold(records))
    assert snapshot(one_by_one) == whole == snapshot(in_two_parts)


@pytest.mark.parametrize("name", LOGS)
def test_every_recorded_pass_is_what_the_scheduler_decides_today(name: str) -> None:
    """Re-run ``decide`` on the state before each recorded pass: same jobs, same GPUs."""
    records = recorded(name)
    state = QueueState()
    passes = 0
    index = 0
    while index < len(records):
        record = records[index]
        if not isinstance(record.event, JobDispatched):
            apply(state, record)
            index += 1
            continue
        group = [record]
        while (index + len(group) < len(records)
               and isinstance(records[index + len(group)].event, JobDispatched)
               and records[index + len(group)].causation_id == record.causation_id):
            group.append(records[index + len(group)])
        decided = scheduler.decide(state, record.at)
        assert decided == [r.event for r in group], f"pass at seq {record.seq}"
        for dispatch in group:
            apply(state, dispatch)
        index += len(group)
        passes += 1
    assert passes > 10


@pytest.mark.parametrize("name", LOGS)
def test_a_copy_of_the_state_folds_on_alone(name: str) -> None:
    """The engine's working copy: folding into the copy leaves the original as it was."""
    records = recorded(name)
    half = len(records) // 2
    original = fold(records[:half])
    before = snapshot(original)
    twin = original.copy()
    assert snapshot(twin) == before
    for record in records[half:]:
        apply(twin, record)  # one by one: the pending index is live, as in the engine
    assert snapshot(twin) == snapshot(fold(records))
    assert snapshot(original) == before
    assert snapshot(fold(records[half:], original)) == snapshot(twin)
