"""The command handler: what each request means, as events, or a domain error.

``handle(command, state, actor, now)`` is pure: it reads the state, never changes it,
and returns an :class:`Outcome` whose events the engine commits. Permissions (SPEC
section 6), submit validation and approval rules (sections 2, 4, 5), and the meaning
of what executors report (section 3) all live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from msgspec import Struct, field

from events.types import (
    LEVEL_PRIORITY,
    AnyEvent,
    EntriesPurged,
    GpuDevice,
    GpuInventoryObserved,
    JobApproved,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobFailed,
    JobPriorityChanged,
    JobRejected,
    JobRequeued,
    JobSpec,
    JobStarted,
    JobSubmitted,
    Level,
    Settings,
    SettingsChanged,
    TokenIssued,
    TokenRevoked,
    UserCreated,
    UserUpdated,
)
from projections.state import TERMINAL, JobEntry, QueueState
from service.scheduler import Placement, never_fits, position, probe
from service.wording import plural

__all__ = [
    "DomainError", "UnknownJob", "UnknownUser", "UnknownConfig", "WrongState", "NotAllowed",
    "InvalidRequest", "Conflict", "Actor", "LOCAL_ADMIN", "SYSTEM", "Outcome", "handle", "can_see_all",
    "require_admin", "check_own_or_all", "visible_job", "listing_scope",
    "ConfigSpec", "gpu_count", "Submit", "Cancel", "Approve", "Reject", "SetPriority", "ChangeSettings",
    "Cleanup", "CreateUser", "UpdateUser", "IssueToken", "RevokeToken", "ObserveInventory",
    "ReportStarted", "ReportExited", "ReportFailed", "ReportCancelled", "ExpireApprovals",
    "Process", "Command", "MAX_METADATA_BYTES", "MIN_STARVATION_THRESHOLD_MINUTES",
    "APPROVAL_REQUESTED",
]

MAX_METADATA_BYTES = 64 * 1024
# Aging divides the wait by the threshold: a vanishing threshold would make that quotient
# overflow (a float too large for an int) and stop every scheduling pass.
MIN_STARVATION_THRESHOLD_MINUTES = 0.001
# a cancel waits this long at most for SIGTERM to work before SIGKILL
MAX_CANCEL_GRACE_SECONDS = 3600
LEVELS: tuple[Level, ...] = ("admin", "lead", "researcher", "viewer")


# ---------------------------------------------------------------- domain errors


class DomainError(Exception):
    """A request the queue refuses; ``detail`` says why, for a person."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class UnknownJob(DomainError): ...


class UnknownUser(DomainError): ...


class UnknownConfig(DomainError): ...


class WrongState(DomainError): ...


class NotAllowed(DomainError): ...


class InvalidRequest(DomainError): ...


class Conflict(DomainError): ...


# ---------------------------------------------------------------- actors and permissions


class Actor(Struct, frozen=True, kw_only=True):
    user_id: int
    name: str
    level: Level
    team_id: str | None = None

    @property
    def label(self) -> str:
        """The actor as the log records it: ``user:<id>:<name>``, or the built-in's name."""
        if self.user_id <= 0:
            return self.name
        return f"user:{self.user_id}:{self.name}"


LOCAL_ADMIN = Actor(user_id=0, name="local-admin", level="admin")
SYSTEM = Actor(user_id=-1, name="system", level="admin")


def can_see_all(actor: Actor) -> bool:
    """Leads and admins view and cancel every job; others their own (SPEC section 6)."""
    return actor.level in ("lead", "admin")


def listing_scope(actor: Actor, user_id: int | None) -> int | None:
    """Whose queue entries ``actor`` may list: ``user_id`` as asked (``None``: everyone's)
    for leads and admins, only their own for researchers and viewers."""
    if can_see_all(actor):
        return user_id
    if user_id is not None and user_id != actor.user_id:
        raise NotAllowed("researchers and viewers see only their own entries; "
                         "leave user_id out or give your own")
    return actor.user_id


