"""The fold: ``apply(state, recorded)`` turns one event into the next state.

What the state holds comes in two kinds:

- *records*: each job's entry (status, times, GPUs, exit code, ...) and the histories
  of waits and run lengths (SPEC section 7's stats), which are what the events say;
- *indexes*: the counts by status, the running set, running jobs per user, team and
  target, the GPU holders, active jobs per user, the blocked set and the pending order.
  Each is a function of the job entries alone, and :func:`_index` / :func:`_unindex`
  are the one place that says how a job counts in them.

A fold function (one per event type, in ``_FOLDS``) updates records only. Folding one
event (:func:`apply_event`, the engine's path) takes the job it touches out of the
indexes, records the event and puts the job back. Folding a whole log
(:func:`fold_batches`, a replay) records every event and then builds the indexes once
from the entries (:func:`index_all`): most events of a long log touch jobs that have
long since ended, and a replay that kept indexes for them would spend most of its time
there.

Folds are total: every member of the event union has exactly one fold function in
``_FOLDS``, and importing this module fails if one is missing. Dispatch is one dict
lookup on the event's exact type rather than a ``match`` over class patterns: each case
a ``match`` passes over is an ``isinstance`` miss, and msgspec's Struct metaclass makes
those slow. The state is updated in place (the engine keeps two copies and swaps them,
see ``service/engine.py``).
"""

from __future__ import annotations

import gc
from bisect import insort
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
from projections.state import STATUSES, JobEntry, QueueState, Status, Token, User

__all__ = ["EventDoesNotFit", "apply", "apply_event", "fold", "fold_batches", "index_all"]


class EventDoesNotFit(Exception):
    """An event that does not agree with the events before it (a job dispatched that was
    never submitted, say). The engine never writes one: only an altered log, read without
    verifying its chain, holds one. ``seq`` names it; ``CAUSES`` are what a fold raises
    on such an event."""

    CAUSES = (KeyError, IndexError, TypeError, ValueError, AttributeError)

    def __init__(self, seq: int, event: AnyEvent, cause: Exception) -> None:
        tag = event.__struct_config__.tag
        super().__init__(f"seq {seq} ({tag}) does not follow from the events before it "
                         f"({type(cause).__name__}: {cause})")
        self.seq = seq


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
    """Fold a whole log (into ``state`` when given)."""
    triples = ((r.seq, r.at, r.event) for r in records)
    return fold_batches(iter(lambda: list(islice(triples, 4096)), []), state)


def fold_batches(
    batches: Iterable[list[tuple[int, float, AnyEvent]]], state: QueueState | None = None
) -> QueueState:
    """Fold a log read as batches of ``(seq, at, event)`` (``EventLog.batches``).

    Events are recorded one by one; the indexes are built once, at the end.
    """
    state = state if state is not None else QueueState()
    folds = _FOLDS
    last = None
    with paused_gc():
        for batch in batches:
            try:
                for seq, at, event in batch:
                    folds[type(event)](state, event, seq, at)
            except EventDoesNotFit.CAUSES as exc:
                raise EventDoesNotFit(seq, event, exc) from exc
            if batch:
                last = batch[-1]
        if last is not None:  # no fold reads these, so they are set once, at the end
            state.last_seq, state.last_at, _ = last
        index_all(state)
    return state


def apply(state: QueueState, recorded: Recorded) -> QueueState:
    """Fold one recorded event into ``state`` (:class:`EventDoesNotFit` if it cannot)."""
    try:
        apply_event(state, recorded.event, recorded.seq, recorded.at)
    except EventDoesNotFit.CAUSES as exc:
        raise EventDoesNotFit(recorded.seq, recorded.event, exc) from exc
    return state


