"""Queue entries as the API shows them, read from the committed in-memory state.

Nothing here writes or awaits: a read answers from ``engine.state`` as it stands.
Pending jobs come in queue order (``scheduler.pending_in_order``) with their global
``position``; every other job newest first (by submission). Researchers and viewers
are shown their own entries only, with positions still counted over the whole queue.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from itertools import islice

from projections.state import STATUSES, JobEntry, QueueState
from projections.views import mean_run_seconds
from service import scheduler
from service.api.models import MeResponse, PositionResponse, QueueEntry, QueueListing

__all__ = [
    "to_datetime", "queue_entry", "effective_priority_of", "listing", "me", "position_of",
    "estimated_wait_seconds",
]


def to_datetime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _maybe_datetime(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def effective_priority_of(job: JobEntry, state: QueueState, now: float) -> int:
    """Aged priority for a pending job; ``priority_override ?? priority`` otherwise."""
    if job.status == "pending":
        return scheduler.job_effective_priority(job, now, state.settings)
    return job.base_priority


def queue_entry(job: JobEntry, state: QueueState, now: float, position: int | None) -> QueueEntry:
    spec = job.spec
    dispatched = job.started_at is not None
    return QueueEntry(
        job_id=job.job_id,
        user_id=job.user_id,
        team_id=job.team_id,
        config_name=spec.config_name,
        priority=job.priority,
        priority_override=job.priority_override,
        effective_priority=effective_priority_of(job, state, now),
        status=job.status,
        position=position,
        queued_at=to_datetime(job.queued_at),
        started_at=_maybe_datetime(job.started_at),
        completed_at=_maybe_datetime(job.completed_at),
        estimated_cost=spec.estimated_cost or 0.0,  # the seed schema's default
        requires_approval=job.requires_approval,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        error_message=job.error_message,
        metadata=job.metadata,
        allocated_gpus=list(job.allocated_gpus) if dispatched else None,
        job_type=spec.target,
        num_processes=spec.num_processes,
        exit_code=job.exit_code,
        worker_id=job.worker_id,
    )


# ---------------------------------------------------------------- pending jobs in order


def _users_pending(state: QueueState, user_id: int, now: float) -> list[tuple[JobEntry, int]]:
    """One user's pending jobs with their global positions, in queue order (the
    scheduler's ``position``), without walking anybody else's."""
    jobs = state.jobs
    mine = [
        (job, scheduler.position(state, job, now) or 0)
        for (owner, _, _), keys in state.pending.by_user.items() if owner == user_id
        for job in (jobs[key[2]] for key in keys)
    ]
    mine.sort(key=lambda placed: placed[1])
    return mine


def _pending_page(
    state: QueueState, now: float, user_id: int | None, offset: int, limit: int
) -> tuple[list[tuple[JobEntry, int]], int]:
    """A page of pending jobs with their positions, and how many pending jobs match."""
    if user_id is None:
        total = state.status_counts["pending"]
        ordered = islice(scheduler.pending_in_order(state, now), offset, offset + limit)
        return [(job, offset + i + 1) for i, job in enumerate(ordered)], total
    mine = _users_pending(state, user_id, now)
    return mine[offset: offset + limit], len(mine)


def _newest_first(jobs: Iterable[JobEntry]) -> list[JobEntry]:
    return sorted(jobs, key=lambda job: job.submit_seq, reverse=True)


def _others(
    state: QueueState, statuses: frozenset[str], user_id: int | None
) -> Iterator[JobEntry]:
    """Non-pending jobs with one of ``statuses``, newest first."""
    jobs = state.jobs
    if statuses <= {"running", "blocked"}:
        live: list[JobEntry] = []
        if "running" in statuses:
            live.extend(jobs[job_id] for job_id in state.running)
        if "blocked" in statuses:
            live.extend(jobs[job_id] for job_id in state.blocked)
        if user_id is not None:
            live = [job for job in live if job.user_id == user_id]
        yield from _newest_first(live)
        return
    for job in reversed(jobs.values()):  # dict order is submission order
        if job.status in statuses and (user_id is None or job.user_id == user_id):
            yield job


def listing(
    state: QueueState,
    now: float,
    *,
    status: str | None,
    include_completed: bool,
    user_id: int | None,
    limit: int,
    offset: int,
) -> QueueListing:
    """``GET /api/queue``: pending in position order, then the rest newest first."""
    if status is not None:
        wanted = frozenset({status})
    elif include_completed:
        wanted = frozenset(STATUSES)
    else:
        wanted = frozenset({"pending", "running", "blocked"})
    page: list[QueueEntry] = []
    skip = offset
    if "pending" in wanted:
        pending, matching = _pending_page(state, now, user_id, offset, limit)
        page.extend(queue_entry(job, state, now, pos) for job, pos in pending)
        skip = max(0, offset - matching)
    room = limit - len(page)
    rest = wanted - {"pending"}
    if room > 0 and rest:
        for job in islice(_others(state, rest, user_id), skip, skip + room):
            page.append(queue_entry(job, state, now, None))
    counts = state.status_counts
    return QueueListing(
        entries=page,
        total_pending=counts["pending"],
        total_running=counts["running"],
        total_blocked=counts["blocked"],
    )


def me(state: QueueState, now: float, user_id: int) -> MeResponse:
    """``GET /api/queue/me``: the caller's pending (in order) and running jobs."""
    pending = _users_pending(state, user_id, now)
    jobs = state.jobs
    running = _newest_first(
        jobs[job_id] for job_id in state.running if jobs[job_id].user_id == user_id
    )
    blocked = sum(1 for job_id in state.blocked if jobs[job_id].user_id == user_id)
    return MeResponse(
        pending_count=len(pending),
        running_count=len(running),
        blocked_count=blocked,
        best_position=pending[0][1] if pending else None,
        pending_jobs=[queue_entry(job, state, now, pos) for job, pos in pending],
        running_jobs=[queue_entry(job, state, now, None) for job in running],
    )


