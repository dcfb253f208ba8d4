"""``POST /api/queue/submit``: resolve the config, hand the engine a ``Submit``, answer.

Statuses (the seed's): ``running`` (started with these GPUs), ``queued`` (pending),
``blocked`` (awaits approval), ``rejected`` (``no_wait`` and it cannot start now:
nothing is queued). A new job is a 201; an idempotent replay (same key, same body)
answers 200 with the original job as it stands now; ``dry_run`` answers 200 with
``job_id: null`` and writes nothing.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import structlog
from litestar import Request, Response, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from events.codec import canonical_json
from projections.state import JobEntry, QueueState
from service import scheduler
from service.api.auth import CurrentActor
from service.api.context import engine_of, read_now, request_id_of, runtime_of
from service.api.errors import error_responses
from service.api.models import SubmitRequest, SubmitResponse
from service.commands import Submit
from service.ids import new_job_id

__all__ = ["submit", "request_hash"]

log = structlog.get_logger("gpuyard.api")


def request_hash(body: SubmitRequest) -> str | None:
    """sha256 of the body as parsed (defaults filled in, keys sorted), without its key.

    Only a request with an ``idempotency_key`` has one: a replay of that key is compared
    with it (same body: the same job; another body: 409). Without a key there is nothing
    to compare, and no hash is kept.
    """
    if body.idempotency_key is None:
        return None
    fields = msgspec.structs.asdict(body)
    fields.pop("idempotency_key")
    return hashlib.sha256(canonical_json(fields)).hexdigest()


def _answer(status_code: int, **fields: Any) -> Response[SubmitResponse]:
    return Response(SubmitResponse(**fields), status_code=status_code)


def _shown_status(job: JobEntry) -> str:
    """A job's status in the seed's submit words: ``pending`` is ``queued``."""
    return "queued" if job.status == "pending" else job.status


def _new_job_status(job: JobEntry) -> str:
    """The seed's submit status of a job this request just created."""
    if job.status not in ("pending", "blocked", "rejected") and job.started_at is not None:
        return "running"  # it started with this submission (it may even have finished)
    return _shown_status(job)


def _job_answer(state: QueueState, job: JobEntry, now: float, status: str,
                status_code: int) -> Response[SubmitResponse]:
    reason = None
    if job.status == "blocked":
        reason = job.approval_reason
    elif job.status == "pending":
        held = scheduler.probe(state, job, now).reason  # the rule that holds it back
        reason = held.detail if held is not None else None
    elif job.status in ("rejected", "failed"):
        reason = job.error_message
    dispatched = job.started_at is not None
    return _answer(
        status_code,
        success=True,
        job_id=job.job_id,
        status=status,
        allocated_gpus=list(job.allocated_gpus) if dispatched else None,
        allocated_worker_id=job.worker_id,
        queue_position=scheduler.position(state, job, now),
        requires_approval=job.requires_approval,
        reason=reason,
    )


@post(
    "/submit",
    status_code=201,
    summary="Submit a job",
    responses={
        200: ResponseSpec(SubmitResponse, generate_examples=False, description=(
            "Nothing new was queued: an idempotent replay (the original job), a dry run "
            "(job_id null, the status it would get) or a no_wait job that cannot start now "
            "(status rejected)")),
        **error_responses(400, 401, 403, 404, 409, 413, 422, 503),
    },
)
async def submit(request: Request[Any, Any, Any], data: JSONBody[SubmitRequest],
                 actor: CurrentActor) -> Response[SubmitResponse]:
    """Queue a job that runs config ``config_name`` (201), or say what would happen."""
    runtime = runtime_of(request)
    config = runtime.configs.get(data.config_name)
    job_id = new_job_id()
    command = Submit(
        job_id=job_id,
        config_name=data.config_name,
        config=config,
        target=data.target,
        num_processes=data.num_processes,
        device_ids=data.device_ids,
        any_gpu=data.any_gpu,
        no_wait=data.no_wait,
        dry_run=data.dry_run,
        requires_approval=data.requires_approval,
        estimated_cost=data.estimated_cost,
        worker_labels=data.worker_labels,
        max_attempts=data.max_attempts,
        metadata=data.metadata,
        idempotency_key=data.idempotency_key,
        request_hash=request_hash(data),
    )
    engine = engine_of(request)
    outcome = (await engine.execute(command, actor, request_id_of(request))).outcome
    state = engine.state
    now = read_now(state)

    if outcome.job_id is not None and outcome.job_id != job_id:  # idempotent replay
        job = state.jobs[outcome.job_id]
        return _job_answer(state, job, now, _shown_status(job), 200)

    if outcome.job_id is None:  # dry run, or no_wait that cannot start now
        placement = outcome.placement
        status = outcome.status or "rejected"
        reason = outcome.approval_reason
        if reason is None and placement is not None and placement.reason is not None:
            reason = placement.reason.detail
        return _answer(
            200,
            success=status != "rejected",
            job_id=None,
            status=status,
            allocated_gpus=list(placement.gpus) if placement and placement.starts else None,
            allocated_worker_id=None,
            queue_position=outcome.queue_position,
            requires_approval=outcome.approval_reason is not None,
            reason=reason,
        )

    job = state.jobs[job_id]
    status = _new_job_status(job)
    log.debug("job_submitted", job_id=job_id, status=status, config=data.config_name)
    return _job_answer(state, job, now, status, 201)
