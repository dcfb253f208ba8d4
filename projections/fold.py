"""The fold: ``apply(state, recorded)`` turns one event into the next state.

Folds are total: one ``match`` over the event union ending in ``assert_never``. The
state is updated in place (the engine keeps two copies and swaps them, see
``service/engine.py``), so a fold costs a few dictionary writes per event.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import assert_never

from events.envelope import Recorded
from events.types import (
    AnyEvent,
    EntriesPurged,
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

__all__ = ["apply", "apply_event", "fold"]


def fold(records: Iterable[Recorded], state: QueueState | None = None) -> QueueState:
    """Fold a whole log. The pending index is built once at the end, not per event."""
    state = state if state is not None else QueueState()
    state.pending.enabled = False
    for recorded in records:
        apply_event(state, recorded.event, recorded.seq, recorded.at)
    state.pending.rebuild(state.pending_jobs())
    return state


def apply(state: QueueState, recorded: Recorded) -> QueueState:
    """Fold one recorded event into ``state``."""
    apply_event(state, recorded.event, recorded.seq, recorded.at)
    return state


def _set_status(state: QueueState, job: JobEntry, status: Status) -> None:
    counts = state.status_counts
    counts[job.status] -= 1
    counts[status] += 1
    was_active = job.status in ("pending", "running")
    is_active = status in ("pending", "running")
    job.status = status
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
    for index in job.allocated_gpus:
        if state.gpu_holder.get(index) == job.job_id:
            del state.gpu_holder[index]


def _leave_queue(state: QueueState, job: JobEntry) -> None:
    """Take a job out of whichever live collection holds it."""
    if job.status == "pending":
        state.pending.remove(job)
    elif job.status == "blocked":
        del state.blocked[job.job_id]
    elif job.status == "running":
        _release(state, job)


def _finish(state: QueueState, job: JobEntry, status: Status, at: float) -> None:
    _leave_queue(state, job)
    _set_status(state, job, status)
    job.completed_at = at


def apply_event(state: QueueState, event: AnyEvent, seq: int, at: float) -> None:
    state.last_seq = seq
    state.last_at = at
    jobs = state.jobs
    match event:
        case JobSubmitted():
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
            jobs[job.job_id] = job
            state.status_counts[job.status] += 1
            if blocked:
                state.blocked[job.job_id] = None
            else:
                state.user_active[job.user_id] = state.user_active.get(job.user_id, 0) + 1
                state.pending.add(job)
            if event.idempotency_key is not None:
                state.idempotency[(event.user_id, event.idempotency_key)] = job.job_id

        case JobDispatched():
            job = jobs[event.job_id]
            state.pending.remove(job)
            _set_status(state, job, "running")
            job.started_at = at
            job.allocated_gpus = event.gpus
            job.worker_id = event.worker_id
            job.attempt = event.attempt
            state.running[job.job_id] = None
            state.user_running[job.user_id] = state.user_running.get(job.user_id, 0) + 1
            if job.team_id is not None:
                state.team_running[job.team_id] = state.team_running.get(job.team_id, 0) + 1
            if job.spec.target == "local":
                state.local_running += 1
            for index in event.gpus:
                state.gpu_holder[index] = job.job_id
            # The engine never lets `at` run backwards, so these stay sorted.
            state.wait_at.append(at)
            state.wait_sums.append(state.wait_sums[-1] + (at - job.queued_at))

        case JobStarted():
            job = jobs[event.job_id]
            job.pid = event.pid
            job.process_start_time = event.process_start_time

        case JobCompleted():
            job = jobs[event.job_id]
            _finish(state, job, "completed", at)
            job.exit_code = event.exit_code

        case JobFailed():
            job = jobs[event.job_id]
            _finish(state, job, "failed", at)
            job.exit_code = event.exit_code
            job.error_message = event.error

        case JobRequeued():
            job = jobs[event.job_id]
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

        case JobCancelRequested():
            jobs[event.job_id].cancel_requested = True

        case JobCancelled():
            job = jobs[event.job_id]
            _finish(state, job, "cancelled", at)

        case JobApproved():
            job = jobs[event.job_id]
            _leave_queue(state, job)
            _set_status(state, job, "pending")
            job.queued_at = at  # it joins the queue when it is approved
            state.pending.add(job)

        case JobRejected():
            job = jobs[event.job_id]
            _finish(state, job, "rejected", at)
            job.error_message = event.reason

        case JobPriorityChanged():
            job = jobs[event.job_id]
            if job.status == "pending":
                state.pending.remove(job)
                job.priority_override = event.priority_override
                state.pending.add(job)
            else:
                job.priority_override = event.priority_override

        case SettingsChanged():
            state.settings = event.settings

        case EntriesPurged():
            for job_id in event.job_ids:
                job = jobs.pop(job_id)
                state.status_counts[job.status] -= 1
                if job.idempotency_key is not None:
                    state.idempotency.pop((job.user_id, job.idempotency_key), None)

        case UserCreated() | UserUpdated():
            state.users[event.user_id] = User(
                user_id=event.user_id, name=event.name, level=event.level, team_id=event.team_id
            )

        case TokenIssued():
            state.tokens[event.token_id] = Token(
                token_id=event.token_id, user_id=event.user_id, token_hash=event.token_hash
            )
            state.token_by_hash[event.token_hash] = event.token_id

        case TokenRevoked():
            token = state.tokens.pop(event.token_id)
            del state.token_by_hash[token.token_hash]

        case GpuInventoryObserved():
            state.gpu_backend = event.backend
            state.gpus = event.devices

        case _:
            assert_never(event)