# ---------------------------------------------------------------- position and wait


def estimated_wait_seconds(
    state: QueueState, job: JobEntry, now: float, position: int | None
) -> float | None:
    """A rough estimate of how long a pending job still waits (``None``: no basis);
    ``position`` is the job's (``scheduler.position``).

    Every job is assumed to run as long as the mean of the runs that ended in the
    last 24 hours, and the queue to drain through ``min(max_concurrent,
    local_job_max_concurrent)`` slots (local jobs) or ``max_concurrent`` slots. A slot
    frees when its running job reaches that mean; the jobs ahead then take the slots in
    turn. Per-user limits, GPU fit and priority changes are ignored.
    """
    if job.status == "running":
        return 0.0
    if job.status != "pending":
        return None
    mean_run = mean_run_seconds(state, now)
    if mean_run is None:
        return None
    settings = state.settings
    slots = settings.max_concurrent
    if job.spec.target == "local":
        slots = min(slots, settings.local_job_max_concurrent)
    slots = max(1, slots)
    jobs = state.jobs
    frees = sorted(
        max(0.0, mean_run - (now - (jobs[job_id].started_at or now))) for job_id in state.running
    )[:slots]
    frees += [0.0] * (slots - len(frees))
    ahead = (position or 1) - 1
    return round(frees[ahead % slots] + (ahead // slots) * mean_run, 1)


def position_of(state: QueueState, job: JobEntry, now: float) -> PositionResponse:
    position = scheduler.position(state, job, now)
    return PositionResponse(
        job_id=job.job_id,
        position=position,
        status=job.status,
        priority=job.priority,
        effective_priority=effective_priority_of(job, state, now),
        queued_at=to_datetime(job.queued_at),
        estimated_wait_seconds=estimated_wait_seconds(state, job, now, position),
    )
