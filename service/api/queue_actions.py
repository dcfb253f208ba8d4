"""Write routes of the queue: each turns its request into one engine command.

The rules (permissions, states, limits) live in ``service.commands``; a route parses,
calls ``engine.execute`` with the request id as correlation id, and shapes the answer.
Cancelling a running job waits, up to ``CANCEL_ANSWER_SECONDS``, until the executor
has stopped it, then answers the status it is in.
"""

from __future__ import annotations

from typing import Annotated, Any

import structlog
from litestar import Request, Router, post
from litestar.params import FromPath, JSONBody, QueryParameter

from events.types import JobDispatched
from projections.state import QueueState
from service import scheduler
from service.api.auth import CurrentActor
from service.api.context import engine_of, read_now, request_id_of
from service.api.entries import effective_priority_of
from service.api.errors import error_responses
from service.api.models import (
    BulkCancelRequest,
    BulkCancelResponse,
    CleanupResponse,
    ConcurrencySettings,
    ConcurrencyUpdate,
    JobStatusResponse,
    PriorityRequest,
    PriorityResponse,
    ProcessResponse,
    sent_fields,
)
from service.api.queue_views import QUEUE_VIEWS, settings_out
from service.api.submit import submit
from service.commands import (
    Approve,
    Cancel,
    ChangeSettings,
    Cleanup,
    Process,
    Reject,
    SetPriority,
)
from service.engine import Engine

__all__ = ["queue_router", "QUEUE_ACTIONS", "CANCEL_ANSWER_SECONDS"]

log = structlog.get_logger("gpuyard.api")

# How long a cancel's answer waits for running jobs to stop. Most stop at SIGTERM within
# milliseconds and are answered `cancelled`; one that ignores it is answered `running`
# (its SIGKILL follows after cancel_grace_seconds) rather than holding the request past
# a client's usual timeout (httpx's default is 5 s).
CANCEL_ANSWER_SECONDS = 3.0
_JOB_ERRORS = error_responses(401, 403, 404, 409, 503)


async def _wait_until_stopped(engine: Engine, job_ids: list[str]) -> None:
    """Wait until none of ``job_ids`` is running (the executor reports the kill)."""
    def stopped(state: QueueState) -> bool:
        jobs = state.jobs
        return all(job_id not in jobs or jobs[job_id].status != "running" for job_id in job_ids)

    if not stopped(engine.state):
        await engine.wait_for(stopped, CANCEL_ANSWER_SECONDS)


def _status(engine: Engine, job_id: str) -> JobStatusResponse:
    return JobStatusResponse(success=True, job_id=job_id, status=engine.state.jobs[job_id].status)


@post("/{job_id:str}/cancel", status_code=200, responses=_JOB_ERRORS, summary="Cancel a job")
async def cancel(request: Request[Any, Any, Any], actor: CurrentActor,
                 job_id: FromPath[str]) -> JobStatusResponse:
    """Pending or blocked: cancelled now. Running: SIGTERM to its process group, SIGKILL
    after ``cancel_grace_seconds``, then cancelled; the answer comes once it has stopped,
    or after 3 s with status ``running`` if it has not (it is cancelled when it stops)."""
    engine = engine_of(request)
    await engine.execute(Cancel(job_ids=(job_id,)), actor, request_id_of(request))
    await _wait_until_stopped(engine, [job_id])
    return _status(engine, job_id)


@post("/cancel", status_code=200,
      responses=error_responses(400, 401, 403, 404, 409, 413, 422, 503),
      summary="Cancel many jobs at once")
async def bulk_cancel(request: Request[Any, Any, Any], actor: CurrentActor,
                      data: JSONBody[BulkCancelRequest]) -> BulkCancelResponse:
    """``{"job_ids": [...]}`` or ``{"all": true}`` (your own jobs; every job for leads and
    admins). All or nothing: one unknown, foreign or finished job cancels none."""
    command = Cancel(job_ids=tuple(data.job_ids or ()), all=data.all)
    engine = engine_of(request)
    outcome = (await engine.execute(command, actor, request_id_of(request))).outcome
    await _wait_until_stopped(engine, outcome.job_ids)
    return BulkCancelResponse(success=True, cancelled=outcome.job_ids)