def _require(actor: Actor, levels: tuple[str, ...], action: str) -> None:
    if actor.level not in levels:
        raise NotAllowed(f"{action} needs level {' or '.join(levels)}; you are {actor.level}")


def require_admin(actor: Actor, action: str) -> None:
    """Only admins may do ``action`` (reads check it too: users, queue settings, audit
    export)."""
    _require(actor, ("admin",), action)


def _job(state: QueueState, job_id: str) -> JobEntry:
    job = state.jobs.get(job_id)
    if job is None:
        raise UnknownJob(f"no job with id {job_id!r}")
    return job


def check_own_or_all(actor: Actor, job: JobEntry, action: str = "view") -> None:
    """Researchers and viewers may ``action`` their own jobs; leads and admins every job."""
    if job.user_id != actor.user_id and not can_see_all(actor):
        raise NotAllowed(f"job {job.job_id} belongs to another user; only leads and admins "
                         f"may {action} it")


def visible_job(state: QueueState, job_id: str, actor: Actor, action: str = "view") -> JobEntry:
    """The job ``actor`` asks for: :class:`UnknownJob` if there is none, :class:`NotAllowed`
    if it is another user's and ``actor`` may not ``action`` every job."""
    job = _job(state, job_id)
    check_own_or_all(actor, job, action)
    return job


# ---------------------------------------------------------------- commands


class ConfigSpec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A config file's fields (SPEC section 2)."""

    command: list[str]
    num_processes: int | None = None
    device_ids: list[int] | None = None
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    estimated_cost: float | None = None


def gpu_count(num_processes: int | None, device_ids: Sequence[int] | None) -> int:
    """GPUs a job needs (SPEC section 2): ``num_processes``, else as many as its
    ``device_ids`` name, else 1."""
    if num_processes is not None:
        return num_processes
    return len(device_ids) if device_ids else 1


class Submit(Struct, frozen=True, kw_only=True):
    job_id: str
    config_name: str
    config: ConfigSpec
    target: Literal["auto", "local", "worker", "cloud"] = "auto"
    num_processes: int | None = None
    device_ids: list[int] | None = None
    any_gpu: bool = False
    no_wait: bool = False
    dry_run: bool = False
    requires_approval: bool = False
    estimated_cost: float | None = None
    worker_labels: dict[str, str] = field(default_factory=dict)
    max_attempts: int = 3
    metadata: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    request_hash: str | None = None


class Cancel(Struct, frozen=True, kw_only=True):
    job_ids: tuple[str, ...] = ()
    all: bool = False


class Approve(Struct, frozen=True):
    job_id: str


class Reject(Struct, frozen=True):
    job_id: str
    reason: str | None = None


class SetPriority(Struct, frozen=True):
    job_id: str
    priority: int | None


class ChangeSettings(Struct, frozen=True):
    changes: dict[str, Any]


class Process(Struct, frozen=True):
    """A scheduling pass now (the engine runs one after every command anyway)."""


class Cleanup(Struct, frozen=True):
    days: int = 30


class CreateUser(Struct, frozen=True, kw_only=True):
    name: str
    level: str
    team_id: str | None = None
    token_id: str
    token_hash: str


class UpdateUser(Struct, frozen=True, kw_only=True):
    user_id: int
    changes: dict[str, Any]


class IssueToken(Struct, frozen=True, kw_only=True):
    user_id: int
    token_id: str
    token_hash: str


class RevokeToken(Struct, frozen=True, kw_only=True):
    user_id: int
    token_id: str


class ObserveInventory(Struct, frozen=True, kw_only=True):
    backend: str
    devices: tuple[GpuDevice, ...]


class ReportStarted(Struct, frozen=True, kw_only=True):
    job_id: str
    pid: int
    process_start_time: int


class ReportExited(Struct, frozen=True, kw_only=True):
    """``ended_at``: when the process ended, where that is known to be earlier than now
    (it ended while the server was down)."""

    job_id: str
    exit_code: int
    ended_at: float | None = None


