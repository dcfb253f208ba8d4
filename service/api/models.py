"""Request and response models of the HTTP API (msgspec), kept apart from the events.

Field names and defaults are the seed's and SPEC section 7's. Request bodies refuse
unknown fields, so a misspelt option is a 422 rather than silently ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType, field

from service.commands import MAX_CANCEL_GRACE_SECONDS, MIN_STARVATION_THRESHOLD_MINUTES

__all__ = [
    "ErrorBody", "SubmitRequest", "SubmitResponse", "QueueEntry", "QueueListing", "StatsResponse",
    "LocalStats", "MeResponse", "PositionResponse", "ExplainReason", "ExplainResponse",
    "CancelResponse", "BulkCancelRequest", "BulkCancelResponse", "JobStatusResponse",
    "PriorityRequest", "PriorityResponse", "ConcurrencySettings", "ConcurrencyUpdate",
    "ProcessResponse", "CleanupResponse", "UserCreate", "UserUpdate", "UserOut", "UserCreated",
    "UserListing", "TokenInfo", "TokenCreated", "TokenRevokedResponse", "ConfigBody", "ConfigOut",
    "InvalidConfig", "ConfigListing", "SubmitStatus", "EntryStatus", "sent_fields",
]

_SCHEMA_NAMES = {"ge": "minimum", "gt": "exclusive_minimum", "le": "maximum"}


def bounds(**limits: float) -> Meta:
    """``Meta(ge=…, gt=…, le=…)``, the limits also spelled out for the OpenAPI schema:
    Litestar 2 leaves a bound of 0 out of it (it tests the bound for truth)."""
    extra = {_SCHEMA_NAMES[name]: value for name, value in limits.items()}
    return Meta(**limits, extra_json_schema={"extra": extra})


NonNegative = Annotated[int, bounds(ge=0)]
Positive = Annotated[int, bounds(ge=1)]
# A new submission is running, queued, rejected or blocked; an idempotent replay reports
# the original job's status now, which may also be completed, failed or cancelled.
SubmitStatus = Literal[
    "running", "queued", "rejected", "blocked", "completed", "failed", "cancelled"
]
EntryStatus = Literal[
    "pending", "blocked", "running", "completed", "failed", "cancelled", "rejected"
]
LevelName = Literal["admin", "lead", "researcher", "viewer"]


def sent_fields(body: Struct) -> dict[str, Any]:
    """The fields a request body of optional fields actually sent (not left ``UNSET``):
    only those change, and an explicit ``null`` is a value."""
    return {
        name: value for name in body.__struct_fields__
        if (value := getattr(body, name)) is not UNSET
    }


class ErrorBody(Struct, kw_only=True):
    """Every error: the HTTP status and a ``detail`` a person can act on."""

    status_code: int
    detail: str
    extra: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------- submit


class SubmitRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/queue/submit``: the config to run and how."""

    config_name: Annotated[str, Meta(min_length=1, max_length=100)]
    target: Literal["auto", "local", "worker", "cloud"] = "auto"
    num_processes: NonNegative | None = None
    device_ids: list[NonNegative] | None = None
    any_gpu: bool = False
    no_wait: bool = False
    dry_run: bool = False
    requires_approval: bool = False
    estimated_cost: Annotated[float, bounds(ge=0)] | None = None
    worker_labels: dict[str, str] = field(default_factory=dict)
    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    metadata: dict[str, Any] = field(default_factory=dict)
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


class SubmitResponse(Struct, kw_only=True):
    success: bool
    job_id: str | None
    status: SubmitStatus
    allocated_gpus: list[int] | None
    allocated_worker_id: str | None
    queue_position: int | None
    requires_approval: bool
    reason: str | None


# ---------------------------------------------------------------- queue entries


class QueueEntry(Struct, kw_only=True):
    """One job as the queue shows it (the seed's schema plus three fields)."""

    job_id: str
    user_id: int
    team_id: str | None
    config_name: str
    priority: int
    priority_override: int | None
    effective_priority: int
    status: EntryStatus
    position: int | None
    queued_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    estimated_cost: float
    requires_approval: bool
    attempt: int
    max_attempts: int
    error_message: str | None
    metadata: dict[str, Any]
    allocated_gpus: list[int] | None
    job_type: str
    num_processes: int
    exit_code: int | None
    worker_id: str | None


class QueueListing(Struct, kw_only=True):
    entries: list[QueueEntry]
    total_pending: int
    total_running: int
    total_blocked: int


class LocalStats(Struct, kw_only=True):
    running_jobs: int
    pending_jobs: int
    allocated_gpus: list[int]
    available_gpus: list[int]
    total_gpus: int
    max_concurrent_gpus: int | None
    max_concurrent_jobs: int


class StatsResponse(Struct, kw_only=True):
    queue_depth: int
    running: int
    blocked: int
    max_concurrent: int
    user_max_concurrent: int
    team_max_concurrent: int
    enable_fair_share: bool
    avg_wait_seconds: float | None
    by_status: dict[str, int]
    by_user: dict[str, int]
    local_gpu_max_concurrent: int | None
    local_job_max_concurrent: int
    local: LocalStats


class MeResponse(Struct, kw_only=True):
    pending_count: int
    running_count: int
    blocked_count: int
    best_position: int | None
    pending_jobs: list[QueueEntry]
    running_jobs: list[QueueEntry]


