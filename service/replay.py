"""The replay debugger (SPEC section 10): the past, folded again and decided again.

Everything here is a function over a stream of :class:`Recorded` events (read from a
SQLite log or an audit export by :mod:`service.audit`); nothing writes anywhere.

- :func:`replay_until` folds the log up to a seq or a time: the queue, stats and GPU
  allocation as they stood then (:func:`queue_view`, ``projections.views``), and
  ``scheduler.explain`` at that moment.
- :func:`check` re-runs ``scheduler.decide`` wherever the log shows a scheduling pass
  and reports every decision that differs. The engine commits a batch of commands at one
  ``at`` and runs one pass after them (and one right after a ``no_wait`` submit); a pass's
  ``job.dispatched`` events share their ``causation_id`` and ``at``, so consecutive
  dispatches with the same pair are one pass, decided on the state just before them.
  Where ``at`` changes a commit has ended after a pass; when that pass started nothing,
  a pass there must still find nothing to start: a log in which it would is reported too
  (``missed``).
- :func:`what_if` replays the recorded inputs (submissions, cancellations, approvals,
  rejections, priority and settings changes, GPU inventory) and each job's recorded run
  time under other settings, through the real pure core (``commands.handle``, the fold,
  ``scheduler.decide``) on a simulated clock, event by event, and compares the waits
  per user and per team and the GPU utilisation with what happened. A pass runs after
  every simulated instant and at every instant the recording shows a commit (the engine
  ran a pass then: that is where its periodic passes let aging start a job), so with no
  change the replay makes exactly the recorded decisions.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator
from typing import Any, Literal, Protocol

import msgspec
from msgspec import Struct, field

from events.envelope import Recorded
from events.types import (
    LEVEL_PRIORITY,
    AnyEvent,
    GpuInventoryObserved,
    JobApproved,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobDispatched,
    JobFailed,
    JobPriorityChanged,
    JobRejected,
    JobSubmitted,
    Level,
    Settings,
    SettingsChanged,
    TokenIssued,
    TokenRevoked,
    UserCreated,
    UserUpdated,
)
from projections.fold import EventDoesNotFit, apply, apply_event, fold
from projections.state import JobEntry, QueueState
from projections.views import gpu_allocation, stats
from service import scheduler
from service.commands import (
    APPROVAL_REQUESTED,
    LOCAL_ADMIN,
    Actor,
    Approve,
    Cancel,
    ChangeSettings,
    Command,
    ConfigSpec,
    DomainError,
    Reject,
    ReportCancelled,
    ReportExited,
    ReportFailed,
    SetPriority,
    Submit,
    handle,
    validated_settings,
)

__all__ = [
    "ReplayError",
    "Progress",
    "Moment",
    "prefix",
    "replay_until",
    "queue_view",
    "moment_view",
    "explain_at",
    "Dispatch",
    "Difference",
    "CheckReport",
    "check",
    "parse_overrides",
    "WaitSummary",
    "Utilisation",
    "GroupComparison",
    "WhatIfReport",
    "what_if",
]


class ReplayError(Exception):
    """A replay request that cannot be answered (an unknown job, a bad setting)."""


class Progress(Protocol):
    """Told how far a long replay has got (the CLI draws a bar on a terminal)."""

    def phase(self, name: str, total: int | None) -> None: ...

    def advance(self, count: int = 1) -> None: ...


class _Silent:
    def phase(self, name: str, total: int | None) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass


def _counted(records: Iterable[Recorded], progress: Progress) -> Iterator[Recorded]:
    for recorded in records:
        yield recorded
        progress.advance()


# ---------------------------------------------------------------- a point in time


class Moment:
    """The state as of one point of the log, and the clock reading that goes with it."""

    __slots__ = ("state", "now", "seq")

    def __init__(self, state: QueueState, now: float, seq: int) -> None:
        self.state = state
        self.now = now
        self.seq = seq


def prefix(
    records: Iterable[Recorded], until_seq: int | None = None, until_at: float | None = None
) -> Iterator[Recorded]:
    """The records up to and including ``until_seq`` and time ``until_at`` (when given)."""
    for recorded in records:
        if until_seq is not None and recorded.seq > until_seq:
            return
        if until_at is not None and recorded.at > until_at:
            return
        yield recorded


def replay_until(
    records: Iterable[Recorded],
    *,
    until_seq: int | None = None,
    until_at: float | None = None,
    progress: Progress | None = None,
) -> Moment:
    """Fold the log up to and including ``until_seq`` and/or time ``until_at``.

    ``now`` is ``until_at`` when given (aging and waits are measured at that instant),
    else the time of the last event folded.
    """
    progress = progress or _Silent()
    state = fold(_counted(prefix(records, until_seq, until_at), progress))
    now = until_at if until_at is not None else state.last_at
    return Moment(state, now, state.last_seq)


def _user_name(state: QueueState, user_id: int) -> str:
    user = state.users.get(user_id)
    if user is not None:
        return user.name
    return LOCAL_ADMIN.name if user_id == LOCAL_ADMIN.user_id else str(user_id)


def queue_view(state: QueueState, now: float) -> dict[str, list[dict[str, Any]]]:
    """Pending jobs in queue order with positions, running jobs, blocked jobs."""
    settings = state.settings
    pending = [
        {
            "position": position,
            "job_id": job.job_id,
            "user": _user_name(state, job.user_id),
            "team_id": job.team_id,
            "config_name": job.spec.config_name,
            "num_processes": job.spec.num_processes,
            "priority": job.base_priority,
            "effective_priority": scheduler.job_effective_priority(job, now, settings),
            "queued_at": job.queued_at,
            "waited_seconds": now - job.queued_at,
        }
        for position, job in enumerate(scheduler.pending_in_order(state, now), start=1)
    ]
    running = [
        {
            "job_id": job.job_id,
            "user": _user_name(state, job.user_id),
            "team_id": job.team_id,
            "config_name": job.spec.config_name,
            "gpus": list(job.allocated_gpus),
            "attempt": job.attempt,
            "started_at": job.started_at,
            "running_seconds": now - job.started_at if job.started_at is not None else None,
            "cancel_requested": job.cancel_requested,
        }
        for job in (state.jobs[job_id] for job_id in state.running)
    ]
    blocked = [
        {
            "job_id": job.job_id,
            "user": _user_name(state, job.user_id),
            "team_id": job.team_id,
            "config_name": job.spec.config_name,
            "estimated_cost": job.spec.estimated_cost,
            "reason": job.approval_reason,
            "submitted_at": job.submitted_at,
        }
        for job in (state.jobs[job_id] for job_id in state.blocked)
    ]
    return {"pending": pending, "running": running, "blocked": blocked}


def moment_view(moment: Moment) -> dict[str, Any]:
    """Everything ``gpuyard replay --until...`` shows, as plain data."""
    state = moment.state
    return {
        "seq": moment.seq,
        "at": moment.now,
        "queue": queue_view(state, moment.now),
        "stats": stats(state, moment.now),
        "gpu_allocation": gpu_allocation(state),
    }


def explain_at(moment: Moment, job_id: str) -> scheduler.Explanation:
    """``scheduler.explain`` for one job at that point of the log."""
    if job_id not in moment.state.jobs:
        raise ReplayError(f"no job with id {job_id!r} in the log up to seq {moment.seq}")
    return scheduler.explain(moment.state, job_id, moment.now)



# ---------------------------------------------------------------- check


class Dispatch(Struct, frozen=True):
    job_id: str
    gpus: tuple[int, ...] = ()


class Difference(Struct, frozen=True, kw_only=True):
    """A pass whose recorded dispatches are not what the scheduler decides now.

    ``differs``: the recorded pass at ``seq`` (its first dispatch) started other jobs or
    GPUs. ``missed``: after the commit ending at ``seq`` a pass would start more jobs.
    """

    kind: Literal["differs", "missed"]
    seq: int
    at: float
    recorded: list[Dispatch]
    decided: list[Dispatch]


class CheckReport(Struct, kw_only=True):
    events: int = 0
    passes: int = 0  # recorded passes (groups of dispatches) re-decided
    dispatches: int = 0
    commits: int = 0  # commit ends without dispatches, checked for missed ones
    differences: list[Difference] = field(default_factory=list)


def _decided(state: QueueState, now: float) -> list[Dispatch]:
    return [Dispatch(d.job_id, tuple(d.gpus)) for d in scheduler.decide(state, now)]


def check(records: Iterable[Recorded], progress: Progress | None = None) -> CheckReport:
    """Re-decide every recorded scheduling pass; report each decision that differs."""
    progress = progress or _Silent()
    report = CheckReport()
    state = QueueState()
    group: tuple[int | None, float] | None = None
    group_seq = 0
    recorded_group: list[Dispatch] = []
    decided_group: list[Dispatch] = []
    previous: Recorded | None = None

    def close_group() -> None:
        nonlocal group
        report.passes += 1
        if recorded_group != decided_group:
            report.differences.append(Difference(
                kind="differs", seq=group_seq, at=group[1] if group else 0.0,
                recorded=list(recorded_group), decided=list(decided_group),
            ))
        group = None

    def commit_ended(last: Recorded) -> None:
        if isinstance(last.event, JobDispatched):
            return  # the commit ended with a pass that was re-decided just now
        report.commits += 1
        extra = _decided(state, last.at)
        if extra:
            report.differences.append(Difference(
                kind="missed", seq=last.seq, at=last.at, recorded=[], decided=extra,
            ))

    for recorded in _counted(records, progress):
        report.events += 1
        event = recorded.event
        key = (recorded.causation_id, recorded.at) if isinstance(event, JobDispatched) else None
        if group is not None and key != group:
            close_group()
        if previous is not None and recorded.at != previous.at:
            commit_ended(previous)
        if isinstance(event, JobDispatched):
            if group is None:
                group, group_seq = key, recorded.seq
                decided_group = _decided(state, recorded.at)
                recorded_group = []
            recorded_group.append(Dispatch(event.job_id, tuple(event.gpus)))
            report.dispatches += 1
        apply(state, recorded)
        previous = recorded
    if group is not None:
        close_group()
    if previous is not None:
        commit_ended(previous)
    return report


# ---------------------------------------------------------------- what-if: settings


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("null", "none", "unlimited"):
        return None
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    try:
        return int(lowered)
    except ValueError:
        pass
    try:
        value = float(lowered)
    except ValueError:
        raise ReplayError(f"{text!r} is not a number, true/false or null") from None
    if not math.isfinite(value):
        raise ReplayError(f"{text!r} is not a finite number")
    return value


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``["max_concurrent=10", "enable_fair_share=true"]`` -> checked settings changes."""
    changes: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ReplayError(f"--what-if takes key=value, not {pair!r}")
        try:
            changes[name] = _parse_value(text)
        except ReplayError as exc:
            raise ReplayError(f"{name}: {exc}") from None
    try:
        validated_settings(Settings(), changes)
    except DomainError as exc:
        raise ReplayError(exc.detail) from None
    return changes