def apply_event(state: QueueState, event: AnyEvent, seq: int, at: float) -> None:
    """Fold one event, keeping the indexes up to date as it goes."""
    state.last_seq = seq
    state.last_at = at
    kind = type(event)
    record = _FOLDS[kind]
    if kind in _MOVES_ITS_JOB:
        job = state.jobs[event.job_id]  # type: ignore[union-attr]
        if kind is JobPriorityChanged and job.status != "pending":
            record(state, event, seq, at)  # a priority places only a pending job
            return
        _unindex(state, job)
        record(state, event, seq, at)
        _index(state, job)
    elif kind is JobSubmitted:
        record(state, event, seq, at)
        _index(state, state.jobs[event.job_id])  # type: ignore[union-attr]
    elif kind is EntriesPurged:
        jobs = state.jobs
        for job_id in event.job_ids:  # type: ignore[union-attr]
            _unindex(state, jobs[job_id])
        record(state, event, seq, at)
    else:
        record(state, event, seq, at)


# ---------------------------------------------------------------- the indexes


def _index(state: QueueState, job: JobEntry) -> None:
    """Count ``job`` in every index, as its entry stands."""
    status = job.status
    state.status_counts[status] += 1
    if status == "pending":
        state.pending.add(job)
        active = state.user_active
        active[job.user_id] = active.get(job.user_id, 0) + 1
    elif status == "running":
        job_id = job.job_id
        user_id = job.user_id
        state.running[job_id] = None
        active = state.user_active
        active[user_id] = active.get(user_id, 0) + 1
        user_running = state.user_running
        user_running[user_id] = user_running.get(user_id, 0) + 1
        team_id = job.team_id
        if team_id is not None:
            team_running = state.team_running
            team_running[team_id] = team_running.get(team_id, 0) + 1
        if job.spec.target == "local":
            state.local_running += 1
        if job.allocated_gpus:
            holder = state.gpu_holder
            for index in job.allocated_gpus:
                holder[index] = job_id
    elif status == "blocked":
        state.blocked[job.job_id] = None


def _unindex(state: QueueState, job: JobEntry) -> None:
    """Take ``job`` out of every index it counts in (:func:`_index` undone)."""
    status = job.status
    state.status_counts[status] -= 1
    if status == "pending":
        state.pending.remove(job)
        _uncount(state.user_active, job.user_id)
    elif status == "running":
        job_id = job.job_id
        user_id = job.user_id
        del state.running[job_id]
        _uncount(state.user_active, user_id)
        _uncount(state.user_running, user_id)
        if job.team_id is not None:
            _uncount(state.team_running, job.team_id)
        if job.spec.target == "local":
            state.local_running -= 1
        if job.allocated_gpus:
            holder = state.gpu_holder
            for index in job.allocated_gpus:
                if holder.get(index) == job_id:
                    del holder[index]
    elif status == "blocked":
        del state.blocked[job.job_id]


def _uncount(counts: dict[Any, int], key: Any) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def index_all(state: QueueState) -> None:
    """Build every index from the job entries (after records were folded without them)."""
    state.status_counts = dict.fromkeys(STATUSES, 0)
    state.blocked = {}
    state.running = {}
    state.user_running = {}
    state.team_running = {}
    state.local_running = 0
    state.user_active = {}
    state.gpu_holder = {}
    pending: list[JobEntry] = []
    running: list[JobEntry] = []
    state.pending.enabled = False  # the pending order is built in one go, below
    for job in state.jobs.values():
        status = job.status
        if status == "running":
            running.append(job)  # indexed below, in the order they started
            continue
        if status == "pending":
            pending.append(job)
        _index(state, job)
    running.sort(key=_started_at)
    for job in running:
        _index(state, job)
    state.pending.rebuild(pending)


def _started_at(job: JobEntry) -> float:
    return job.started_at or 0.0


# ---------------------------------------------------------------- one fold per event
#
# Each records what its event says about the job entry and the histories; the indexes
# are not theirs to touch.