class PositionResponse(Struct, kw_only=True):
    job_id: str
    position: int | None
    status: EntryStatus
    priority: int
    effective_priority: int
    queued_at: datetime
    estimated_wait_seconds: float | None


class ExplainReason(Struct, kw_only=True):
    code: str
    detail: str


class ExplainResponse(Struct, kw_only=True):
    job_id: str
    status: EntryStatus
    position: int | None
    reasons: list[ExplainReason]


# ---------------------------------------------------------------- changing jobs


class JobStatusResponse(Struct, kw_only=True):
    success: bool
    job_id: str
    status: EntryStatus


CancelResponse = JobStatusResponse


class BulkCancelRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """Either ``job_ids`` or ``all: true`` (your own jobs; every job for leads and admins)."""

    job_ids: list[Annotated[str, Meta(min_length=1, max_length=64)]] | None = None
    all: bool = False


class BulkCancelResponse(Struct, kw_only=True):
    success: bool
    cancelled: list[str]


class PriorityRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    priority: Annotated[int, bounds(ge=0, le=100)] | None


class PriorityResponse(Struct, kw_only=True):
    success: bool
    job_id: str
    status: EntryStatus
    priority: int
    priority_override: int | None
    effective_priority: int
    position: int | None


# ---------------------------------------------------------------- queue settings


class ConcurrencySettings(Struct, kw_only=True):
    max_concurrent: int
    user_max_concurrent: int
    team_max_concurrent: int
    enable_fair_share: bool
    local_gpu_max_concurrent: int | None
    local_job_max_concurrent: int
    starvation_threshold_minutes: float
    starvation_boost: int
    approval_cost_threshold: float
    approval_timeout_hours: float
    cancel_grace_seconds: float


class ConcurrencyUpdate(Struct, kw_only=True, forbid_unknown_fields=True):
    """Only the fields present change; ``local_gpu_max_concurrent: null`` means unlimited."""

    max_concurrent: Positive | UnsetType = UNSET
    user_max_concurrent: Positive | UnsetType = UNSET
    team_max_concurrent: Positive | UnsetType = UNSET
    enable_fair_share: bool | UnsetType = UNSET
    local_gpu_max_concurrent: Positive | None | UnsetType = UNSET
    local_job_max_concurrent: Positive | UnsetType = UNSET
    starvation_threshold_minutes: (
        Annotated[float, Meta(ge=MIN_STARVATION_THRESHOLD_MINUTES)] | UnsetType) = UNSET
    starvation_boost: NonNegative | UnsetType = UNSET
    approval_cost_threshold: Annotated[float, bounds(ge=0)] | UnsetType = UNSET
    approval_timeout_hours: Annotated[float, bounds(gt=0)] | UnsetType = UNSET
    cancel_grace_seconds: (
        Annotated[float, bounds(ge=0, le=MAX_CANCEL_GRACE_SECONDS)] | UnsetType) = UNSET


class ProcessResponse(Struct, kw_only=True):
    success: bool
    dispatched: int
    job_ids: list[str]


class CleanupResponse(Struct, kw_only=True):
    success: bool
    deleted: int
    days: int


# ---------------------------------------------------------------- users and tokens


class UserCreate(Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    level: LevelName
    team_id: Annotated[str, Meta(min_length=1, max_length=100)] | None = None


class UserUpdate(Struct, kw_only=True, forbid_unknown_fields=True):
    """Only the fields present change; ``team_id: null`` removes the user from a team."""

    name: Annotated[str, Meta(min_length=1, max_length=100)] | UnsetType = UNSET
    level: LevelName | UnsetType = UNSET
    team_id: Annotated[str, Meta(min_length=1, max_length=100)] | None | UnsetType = UNSET


class TokenInfo(Struct, kw_only=True):
    token_id: str


class UserOut(Struct, kw_only=True):
    user_id: int
    name: str
    level: LevelName
    team_id: str | None
    tokens: list[TokenInfo]


class UserListing(Struct, kw_only=True):
    users: list[UserOut]
    single_user_mode: bool


class UserCreated(Struct, kw_only=True):
    """The token is shown this once; only its sha256 is stored."""

    user_id: int
    name: str
    level: LevelName
    team_id: str | None
    token: str
    token_id: str


class TokenCreated(Struct, kw_only=True):
    user_id: int
    token_id: str
    token: str


class TokenRevokedResponse(Struct, kw_only=True):
    success: bool
    user_id: int
    token_id: str


# ---------------------------------------------------------------- configs


class ConfigBody(Struct, kw_only=True, forbid_unknown_fields=True):
    """A config's fields (SPEC section 2), as JSON."""

    command: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]
    num_processes: NonNegative | None = None
    device_ids: list[NonNegative] | None = None
    env: dict[str, str] = field(default_factory=dict)
    working_dir: Annotated[str, Meta(min_length=1)] | None = None
    estimated_cost: Annotated[float, bounds(ge=0)] | None = None


class ConfigOut(Struct, kw_only=True):
    name: str
    command: list[str]
    num_processes: int
    device_ids: list[int] | None
    env: dict[str, str]
    working_dir: str | None
    estimated_cost: float | None


class InvalidConfig(Struct, kw_only=True):
    name: str
    error: str


class ConfigListing(Struct, kw_only=True):
    configs: list[ConfigOut]
    invalid: list[InvalidConfig]