# ---------------------------------------------------------------- what-if: measuring


class WaitSummary(Struct, kw_only=True):
    """Waits (dispatch minus ``queued_at``, first start only) of a group of jobs."""

    jobs: int
    started: int
    mean_seconds: float | None
    p95_seconds: float | None


class Utilisation(Struct, kw_only=True):
    """GPU time held by jobs over the span from the first submission to the last event."""

    gpus: int
    gpu_hours: float
    span_hours: float
    utilisation: float | None  # allocated GPU time / (GPUs x span)


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank


def _summary(job_ids: list[str], waits: dict[str, float]) -> WaitSummary:
    started = [waits[job_id] for job_id in job_ids if job_id in waits]
    return WaitSummary(
        jobs=len(job_ids),
        started=len(started),
        mean_seconds=sum(started) / len(started) if started else None,
        p95_seconds=_p95(started),
    )


class _Meter:
    """Watches a stream of events (with the state just before each) for waits and GPUs."""

    def __init__(self) -> None:
        self.owner: dict[str, tuple[int, str | None]] = {}
        self.wait: dict[str, float] = {}
        self.holding: dict[str, tuple[float, int]] = {}
        self.gpu_seconds = 0.0
        self.gpu_count = 0
        self.first_at: float | None = None
        self.last_at: float | None = None

    def observe(self, state: QueueState, event: AnyEvent, at: float) -> None:
        match event:
            case JobSubmitted():
                self.owner[event.job_id] = (event.user_id, event.team_id)
                if self.first_at is None:
                    self.first_at = at
            case JobDispatched():
                if event.job_id not in self.wait:
                    self.wait[event.job_id] = at - state.jobs[event.job_id].queued_at
                self.holding[event.job_id] = (at, len(event.gpus))
            case JobCompleted() | JobFailed() | JobCancelled():
                self.release(event.job_id, at)
            case GpuInventoryObserved():
                self.gpu_count = max(self.gpu_count, len(event.devices))
            case _:
                pass
        self.last_at = at

    def release(self, job_id: str, at: float) -> None:
        held = self.holding.pop(job_id, None)
        if held is not None:
            self.gpu_seconds += held[1] * (at - held[0])

    def utilisation(self, end: float) -> Utilisation:
        gpu_seconds = self.gpu_seconds + sum(
            count * (end - start) for start, count in self.holding.values()
        )
        span = end - self.first_at if self.first_at is not None else 0.0
        capacity = self.gpu_count * span
        return Utilisation(
            gpus=self.gpu_count,
            gpu_hours=gpu_seconds / 3600.0,
            span_hours=span / 3600.0,
            utilisation=gpu_seconds / capacity if capacity > 0 else None,
        )