def _submitted(state: QueueState, event: JobSubmitted, seq: int, at: float) -> None:
    blocked = event.requires_approval
    job_id = event.job_id
    state.jobs[job_id] = JobEntry(
        job_id=job_id,
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
    if event.idempotency_key is not None:
        state.idempotency[(event.user_id, event.idempotency_key)] = job_id


def _dispatched(state: QueueState, event: JobDispatched, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    job.status = "running"
    job.started_at = at
    job.allocated_gpus = event.gpus
    job.worker_id = event.worker_id
    job.attempt = event.attempt
    # The engine never lets `at` run backwards, so these stay sorted.
    state.wait_at.append(at)
    sums = state.wait_sums
    sums.append(sums[-1] + (at - job.queued_at))


def _started(state: QueueState, event: JobStarted, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    job.pid = event.pid
    job.process_start_time = event.process_start_time


def _finish(
    job: JobEntry, state: QueueState, status: Status, at: float, ended_at: float | None = None
) -> None:
    """The job leaves the queue at ``at``; a run that really ended earlier, ``ended_at``
    (learned after a restart), ended then, though never before it started."""
    end = at
    if job.status == "running":  # a run ended: its length joins the history
        started = job.started_at if job.started_at is not None else at
        if ended_at is not None:
            end = min(max(ended_at, started), at)
        # kept in the order the ends were learned (`at` never runs backwards), so the
        # list stays sorted; the length is the true one
        state.run_end_at.append(at)
        sums = state.run_sums
        sums.append(sums[-1] + (end - started))
    job.status = status
    job.completed_at = end


def _completed(state: QueueState, event: JobCompleted, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    _finish(job, state, "completed", at, event.ended_at)
    job.exit_code = event.exit_code
    job.error_message = None  # an earlier attempt's failure is in the log, not this job's end


def _failed(state: QueueState, event: JobFailed, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    _finish(job, state, "failed", at, event.ended_at)
    job.exit_code = event.exit_code
    job.error_message = event.error


def _requeued(state: QueueState, event: JobRequeued, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    if job.started_at is not None:  # its start no longer counts: the next one will
        insort(state.waits_taken_back, (job.started_at, job.started_at - job.queued_at))
    job.status = "pending"
    job.attempt = event.attempt
    job.error_message = event.reason
    job.allocated_gpus = ()
    job.started_at = None
    job.completed_at = None
    job.exit_code = None
    job.pid = None
    job.process_start_time = None
    job.cancel_requested = False


def _cancel_requested(state: QueueState, event: JobCancelRequested, seq: int, at: float) -> None:
    state.jobs[event.job_id].cancel_requested = True


def _cancelled(state: QueueState, event: JobCancelled, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    _finish(job, state, "cancelled", at, event.ended_at)
    job.error_message = None  # as for a completed job: an earlier attempt's failure is history


def _approved(state: QueueState, event: JobApproved, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    job.status = "pending"
    job.queued_at = at  # it joins the queue when it is approved


def _rejected(state: QueueState, event: JobRejected, seq: int, at: float) -> None:
    job = state.jobs[event.job_id]
    _finish(job, state, "rejected", at)
    job.error_message = event.reason


def _priority_changed(state: QueueState, event: JobPriorityChanged, seq: int, at: float) -> None:
    state.jobs[event.job_id].priority_override = event.priority_override


def _settings_changed(state: QueueState, event: SettingsChanged, seq: int, at: float) -> None:
    state.settings = event.settings


def _entries_purged(state: QueueState, event: EntriesPurged, seq: int, at: float) -> None:
    jobs = state.jobs
    for job_id in event.job_ids:
        job = jobs.pop(job_id)
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

# Events that change what their job counts in (its status, its priority): folding one
# alone moves the job out of the indexes and back in. (``job.submitted`` only adds one,
# ``queue.entries_purged`` only takes them out, the rest leave the indexes as they are.)
_MOVES_ITS_JOB: frozenset[type[Event]] = frozenset({
    JobDispatched, JobCompleted, JobFailed, JobRequeued, JobCancelled, JobApproved,
    JobRejected, JobPriorityChanged,
})