class ReportFailed(Struct, frozen=True, kw_only=True):
    """The job could not run: ``retryable`` for infrastructure, not for a bad config."""

    job_id: str
    error: str
    retryable: bool
    ended_at: float | None = None  # as for ReportExited


class ReportCancelled(Struct, frozen=True, kw_only=True):
    job_id: str


class ExpireApprovals(Struct, frozen=True):
    """Reject blocked jobs older than ``approval_timeout_hours``."""


Command = (
    Submit | Cancel | Approve | Reject | SetPriority | ChangeSettings | Process | Cleanup
    | CreateUser | UpdateUser | IssueToken | RevokeToken | ObserveInventory | ReportStarted
    | ReportExited | ReportFailed | ReportCancelled | ExpireApprovals
)


class Outcome(Struct, kw_only=True):
    """What a command decided: events to commit, plus what the caller needs to answer."""

    events: list[AnyEvent] = field(default_factory=list)
    job_id: str | None = None
    job_ids: list[str] = field(default_factory=list)
    # submit only: the status it got or would get when nothing is written
    status: str | None = None
    placement: Placement | None = None
    # submit only, when nothing is written: why the job would need an admin's approval,
    # and the queue position it would take (a dry run that would be queued)
    approval_reason: str | None = None
    queue_position: int | None = None
    count: int = 0
    user_id: int | None = None


# ---------------------------------------------------------------- the handler


def handle(command: Command, state: QueueState, actor: Actor, now: float) -> Outcome:
    """Decide the events for one command, or raise a :class:`DomainError`."""
    if type(command) is ReportExited:  # every job's end: spare it the 14 cases before it
        return _exited(command, state)
    match command:
        case Submit():
            return _submit(command, state, actor, now)
        case Cancel():
            return _cancel(command, state, actor)
        case Approve():
            require_admin(actor, "approving a job")
            job = _blocked(state, command.job_id, "approved")
            return Outcome(events=[JobApproved(job_id=job.job_id)], job_id=job.job_id)
        case Reject():
            require_admin(actor, "rejecting a job")
            job = _blocked(state, command.job_id, "rejected")
            reason = (command.reason or "").strip() or f"rejected by {actor.name}"
            return Outcome(events=[JobRejected(job_id=job.job_id, reason=reason)], job_id=job.job_id)
        case SetPriority():
            return _set_priority(command, state, actor)
        case ChangeSettings():
            require_admin(actor, "changing queue settings")
            settings = validated_settings(state.settings, command.changes)
            events: list[AnyEvent] = []
            if settings != state.settings:
                events.append(SettingsChanged(settings=settings))
            return Outcome(events=events)
        case Process():
            require_admin(actor, "triggering a scheduling pass")
            return Outcome()
        case Cleanup():
            return _cleanup(command, state, actor, now)
        case CreateUser():
            return _create_user(command, state, actor)
        case UpdateUser():
            return _update_user(command, state, actor)
        case IssueToken():
            require_admin(actor, "issuing tokens")
            _user(state, command.user_id)
            issued = TokenIssued(
                user_id=command.user_id, token_id=command.token_id, token_hash=command.token_hash
            )
            return Outcome(events=[issued], user_id=command.user_id)
        case RevokeToken():
            require_admin(actor, "revoking tokens")
            _user(state, command.user_id)
            token = state.tokens.get(command.token_id)
            if token is None or token.user_id != command.user_id:
                raise UnknownUser(f"user {command.user_id} has no token {command.token_id!r}")
            return Outcome(events=[TokenRevoked(user_id=command.user_id, token_id=command.token_id)])
        case ObserveInventory():
            if command.backend == state.gpu_backend and command.devices == state.gpus:
                return Outcome()
            return Outcome(events=[
                GpuInventoryObserved(backend=command.backend, devices=command.devices)
            ])
        case ReportStarted():
            job = state.jobs.get(command.job_id)
            if job is None or job.status != "running" or job.pid is not None:
                return Outcome()
            return Outcome(events=[JobStarted(
                job_id=job.job_id, pid=command.pid, process_start_time=command.process_start_time
            )])
        case ReportFailed():
            return _failed(command, state)
        case ReportCancelled():
            job = state.jobs.get(command.job_id)
            if job is None or job.status != "running":
                return Outcome()
            return Outcome(events=[JobCancelled(job_id=job.job_id)])
        case ExpireApprovals():
            return _expire_approvals(state, now)
    raise InvalidRequest(f"unknown command {type(command).__name__}")