class GroupComparison(Struct, kw_only=True):
    group: Literal["all", "user", "team"]
    name: str
    recorded: WaitSummary
    what_if: WaitSummary


class WhatIfReport(Struct, kw_only=True):
    overrides: dict[str, Any]
    settings: dict[str, Any]  # what-if settings at the end of the replay
    rows: list[GroupComparison]
    recorded_utilisation: Utilisation
    what_if_utilisation: Utilisation
    refused: dict[str, int]  # recorded inputs the core refused under the new settings


# ---------------------------------------------------------------- what-if: the plan


_LEVEL_BY_PRIORITY: dict[int, Level] = {
    priority: level for level, priority in LEVEL_PRIORITY.items()  # type: ignore[misc]
}

_FACT, _COMMAND, _FINISH, _PASS = 0, 1, 2, 3


class _Ending(Struct, frozen=True):
    """How one recorded attempt ended: after ``duration`` seconds, with ``command``."""

    duration: float
    seq: int
    command: Command


class _Plan:
    """The recorded inputs, each job attempt's run time and ending, and the facts."""

    def __init__(self) -> None:
        self.items: list[tuple[float, int, int, Any, Actor | None]] = []
        self.endings: dict[tuple[str, int], _Ending] = {}
        self.cancel_grace: dict[str, float] = {}
        self.meter = _Meter()
        self.names: dict[int, str] = {}
        self.end = 0.0
        self.instants: list[float] = []  # every recorded commit time, once