@post("/{job_id:str}/approve", status_code=200, responses=_JOB_ERRORS,
      summary="Approve a blocked job")
async def approve(request: Request[Any, Any, Any], actor: CurrentActor,
                  job_id: FromPath[str]) -> JobStatusResponse:
    engine = engine_of(request)
    await engine.execute(Approve(job_id), actor, request_id_of(request))
    return _status(engine, job_id)


@post("/{job_id:str}/reject", status_code=200, responses=_JOB_ERRORS,
      summary="Reject a blocked job")
async def reject(
    request: Request[Any, Any, Any],
    actor: CurrentActor,
    job_id: FromPath[str],
    reason: Annotated[str | None, QueryParameter(max_length=1000)] = None,
) -> JobStatusResponse:
    """The job becomes ``rejected`` with ``error_message = reason``."""
    engine = engine_of(request)
    await engine.execute(Reject(job_id, reason), actor, request_id_of(request))
    return _status(engine, job_id)


@post("/{job_id:str}/priority", status_code=200,
      responses=error_responses(400, 401, 403, 404, 409, 413, 422, 503),
      summary="Override a job's priority")
async def set_priority(request: Request[Any, Any, Any], actor: CurrentActor, job_id: FromPath[str],
                       data: JSONBody[PriorityRequest]) -> PriorityResponse:
    """``{"priority": 0..100}`` overrides, ``{"priority": null}`` removes the override;
    leads and admins; pending or blocked jobs only."""
    engine = engine_of(request)
    await engine.execute(SetPriority(job_id, data.priority), actor, request_id_of(request))
    state = engine.state
    job = state.jobs[job_id]
    now = read_now(state)
    return PriorityResponse(
        success=True,
        job_id=job_id,
        status=job.status,
        priority=job.priority,
        priority_override=job.priority_override,
        effective_priority=effective_priority_of(job, state, now),
        position=scheduler.position(state, job, now),
    )


@post("/concurrency", status_code=200,
      responses=error_responses(400, 401, 403, 413, 422, 503),
      summary="Change queue limits and settings")
async def set_concurrency(request: Request[Any, Any, Any], actor: CurrentActor,
                          data: JSONBody[ConcurrencyUpdate]) -> ConcurrencySettings:
    """Only the fields sent change (an explicit ``local_gpu_max_concurrent: null`` means
    unlimited); the change is an event; the answer echoes every setting."""
    changes = sent_fields(data)
    engine = engine_of(request)
    await engine.execute(ChangeSettings(changes), actor, request_id_of(request))
    log.info("settings_changed", changes=changes)
    return settings_out(engine.state)


@post("/process", status_code=200, responses=error_responses(401, 403, 503),
      summary="Run a scheduling pass now")
async def process(request: Request[Any, Any, Any], actor: CurrentActor) -> ProcessResponse:
    engine = engine_of(request)
    committed = await engine.execute(Process(), actor, request_id_of(request))
    job_ids = [r.event.job_id for r in committed.records if isinstance(r.event, JobDispatched)]
    return ProcessResponse(success=True, dispatched=len(job_ids), job_ids=job_ids)


@post("/cleanup", status_code=200, responses=error_responses(401, 403, 422, 503),
      summary="Drop old finished entries from the queue view")
async def cleanup(
    request: Request[Any, Any, Any],
    actor: CurrentActor,
    days: Annotated[int, QueryParameter(ge=1, le=365)] = 30,
) -> CleanupResponse:
    """Terminal entries whose ``completed_at`` is more than ``days`` ago leave the queue
    view; the log keeps every event (the audit export still has them)."""
    engine = engine_of(request)
    outcome = (await engine.execute(Cleanup(days), actor, request_id_of(request))).outcome
    return CleanupResponse(success=True, deleted=outcome.count, days=days)


QUEUE_ACTIONS = [submit, bulk_cancel, cancel, approve, reject, set_priority, set_concurrency,
                 process, cleanup]

# GET and POST of one path must sit in one router (Litestar adds OPTIONS per path).
queue_router = Router(path="/api/queue", route_handlers=[*QUEUE_VIEWS, *QUEUE_ACTIONS],
                      tags=["queue"])