# ---------------------------------------------------------------- submit


def resolve_spec(command: Submit, state: QueueState) -> JobSpec:
    """Merge the config with the submit body's overrides, and check it can ever run."""
    config = command.config
    if not config.command or not all(isinstance(arg, str) and arg for arg in config.command):
        raise InvalidRequest(f"config {command.config_name!r} has an empty command")
    if command.target in ("worker", "cloud"):
        what = "remote worker is registered" if command.target == "worker" else (
            "cloud provider is configured")
        raise InvalidRequest(f"target {command.target!r} is not available: no {what} on this "
                             "server; use target 'local' or 'auto'")
    # The body's fields override the config's, and the body's own pair wins: its
    # device_ids say how many GPUs (unless any_gpu), and the config's device_ids apply to
    # the body's num_processes only when they name that many GPUs.
    body_count, body_ids, exact = command.num_processes, command.device_ids, not command.any_gpu
    device_ids = body_ids if body_ids is not None else config.device_ids
    explicit = body_count if body_count is not None else config.num_processes
    if body_count is None and body_ids is not None and exact:
        explicit = None  # the body's device_ids say how many GPUs
    elif body_count is not None and body_ids is None and exact and (
            device_ids is not None and len(device_ids) != body_count):
        device_ids = None  # the config's device_ids were for another count
    if device_ids is not None:
        if any(index < 0 for index in device_ids):
            raise InvalidRequest("device_ids must be GPU indices (0 or more)")
        if len(set(device_ids)) != len(device_ids):
            raise InvalidRequest(f"device_ids {device_ids} lists a GPU twice")
    need = gpu_count(explicit, device_ids)  # any_gpu or not
    if need < 0:
        raise InvalidRequest(f"num_processes must be 0 or more, not {need}")
    if device_ids and not command.any_gpu and len(device_ids) != need:
        raise InvalidRequest(f"num_processes is {need} but device_ids names "
                             f"{plural(len(device_ids), 'GPU')}; give as many device_ids as "
                             "processes, or set any_gpu")
    why = never_fits(state, need, tuple(device_ids or ()))  # SPEC 4: even with any_gpu
    if why is not None:
        raise InvalidRequest(f"this job could never start: {why}")
    stated, configured = command.estimated_cost, config.estimated_cost  # configs are checked
    if stated is not None and stated < 0:
        raise InvalidRequest("estimated_cost must be 0 or more")
    # the body may raise the config's cost, never lower it: approval is not for the
    # submitter to talk their way out of
    cost = configured if stated is None else stated if configured is None else (
        max(stated, configured))
    return JobSpec(
        config_name=command.config_name,
        command=tuple(config.command),
        num_processes=need,
        device_ids=tuple(device_ids) if device_ids else None,
        any_gpu=command.any_gpu,
        env=dict(config.env),
        working_dir=config.working_dir,
        estimated_cost=cost,
        target="local",
        worker_labels=dict(command.worker_labels),
    )


APPROVAL_REQUESTED = "approval was requested at submission"  # the reason, as recorded


def approval_needed(spec: JobSpec, requested: bool, actor: Actor, settings: Settings) -> str | None:
    """SPEC section 5: why this job must wait for an admin, or ``None``."""
    if requested:
        return APPROVAL_REQUESTED
    cost = spec.estimated_cost
    if cost is not None and cost > settings.approval_cost_threshold and actor.level != "admin":
        return (f"estimated_cost {cost:g} exceeds approval_cost_threshold "
                f"{settings.approval_cost_threshold:g}")
    return None