def _submit_input(event: JobSubmitted, state: QueueState, at: float) -> tuple[Submit, Actor]:
    level = _LEVEL_BY_PRIORITY.get(event.priority, "researcher")
    actor = Actor(user_id=event.user_id, name=_user_name(state, event.user_id), level=level,
                  team_id=event.team_id)
    spec = event.spec
    command = Submit(
        job_id=event.job_id,
        config_name=spec.config_name,
        config=ConfigSpec(
            command=list(spec.command),
            num_processes=spec.num_processes,
            device_ids=list(spec.device_ids) if spec.device_ids else None,
            env=dict(spec.env),
            working_dir=spec.working_dir,
            estimated_cost=spec.estimated_cost,
        ),
        target="local" if spec.target == "local" else "auto",
        any_gpu=spec.any_gpu,
        # only an approval the submitter asked for: the cost rule is the replay's to apply
        requires_approval=event.approval_reason == APPROVAL_REQUESTED,
        worker_labels=dict(spec.worker_labels),
        max_attempts=event.max_attempts,
        metadata=dict(event.metadata),
        idempotency_key=event.idempotency_key,
        request_hash=event.request_hash,
    )
    return command, actor


def _ending(job: JobEntry, event: AnyEvent, seq: int, at: float) -> _Ending | None:
    duration = at - (job.started_at if job.started_at is not None else at)
    match event:
        case JobCompleted() | JobFailed() if event.exit_code is not None:
            exited = ReportExited(job_id=job.job_id, exit_code=event.exit_code)
            return _Ending(duration, seq, exited)
        case JobFailed():
            command = ReportFailed(job_id=job.job_id, error=event.error, retryable=event.retryable)
            return _Ending(duration, seq, command)
        case JobCancelled() if not job.cancel_requested:
            return _Ending(duration, seq, ReportCancelled(job_id=job.job_id))
    return None


