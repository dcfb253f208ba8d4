"""The vocabulary of gpuyard: every fact the queue records, as a frozen, tagged Struct.

Tags are explicit dotted names so that renaming a class never orphans stored history.
Events are additive-only: a new field needs a default; a breaking change gets a new tag
and an upcaster in ``events/codec.py``.
"""

from __future__ import annotations

from typing import Literal, Union

from msgspec import Struct, field

Level = Literal["admin", "lead", "researcher", "viewer"]
Target = Literal["local", "worker", "cloud"]

LEVEL_PRIORITY: dict[str, int] = {"admin": 30, "lead": 20, "researcher": 10, "viewer": 0}


class JobSpec(Struct, frozen=True, kw_only=True, gc=False):
    """A config resolved at submission: the job never changes when its file does.

    ``gc=False`` (as for every event): the cyclic collector never walks it. Specs live as
    long as their jobs, one per job; they hold strings, numbers and containers of them,
    so they can never be part of a cycle.
    """

    config_name: str
    command: tuple[str, ...]
    num_processes: int = 1
    device_ids: tuple[int, ...] | None = None
    any_gpu: bool = False
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    estimated_cost: float | None = None
    target: Target = "local"
    worker_labels: dict[str, str] = field(default_factory=dict)


class GpuDevice(Struct, frozen=True, kw_only=True):
    index: int
    name: str
    memory_gb: float
    uuid: str | None = None


class Settings(Struct, frozen=True, kw_only=True):
    """Queue settings; defaults are SPEC section 7's."""

    max_concurrent: int = 5
    user_max_concurrent: int = 2
    team_max_concurrent: int = 10
    enable_fair_share: bool = False
    local_gpu_max_concurrent: int | None = None
    local_job_max_concurrent: int = 1
    starvation_threshold_minutes: float = 60.0
    starvation_boost: int = 10
    approval_cost_threshold: float = 50.0
    approval_timeout_hours: float = 24.0
    cancel_grace_seconds: float = 10.0


class Event(Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Base of every event; subclasses carry an explicit dotted tag (and inherit
    ``gc=False``: a fact holds only values, never a reference back to anything)."""


class JobSubmitted(Event, tag="job.submitted", kw_only=True):
    job_id: str
    user_id: int
    team_id: str | None = None
    spec: JobSpec
    priority: int
    requires_approval: bool = False
    approval_reason: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    max_attempts: int = 3
    metadata: dict[str, object] = field(default_factory=dict)


class JobApproved(Event, tag="job.approved", kw_only=True):
    job_id: str


class JobRejected(Event, tag="job.rejected", kw_only=True):
    job_id: str
    reason: str


class JobPriorityChanged(Event, tag="job.priority_changed", kw_only=True):
    job_id: str
    priority_override: int | None


class JobDispatched(Event, tag="job.dispatched", kw_only=True):
    job_id: str
    gpus: tuple[int, ...] = ()
    worker_id: str | None = None
    attempt: int = 1


class JobStarted(Event, tag="job.started", kw_only=True):
    job_id: str
    pid: int
    process_start_time: int


# ``ended_at`` on the three ends of a run: when its process really ended, where that was
# learned later than it happened (it ended while the server was down). None: at the
# event's own ``at``.


class JobCompleted(Event, tag="job.completed", kw_only=True):
    job_id: str
    exit_code: int = 0
    ended_at: float | None = None


class JobFailed(Event, tag="job.failed", kw_only=True):
    """A job ended badly. ``retryable`` facts are followed by ``job.requeued``."""

    job_id: str
    error: str
    exit_code: int | None = None
    retryable: bool = False
    ended_at: float | None = None


class JobRequeued(Event, tag="job.requeued", kw_only=True):
    job_id: str
    attempt: int
    reason: str


class JobCancelRequested(Event, tag="job.cancel_requested", kw_only=True):
    job_id: str


class JobCancelled(Event, tag="job.cancelled", kw_only=True):
    job_id: str
    ended_at: float | None = None


class SettingsChanged(Event, tag="queue.settings_changed", kw_only=True):
    settings: Settings


class EntriesPurged(Event, tag="queue.entries_purged", kw_only=True):
    job_ids: tuple[str, ...]
    days: int


class UserCreated(Event, tag="user.created", kw_only=True):
    user_id: int
    name: str
    level: Level
    team_id: str | None = None


class UserUpdated(Event, tag="user.updated", kw_only=True):
    user_id: int
    name: str
    level: Level
    team_id: str | None = None


class TokenIssued(Event, tag="token.issued", kw_only=True):
    user_id: int
    token_id: str
    token_hash: str


class TokenRevoked(Event, tag="token.revoked", kw_only=True):
    user_id: int
    token_id: str


class GpuInventoryObserved(Event, tag="gpu.inventory_observed", kw_only=True):
    backend: str
    devices: tuple[GpuDevice, ...] = ()


AnyEvent = Union[
    JobSubmitted,
    JobApproved,
    JobRejected,
    JobPriorityChanged,
    JobDispatched,
    JobStarted,
    JobCompleted,
    JobFailed,
    JobRequeued,
    JobCancelRequested,
    JobCancelled,
    SettingsChanged,
    EntriesPurged,
    UserCreated,
    UserUpdated,
    TokenIssued,
    TokenRevoked,
    GpuInventoryObserved,
]

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls for cls in AnyEvent.__args__  # type: ignore[attr-defined]
}
