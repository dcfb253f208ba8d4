"""The fold: ``apply(state, recorded)`` turns one event into the next state.

Folds are total: every member of the event union has exactly one fold function in
``_FOLDS``, and importing this module fails if one is missing. Dispatch is one dict
lookup on the event's exact type rather than a ``match`` over class patterns: each case
a ``match`` passes over is an ``isinstance`` miss, and msgspec's Struct metaclass makes
those slow (a replay of a million events spent more time choosing folds than folding).
The state is updated in place (the engine keeps two copies and swaps them, see
``service/engine.py``), so a fold costs a few dictionary writes per event.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

from events.envelope import Recorded
from events.types import (
    AnyEvent,
    EntriesPurged,
    Event,
    GpuInventoryObserved,
    JobApproved,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobDispatched,
    JobFailed,
    JobPriorityChanged,
    JobRejected,
    JobRequeued,
    JobStarted,
    JobSubmitted,
    SettingsChanged,
    TokenIssued,
    TokenRevoked,
    UserCreated,
    UserUpdated,
)
from projections.state import JobEntry, QueueState, Status, Token, User

__all__ = ["apply", "apply_event", "fold", "fold_batches"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Hold the cyclic garbage collector off while a replay builds the state.

    A replay allocates hundreds of thousands of objects that all live on; the collector
    would walk them again and again for nothing (the state holds no cycles).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def fold(records: Iterable[Recorded], state: QueueState | None = None) -> QueueState:
    """Fold a whole log. The pending index is built once at the end, not per event."""
    triples = ((r.seq, r.at, r.event) for r in records)
    return fold_batches(iter(lambda: list(islice(triples, 4096)), []), state)


def fold_batches(
    batches: Iterable[list[tuple[int, float, AnyEvent]]], state: QueueState | None = None
) -> QueueState:
    """Fold a log read as batches of ``(seq, at, event)`` (``EventLog.batches``)."""
    state = state if state is not None else QueueState()
    state.pending.enabled = False
    folds = _FOLDS
    last = None
    with paused_gc():
        for batch in batches:
            for seq, at, event in batch:
                folds[type(event)](state, event, seq, at)
            if batch:
                last = batch[-1]
        if last is not None:  # no fold reads these, so they are set once, at the end
            state.last_seq, state.last_at, _ = last
        state.pending.rebuild(state.pending_jobs())
    return state


def apply(state: QueueState, recorded: Recorded) -> QueueState:
    """Fold one recorded event into ``state``."""
    apply_event(state, recorded.event, recorded.seq, recorded.at)
    return state


def apply_event(state: QueueState, event: AnyEvent, seq: int, at: float) -> None:
    state.last_seq = seq
    state.last_at = at
    _FOLDS[type(event)](state, event, seq, at)


# ---------------------------------------------------------------- helpers


def _set_status(state: QueueState, job: JobEntry, status: Status) -> None:
    old = job.status
    counts = state.status_counts
    counts[old] -= 1
    counts[status] += 1
    job.status = status
    was_active = old == "pending" or old == "running"
    is_active = status == "pending" or status == "running"
    if was_active != is_active:
        active = state.user_active
        left = active.get(job.user_id, 0) + (1 if is_active else -1)
        if left:
            active[job.user_id] = left
        else:
            active.pop(job.user_id, None)


def _release(state: QueueState, job: JobEntry) -> None:
    """Give back what a running job held."""
    del state.running[job.job_id]
    state.user_running[job.user_id] -= 1
    if job.team_id is not None:
        state.team_running[job.team_id] -= 1
    if job.spec.target == "local":
        state.local_running -= 1
    if job.allocated_gpus:
        holder = state.gpu_holder
        for index in job.allocated_gpus:
            if holder.get(index) == job.job_id:
                del holder[index]


def _leave_queue(state: QueueState, job: JobEntry) -> None:
    """Take a job out of whichever live collection holds it."""
    status = job.status
    if status == "pending":
        state.pending.remove(job)
    elif status == "blocked":
        del state.blocked[job.job_id]
    elif status == "running":
        _release(state, job)


def _finish(state: QueueState, job: JobEntry, status: Status, at: float) -> None:
    if job.status == "running":  # the common end: `_release` and `_set_status`, inlined
        job_id = job.job_id
        user_id = job.user_id
        del state.running[job_id]
        state.user_running[user_id] -= 1
        if job.team_id is not None:
            state.team_running[job.team_id] -= 1
        if job.spec.target == "local":
            state.local_running -= 1
        if job.allocated_gpus:
            holder = state.gpu_holder
            for index in job.allocated_gpus:
                if holder.get(index) == job_id:
                    del holder[index]
        counts = state.status_counts
        counts["running"] -= 1
        counts[status] += 1
        job.status = status  # every end status is inactive
        state.run_end_at.append(at)  # `at` never runs backwards: the list stays sorted
        state.run_sums.append(state.run_sums[-1] + (at - (job.started_at or at)))
        active = state.user_active
        left = active.get(user_id, 0) - 1
        if left:
            active[user_id] = left
        else:
            active.pop(user_id, None)
    else:
        _leave_queue(state, job)
        _set_status(state, job, status)
    job.completed_at = at


# ---------------------------------------------------------------- one fold per event


def _submitted(state: QueueState, event: JobSubmitted, seq: int, at: float) -> None:
    blocked = event.requires_approval
    job = JobEntry(
        job_id=event.job_id,
        user_id=event.user_id,
        team_id=event.team_id,
        spec=event.spec,
        priority=event.priority,
        status="blocked" if blocked else "pending",
        submitted_at=at,
        queued_at=at,
        submit_seq=seq,
        requires_approval=blocked,
        approval_reason=event.approval_reason,
        max_attempts=event.max_attempts,
        metadata=event.metadata,
        idempotency_key=event.idempotency_key,
        request_hash=event.request_hash,
    )
    job_id = event.job_id
    state.jobs[job_id] = job
    if blocked:
        state.status_counts["blocked"] += 1
        state.blocked[job_id] = None
    else:
        state.status_counts["pending"] += 1
        active = state.user_active
        active[event.user_id] = active.get(event.user_id, 0) + 1
        pending = state.pending
        if pending.enabled:
            pending.add(job)
    if event.idempotency_key is not None:
        state.idempotency[(event.user_id, event.idempotency_key)] = job_id


def _dispatched(state: QueueState, event: JobDispatched, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    pending = state.pending
    if job.status == "pending":  # the common start: `_set_status`, inlined
        if pending.enabled:
            pending.remove(job)
        counts = state.status_counts
        counts["pending"] -= 1
        counts["running"] += 1
        job.status = "running"
    else:
        pending.remove(job)
        _set_status(state, job, "running")
    job.started_at = at
    job.allocated_gpus = event.gpus
    job.worker_id = event.worker_id
    job.attempt = event.attempt
    state.running[job.job_id] = None
    user_running = state.user_running
    user_running[job.user_id] = user_running.get(job.user_id, 0) + 1
    team_id = job.team_id
    if team_id is not None:
        team_running = state.team_running
        team_running[team_id] = team_running.get(team_id, 0) + 1
    if job.spec.target == "local":
        state.local_running += 1
    if event.gpus:
        holder = state.gpu_holder
        for index in event.gpus:
            holder[index] = job.job_id
    # The engine never lets `at` run backwards, so these stay sorted.
    state.wait_at.append(at)
    sums = state.wait_sums
    sums.append(sums[-1] + (at - job.queued_at))


def _started(state: QueueState, event: JobStarted, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    job.pid = event.pid
    job.process_start_time = event.process_start_time


def _completed(state: QueueState, event: JobCompleted, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    _finish(state, job, "completed", at)
    job.exit_code = event.exit_code


def _failed(state: QueueState, event: JobFailed, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    _finish(state, job, "failed", at)
    job.exit_code = event.exit_code
    job.error_message = event.error


def _requeued(state: QueueState, event: JobRequeued, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    _leave_queue(state, job)
    _set_status(state, job, "pending")
    job.attempt = event.attempt
    job.error_message = event.reason
    job.allocated_gpus = ()
    job.started_at = None
    job.completed_at = None
    job.exit_code = None
    job.pid = None
    job.process_start_time = None
    job.cancel_requested = False
    state.pending.add(job)


def _cancel_requested(state: QueueState, event: JobCancelRequested, seq: int, at: float) -> None:
    state.jobs[event.job_id].cancel_requested = True


def _cancelled(state: QueueState, event: JobCancelled, seq: int, at: float) -> None:
    _finish(state, state.jobs[event.job_id], "cancelled", at)


def _approved(state: QueueState, event: JobApproved, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    _leave_queue(state, job)
    _set_status(state, job, "pending")
    job.queued_at = at  # it joins the queue when it is approved
    state.pending.add(job)


def _rejected(state: QueueState, event: JobRejected, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    _finish(state, job, "rejected", at)
    job.error_message = event.reason


def _priority_changed(state: QueueState, event: JobPriorityChanged, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    if job.status == "pending":
        state.pending.remove(job)
        job.priority_override = event.priority_override
        state.pending.add(job)
    else:
        job.priority_override = event.priority_override


def _settings_changed(state: QueueState, event: SettingsChanged, seq: int, at: float) -> None:
    state.settings = event.settings


def _entries_purged(state: QueueState, event: EntriesPurged, seq: int, at: float) -> None:
    jobs = state.jobs
    for job_id in event.job_ids:
        job = jobs.pop(job_id)
        state.status_counts[job.status] -= 1
        if job.idempotency_key is not None:
            state.idempotency.pop((job.user_id, job.idempotency_key), None)


def _user_saved(state: QueueState, event: UserCreated | UserUpdated, seq: int, at: float) -> None:
    state.users[event.user_id] = User(
        user_id=event.user_id, name=event.name, level=event.level, team_id=event.team_id
    )


def _token_issued(state: QueueState, event: TokenIssued, seq: int, at: float) -> None:
    state.tokens[event.token_id] = Token(
        token_id=event.token_id, user_id=event.user_id, token_hash=event.token_hash
    )
    state.token_by_hash[event.token_hash] = event.token_id


def _token_revoked(state: QueueState, event: TokenRevoked, seq: int, at: float) -> None:
    token = state.tokens.pop(event.token_id)
    del state.token_by_hash[token.token_hash]


def _inventory_observed(
    state: QueueState, event: GpuInventoryObserved, seq: int, at: float
) -> None:
    state.gpu_backend = event.backend
    state.gpus = event.devices


# ---------------------------------------------------------------- the table

Fold = Callable[[QueueState, Any, int, float], None]


class _FoldTable(dict[type[Event], Fold]):
    def __missing__(self, event_type: type[Event]) -> Fold:
        raise AssertionError(f"no fold for event type {event_type.__name__}")


_FOLDS = _FoldTable({
    JobSubmitted: _submitted,
    JobDispatched: _dispatched,
    JobStarted: _started,
    JobCompleted: _completed,
    JobFailed: _failed,
    JobRequeued: _requeued,
    JobCancelRequested: _cancel_requested,
    JobCancelled: _cancelled,
    JobApproved: _approved,
    JobRejected: _rejected,
    JobPriorityChanged: _priority_changed,
    SettingsChanged: _settings_changed,
    EntriesPurged: _entries_purged,
    UserCreated: _user_saved,
    UserUpdated: _user_saved,
    TokenIssued: _token_issued,
    TokenRevoked: _token_revoked,
    GpuInventoryObserved: _inventory_observed,
})

_unfolded = set(AnyEvent.__args__) - set(_FOLDS)  # type: ignore[attr-defined]
if _unfolded:  # totality: a new event type must come with its fold
    raise ImportError(f"no fold for {sorted(t.__name__ for t in _unfolded)}")