def _plan(records: Iterable[Recorded], progress: Progress) -> _Plan:
    """One pass over the recording: inputs to replay, run times, and recorded waits."""
    plan = _Plan()
    state = QueueState()
    cancel_asked: dict[str, float] = {}
    for recorded in _counted(records, progress):
        try:
            _take(plan, state, cancel_asked, recorded)
        except EventDoesNotFit.CAUSES as exc:  # its reads of the state, as apply's below
            raise EventDoesNotFit(recorded.seq, recorded.event, exc) from exc
        apply(state, recorded)
    plan.end = state.last_at
    plan.names = {user_id: user.name for user_id, user in state.users.items()}
    return plan


def _take(plan: _Plan, state: QueueState, cancel_asked: dict[str, float],
          recorded: Recorded) -> None:
    """One recorded event's part of the plan, read against the state before it."""
    event, at, seq = recorded.event, recorded.at, recorded.seq
    items = plan.items

    def command(cmd: Command, actor: Actor | None = None) -> None:
        items.append((at, seq, _COMMAND, cmd, actor or LOCAL_ADMIN))

    if not plan.instants or plan.instants[-1] != at:
        plan.instants.append(at)
    plan.meter.observe(state, event, at)
    match event:
        case JobSubmitted():
            command(*_submit_input(event, state, at))
        case JobApproved():
            command(Approve(event.job_id))
        case JobRejected():
            command(Reject(event.job_id, event.reason))
        case JobPriorityChanged():
            command(SetPriority(event.job_id, event.priority_override))
        case JobCancelRequested():
            cancel_asked[event.job_id] = at
            command(Cancel(job_ids=(event.job_id,)))
        case JobCancelled() if state.jobs[event.job_id].status in ("pending", "blocked"):
            command(Cancel(job_ids=(event.job_id,)))
        case JobCompleted() | JobFailed() | JobCancelled():
            job = state.jobs[event.job_id]
            if job.status == "running":
                if job.cancel_requested and isinstance(event, JobCancelled):
                    asked = cancel_asked.get(job.job_id, at)
                    plan.cancel_grace[job.job_id] = at - asked
                ending = _ending(job, event, seq, at)
                if ending is not None:
                    plan.endings[(job.job_id, job.attempt)] = ending
        case SettingsChanged():
            items.append((at, seq, _FACT, event, None))
        case GpuInventoryObserved() | UserCreated() | UserUpdated():
            items.append((at, seq, _FACT, event, None))
        case TokenIssued() | TokenRevoked():
            pass  # who may call the API does not change what the queue decides
        case _:
            pass  # dispatches, starts and requeues are what the replay decides anew


# ---------------------------------------------------------------- what-if: the simulation


