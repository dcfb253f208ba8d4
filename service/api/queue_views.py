"""Read routes of the queue (SPEC section 7). They answer from ``engine.state`` at once:
plain functions on the event loop, no SQL, no waiting behind the writer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import MediaType, Request, Response, get
from litestar.params import FromPath, FromQuery, QueryParameter

from projections import views
from projections.state import QueueState
from service import scheduler
from service.api import entries
from service.api.auth import CurrentActor
from service.api.context import engine_of, read_cache_of, read_now
from service.api.errors import error_responses
from service.api.models import (
    ConcurrencySettings,
    ExplainReason,
    ExplainResponse,
    LocalStats,
    MeResponse,
    PositionResponse,
    QueueEntry,
    QueueListing,
    StatsResponse,
)
from service.commands import listing_scope, require_admin, visible_job

__all__ = ["QUEUE_VIEWS", "settings_out"]

ListStatus = Literal[
    "pending", "queued", "running", "blocked", "completed", "failed", "cancelled", "rejected"
]


_ENCODE = msgspec.json.Encoder().encode


def _json(body: bytes) -> Response[Any]:
    return Response(body, media_type=MediaType.JSON)


def settings_out(state: QueueState) -> ConcurrencySettings:
    return ConcurrencySettings(**msgspec.structs.asdict(state.settings))


@get("/", sync_to_thread=False, responses=error_responses(401, 403, 422),
     summary="List queue entries")
def list_queue(
    request: Request[Any, Any, Any],
    actor: CurrentActor,
    status: FromQuery[ListStatus | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
    offset: Annotated[int, QueryParameter(ge=0, le=1_000_000_000)] = 0,
    include_completed: FromQuery[bool] = False,
    user_id: FromQuery[int | None] = None,
) -> Response[QueueListing]:
    """Pending jobs in position order, then the rest newest first. Researchers and viewers
    see their own entries only (positions stay global). ``queued`` means ``pending``; a
    ``status`` filter shows that status even when it is terminal."""
    user_id = listing_scope(actor, user_id)
    state = engine_of(request).state
    shown = "pending" if status == "queued" else status
    key = ("queue", shown, limit, offset, include_completed, user_id)
    return _json(read_cache_of(request).answer(state, key, lambda: _ENCODE(entries.listing(
        state, read_now(state), status=shown, include_completed=include_completed,
        user_id=user_id, limit=limit, offset=offset,
    ))))


@get("/stats", sync_to_thread=False, responses=error_responses(401), summary="Queue statistics")
def stats(request: Request[Any, Any, Any], actor: CurrentActor) -> Response[StatsResponse]:
    """The seed's fields; counts cover all targets. ``avg_wait_seconds`` is the mean of
    ``started_at - queued_at`` over jobs started in the last 24 h (null if none)."""
    state = engine_of(request).state

    def compute() -> bytes:
        shown = views.stats(state, read_now(state))
        local = LocalStats(**shown.pop("local"))
        return _ENCODE(StatsResponse(local=local, **shown))

    return _json(read_cache_of(request).answer(state, ("stats",), compute))


@get("/me", sync_to_thread=False, responses=error_responses(401), summary="My queue status")
def my_queue(request: Request[Any, Any, Any], actor: CurrentActor) -> MeResponse:
    state = engine_of(request).state
    return entries.me(state, read_now(state), actor.user_id)


@get("/position/{job_id:str}", sync_to_thread=False, responses=error_responses(401, 403, 404),
     summary="A job's position")
def job_position(request: Request[Any, Any, Any], actor: CurrentActor,
                 job_id: FromPath[str]) -> PositionResponse:
    """``estimated_wait_seconds`` assumes every job runs as long as the mean of the jobs
    that finished in the last 24 h and that the queue drains through
    ``min(max_concurrent, local_job_max_concurrent)`` slots; null with no such history."""
    state = engine_of(request).state
    return entries.position_of(state, visible_job(state, job_id, actor), read_now(state))


@get("/concurrency", sync_to_thread=False, responses=error_responses(401, 403),
     summary="Queue limits and settings")
def get_concurrency(request: Request[Any, Any, Any], actor: CurrentActor) -> ConcurrencySettings:
    """Admin (SPEC 6: concurrency is an admin action); everyone reads the concurrency
    limits in ``GET /api/queue/stats``."""
    require_admin(actor, "reading the queue settings (everyone sees the concurrency limits "
                  "in GET /api/queue/stats: `gpuyard jobs status`)")
    return settings_out(engine_of(request).state)


@get("/{job_id:str}", sync_to_thread=False, responses=error_responses(401, 403, 404),
     summary="One queue entry")
def queue_entry(request: Request[Any, Any, Any], actor: CurrentActor,
                job_id: FromPath[str]) -> QueueEntry:
    state = engine_of(request).state
    job = visible_job(state, job_id, actor)
    now = read_now(state)
    return entries.queue_entry(job, state, now, scheduler.position(state, job, now))


@get("/{job_id:str}/explain", sync_to_thread=False, responses=error_responses(401, 403, 404),
     summary="Why a job is not running")
def explain(request: Request[Any, Any, Any], actor: CurrentActor,
            job_id: FromPath[str]) -> ExplainResponse:
    """The scheduler's own walk, stopped at this job: the first rule that holds it back,
    plus ``jobs_ahead`` when other pending jobs come first."""
    state = engine_of(request).state
    job = visible_job(state, job_id, actor)
    why = scheduler.explain(state, job.job_id, read_now(state))
    return ExplainResponse(
        job_id=why.job_id,
        status=job.status,
        position=why.position,
        reasons=[ExplainReason(code=r.code, detail=r.detail) for r in why.reasons],
    )


QUEUE_VIEWS = [list_queue, stats, my_queue, job_position, get_concurrency, queue_entry, explain]