def _submit(command: Submit, state: QueueState, actor: Actor, now: float) -> Outcome:
    if command.idempotency_key is not None:
        existing = state.idempotency.get((actor.user_id, command.idempotency_key))
        if existing is not None:
            job = state.jobs[existing]
            if job.request_hash != command.request_hash:
                raise Conflict(f"idempotency_key {command.idempotency_key!r} was already used "
                               f"for job {existing} with a different request")
            return Outcome(job_id=existing, status=job.status)
    if command.max_attempts < 1:
        raise InvalidRequest("max_attempts must be 1 or more")
    if len(msgspec.json.encode(command.metadata)) > MAX_METADATA_BYTES:
        raise InvalidRequest(f"metadata is larger than {MAX_METADATA_BYTES // 1024} KiB")
    spec = resolve_spec(command, state)
    approval = approval_needed(spec, command.requires_approval, actor, state.settings)
    submitted = JobSubmitted(
        job_id=command.job_id,
        user_id=actor.user_id,
        team_id=actor.team_id,
        spec=spec,
        priority=LEVEL_PRIORITY[actor.level],
        requires_approval=approval is not None,
        approval_reason=approval,
        idempotency_key=command.idempotency_key,
        request_hash=command.request_hash,
        max_attempts=command.max_attempts,
        metadata=command.metadata,
    )
    if not (command.no_wait or command.dry_run):
        return Outcome(events=[submitted], job_id=command.job_id)
    # a dry run answers what the same request without it would get, no_wait included
    if approval is not None:
        status = "rejected" if command.no_wait else "blocked"
        return Outcome(job_id=None, status=status, approval_reason=approval)
    candidate = JobEntry(
        job_id=command.job_id,
        user_id=actor.user_id,
        team_id=actor.team_id,
        spec=spec,
        priority=submitted.priority,
        status="pending",
        submitted_at=now,
        queued_at=now,
        submit_seq=state.last_seq + 1,
    )
    placement = probe(state, candidate, now)
    if command.dry_run:
        status = "running" if placement.starts else "rejected" if command.no_wait else "queued"
        where = position(state, candidate, now) if status == "queued" else None
        return Outcome(job_id=None, status=status, placement=placement,
                       queue_position=where)
    if not placement.starts:
        return Outcome(job_id=None, status="rejected", placement=placement)
    return Outcome(events=[submitted], job_id=command.job_id)


# ---------------------------------------------------------------- cancel, approve, priority


def _cancel_events(job: JobEntry) -> list[AnyEvent]:
    if job.status == "running":
        return [] if job.cancel_requested else [JobCancelRequested(job_id=job.job_id)]
    return [JobCancelled(job_id=job.job_id)]


def _cancel(command: Cancel, state: QueueState, actor: Actor) -> Outcome:
    if command.all and command.job_ids:
        raise InvalidRequest("give either job_ids or all: true, not both")
    if command.all:
        everyone = can_see_all(actor)
        targets = [
            job for job in state.jobs.values()
            if job.status not in TERMINAL and (everyone or job.user_id == actor.user_id)
        ]
    else:
        if not command.job_ids:
            raise InvalidRequest("give job_ids to cancel, or all: true")
        targets = []
        for job_id in dict.fromkeys(command.job_ids):
            job = visible_job(state, job_id, actor, "cancel")
            if job.status in TERMINAL:
                raise WrongState(f"job {job_id} is already {job.status}; nothing was cancelled")
            targets.append(job)
    events = [event for job in targets for event in _cancel_events(job)]
    return Outcome(events=events, job_ids=[job.job_id for job in targets])


def _blocked(state: QueueState, job_id: str, verb: str) -> JobEntry:
    job = _job(state, job_id)
    if job.status != "blocked":
        why = f" ({job.error_message})" if job.status == "rejected" and job.error_message else ""
        raise WrongState(f"job {job_id} is {job.status}{why}; only blocked jobs can be {verb}")
    return job