class _Simulation:
    """The pure core on a simulated clock: inputs and job endings in time order."""

    def __init__(self, plan: _Plan, overrides: dict[str, Any], progress: Progress) -> None:
        self.plan = plan
        self.overrides = overrides
        self.progress = progress
        self.state = QueueState()
        self.meter = _Meter()
        self.seq = 0
        self.order = 0
        self.refused: dict[str, int] = {}
        self.heap: list[tuple[float, int, int, int, Any, Actor | None]] = []

    def push(self, at: float, seq: int, kind: int, payload: Any, actor: Actor | None) -> None:
        self.order += 1
        heapq.heappush(self.heap, (at, seq, self.order, kind, payload, actor))

    def commit(self, events: list[AnyEvent], at: float) -> None:
        for event in events:
            self.seq += 1
            self.meter.observe(self.state, event, at)
            apply_event(self.state, event, self.seq, at)

    def execute(self, command: Command, actor: Actor, at: float) -> None:
        try:
            outcome = handle(command, self.state, actor, at)
        except DomainError:
            name = type(command).__name__
            self.refused[name] = self.refused.get(name, 0) + 1
            return
        self.commit(outcome.events, at)
        for event in outcome.events:
            if isinstance(event, JobCancelRequested):  # the process stops after its grace
                job = self.state.jobs[event.job_id]
                grace = self.plan.cancel_grace.get(event.job_id, 0.0)
                self.push(at + grace, -1, _FINISH, (job.job_id, job.attempt,
                                                    ReportCancelled(job_id=job.job_id)), None)

    def fact(self, event: AnyEvent, at: float) -> None:
        if isinstance(event, SettingsChanged):
            changes = msgspec.to_builtins(event.settings)
            for name in self.overrides:
                changes.pop(name, None)
            self.execute(ChangeSettings(changes), LOCAL_ADMIN, at)
        else:
            self.commit([event], at)

    def finish(self, job_id: str, attempt: int, command: Command, at: float) -> None:
        job = self.state.jobs.get(job_id)
        if job is None or job.status != "running" or job.attempt != attempt:
            return  # cancelled or re-queued in the replay before this recorded ending
        self.execute(command, LOCAL_ADMIN, at)

    def schedule(self, at: float) -> None:
        dispatches = scheduler.decide(self.state, at)
        self.commit(list(dispatches), at)
        for dispatch in dispatches:
            ending = self.plan.endings.get((dispatch.job_id, dispatch.attempt))
            if ending is not None:  # else it never ended in the recording: it keeps running
                payload = (dispatch.job_id, dispatch.attempt, ending.command)
                self.push(at + ending.duration, ending.seq, _FINISH, payload, None)

    def run(self) -> None:
        for at, seq, kind, payload, actor in self.plan.items:
            self.push(at, seq, kind, payload, actor)
        self.progress.phase("replaying", len(self.heap))
        for at in self.plan.instants:  # the engine ran a pass at each of them
            self.push(at, 0, _PASS, None, None)
        if self.overrides:
            start = self.heap[0][0] if self.heap else 0.0
            self.execute(ChangeSettings(dict(self.overrides)), LOCAL_ADMIN, start)
        heap = self.heap
        while heap:
            now = heap[0][0]
            while heap and heap[0][0] == now:
                _, _, _, kind, payload, actor = heapq.heappop(heap)
                if kind == _COMMAND:
                    self.execute(payload, actor or LOCAL_ADMIN, now)
                    self.progress.advance()
                elif kind == _FACT:
                    self.fact(payload, now)
                    self.progress.advance()
                elif kind == _FINISH:
                    job_id, attempt, command = payload
                    self.finish(job_id, attempt, command, now)
            self.schedule(now)


def what_if(
    records: Iterable[Recorded],
    overrides: dict[str, Any],
    progress: Progress | None = None,
) -> WhatIfReport:
    """Replay the recorded inputs and run times under ``overrides``; compare the waits."""
    progress = progress or _Silent()
    progress.phase("reading", None)
    plan = _plan(records, progress)
    simulation = _Simulation(plan, overrides, progress)
    simulation.run()
    recorded, replayed = plan.meter, simulation.meter

    names = dict(plan.names)
    names.setdefault(LOCAL_ADMIN.user_id, LOCAL_ADMIN.name)
    by_user: dict[str, list[str]] = {}
    by_team: dict[str, list[str]] = {}
    for job_id, (user_id, team_id) in recorded.owner.items():
        by_user.setdefault(names.get(user_id, str(user_id)), []).append(job_id)
        by_team.setdefault(team_id or "(no team)", []).append(job_id)
    everyone = list(recorded.owner)
    rows = [GroupComparison(group="all", name="all jobs",
                            recorded=_summary(everyone, recorded.wait),
                            what_if=_summary(everyone, replayed.wait))]
    for group, members in (("user", by_user), ("team", by_team)):
        for name, job_ids in sorted(members.items()):
            rows.append(GroupComparison(
                group=group,  # type: ignore[arg-type]
                name=name,
                recorded=_summary(job_ids, recorded.wait),
                what_if=_summary(job_ids, replayed.wait),
            ))
    return WhatIfReport(
        overrides=dict(overrides),
        settings=msgspec.to_builtins(simulation.state.settings),
        rows=rows,
        recorded_utilisation=recorded.utilisation(plan.end),
        what_if_utilisation=replayed.utilisation(replayed.last_at or plan.end),
        refused=dict(sorted(simulation.refused.items())),
    )