def _set_priority(command: SetPriority, state: QueueState, actor: Actor) -> Outcome:
    _require(actor, ("lead", "admin"), "overriding a job's priority")
    priority = command.priority
    if priority is not None and (isinstance(priority, bool) or not 0 <= priority <= 100):
        raise InvalidRequest(f"priority must be 0 to 100, or null; got {priority}")
    job = _job(state, command.job_id)
    if job.status not in ("pending", "blocked"):
        raise WrongState(f"job {job.job_id} is {job.status}; only pending or blocked jobs "
                         "can get a priority override")
    if job.priority_override == priority:
        return Outcome(job_id=job.job_id)
    event = JobPriorityChanged(job_id=job.job_id, priority_override=priority)
    return Outcome(events=[event], job_id=job.job_id)


# ---------------------------------------------------------------- settings


_POSITIVE_INTS = (
    "max_concurrent", "user_max_concurrent", "team_max_concurrent", "local_job_max_concurrent",
)


def _as_json(value: Any) -> str:
    """A value as the person wrote it in JSON (or as --what-if took it): true, null, "2"."""
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        return repr(value)


def validated_settings(current: Settings, changes: dict[str, Any]) -> Settings:
    """Apply ``changes`` to ``current``; every value is checked (limits are 1 or more)."""
    known = set(Settings.__struct_fields__)
    unknown = sorted(set(changes) - known)
    if unknown:
        raise InvalidRequest(f"unknown setting(s): {', '.join(unknown)}")

    def whole(name: str, value: Any, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidRequest(f"{name} must be a whole number of {low} or more, "
                                 f"not {_as_json(value)}")

    def number(name: str, value: Any, low: float, strict: bool) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or value < low or (strict and value == low):
            bound = f"more than {low:g}" if strict else f"{low:g} or more"
            raise InvalidRequest(f"{name} must be a number {bound}, not {_as_json(value)}")

    for name, value in changes.items():
        if name in _POSITIVE_INTS:
            whole(name, value, 1)
        elif name == "local_gpu_max_concurrent":
            if value is not None:
                whole(name, value, 1)
        elif name == "enable_fair_share":
            if not isinstance(value, bool):
                raise InvalidRequest("enable_fair_share must be true or false, "
                                     f"not {_as_json(value)}")
        elif name == "starvation_boost":
            whole(name, value, 0)
        elif name == "starvation_threshold_minutes":
            number(name, value, MIN_STARVATION_THRESHOLD_MINUTES, strict=False)
        elif name == "approval_timeout_hours":
            number(name, value, 0, strict=True)
        elif name == "approval_cost_threshold":
            number(name, value, 0, strict=False)
        elif name == "cancel_grace_seconds":
            number(name, value, 0, strict=False)
            if value > MAX_CANCEL_GRACE_SECONDS:
                raise InvalidRequest(f"cancel_grace_seconds must be at most "
                                     f"{MAX_CANCEL_GRACE_SECONDS}, not {_as_json(value)}")
    return msgspec.structs.replace(current, **changes)


# ---------------------------------------------------------------- cleanup and expiry


def _cleanup(command: Cleanup, state: QueueState, actor: Actor, now: float) -> Outcome:
    require_admin(actor, "cleaning up the queue")
    days = command.days
    if isinstance(days, bool) or not 1 <= days <= 365:
        raise InvalidRequest(f"days must be 1 to 365, not {days}")
    cutoff = now - days * 86400.0
    old = tuple(
        job.job_id for job in state.jobs.values()
        if job.status in TERMINAL and job.completed_at is not None and job.completed_at < cutoff
    )
    events: list[AnyEvent] = [EntriesPurged(job_ids=old, days=days)] if old else []
    return Outcome(events=events, count=len(old))


def _expire_approvals(state: QueueState, now: float) -> Outcome:
    timeout = state.settings.approval_timeout_hours * 3600.0
    events: list[AnyEvent] = []
    for job_id in state.blocked:  # oldest submission first
        if now - state.jobs[job_id].submitted_at <= timeout:
            break
        events.append(JobRejected(job_id=job_id, reason="approval expired"))
    return Outcome(events=events)


# ---------------------------------------------------------------- users and tokens


def _user(state: QueueState, user_id: int) -> None:
    if user_id not in state.users:
        raise UnknownUser(f"no user with id {user_id}")


def _check_level(level: Any) -> Level:
    if level not in LEVELS:
        raise InvalidRequest(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    return level  # type: ignore[no-any-return]


def _check_name(state: QueueState, name: Any, user_id: int | None) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("name must be a non-empty string")
    name = name.strip()
    for user in state.users.values():
        if user.name == name and user.user_id != user_id:
            raise Conflict(f"a user named {name!r} already exists (id {user.user_id})")
    return name


def _create_user(command: CreateUser, state: QueueState, actor: Actor) -> Outcome:
    require_admin(actor, "managing users")
    level = _check_level(command.level)
    name = _check_name(state, command.name, None)
    user_id = max(state.users, default=0) + 1
    return Outcome(
        events=[
            UserCreated(user_id=user_id, name=name, level=level, team_id=command.team_id),
            TokenIssued(user_id=user_id, token_id=command.token_id, token_hash=command.token_hash),
        ],
        user_id=user_id,
    )


def _update_user(command: UpdateUser, state: QueueState, actor: Actor) -> Outcome:
    require_admin(actor, "managing users")
    _user(state, command.user_id)
    user = state.users[command.user_id]
    unknown = sorted(set(command.changes) - {"name", "level", "team_id"})
    if unknown:
        raise InvalidRequest(f"unknown user field(s): {', '.join(unknown)}")
    name = _check_name(state, command.changes.get("name", user.name), user.user_id)
    level = _check_level(command.changes.get("level", user.level))
    team_id = command.changes.get("team_id", user.team_id)
    if team_id is not None and not isinstance(team_id, str):
        raise InvalidRequest("team_id must be a string or null")
    admins = [u for u in state.users.values() if u.level == "admin"]
    if user.level == "admin" and level != "admin" and len(admins) == 1:
        raise Conflict("this is the last admin; make another user admin first")
    if (name, level, team_id) == (user.name, user.level, user.team_id):
        return Outcome(user_id=user.user_id)  # nothing changes: nothing to record
    event = UserUpdated(user_id=user.user_id, name=name, level=level, team_id=team_id)
    return Outcome(events=[event], user_id=user.user_id)


# ---------------------------------------------------------------- what executors report


def _exited(command: ReportExited, state: QueueState) -> Outcome:
    job = state.jobs.get(command.job_id)
    if job is None or job.status != "running":
        return Outcome()
    ended_at = command.ended_at
    if job.cancel_requested:
        return Outcome(events=[JobCancelled(job_id=job.job_id, ended_at=ended_at)])
    if command.exit_code == 0:
        return Outcome(events=[JobCompleted(job_id=job.job_id, exit_code=0, ended_at=ended_at)])
    error = f"the command exited with code {command.exit_code}"
    if command.exit_code < 0:
        error = f"the command was killed by signal {-command.exit_code}"
    return Outcome(events=[JobFailed(
        job_id=job.job_id, error=error, exit_code=command.exit_code, retryable=False,
        ended_at=ended_at,
    )])


def _failed(command: ReportFailed, state: QueueState) -> Outcome:
    """Infrastructure failures re-queue while ``attempt < max_attempts`` (SPEC section 3)."""
    job = state.jobs.get(command.job_id)
    if job is None or job.status != "running":
        return Outcome()
    if job.cancel_requested:
        return Outcome(events=[JobCancelled(job_id=job.job_id, ended_at=command.ended_at)])
    retry = command.retryable and job.attempt < job.max_attempts
    events: list[AnyEvent] = [JobFailed(
        job_id=job.job_id, error=command.error, exit_code=None, retryable=retry,
        ended_at=command.ended_at,
    )]
    if retry:
        events.append(JobRequeued(job_id=job.job_id, attempt=job.attempt + 1, reason=command.error))
    return Outcome(events=events)
