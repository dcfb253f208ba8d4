"""The engine: the only writer of the log.

Theory of operation
-------------------
Callers hand the engine a command and wait. The write loop takes every command that is
waiting (a batch), handles each against a working copy of the state, runs a scheduling
pass, seals the events into the hash chain and appends the whole batch in one
transaction: one fsync for many callers (group commit). Only once that commit is on disk
does it swap the working copy in as the state readers see, answer the callers and tell
subscribers (the executors) what was committed.

Two copies of the state are kept, both folds of the same log: ``state`` (what readers
see, never touched by the write loop while a commit is in flight) and the working copy.
After a swap, the old front copy is brought up to date by folding the batch it missed
at the start of the next batch. If a commit fails, the batch's callers get
:class:`EngineUnavailable` and both copies are rebuilt from the log: nothing is
half-applied.

A scheduling pass also runs every ``tick_seconds`` (aging, approval expiry). Start-up is
a replay of the log.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import structlog
from anyio.abc import TaskGroup

from events.envelope import Recorded, seal
from events.log import EventLog, LogError
from events.types import AnyEvent
from projections.fold import apply_event, fold_batches, paused_gc
from projections.state import QueueState
from service import scheduler
from service.commands import (
    SYSTEM,
    Actor,
    Command,
    DomainError,
    ExpireApprovals,
    Outcome,
    Process,
    Submit,
    handle,
)

__all__ = ["Engine", "EngineUnavailable", "Committed", "SCHEDULER_ACTOR"]

SCHEDULER_ACTOR = "system:scheduler"
MAX_BATCH = 1024

log = structlog.get_logger("gpuyard.engine")


class EngineUnavailable(Exception):
    """The log could not be written; nothing of the request was applied."""


class Committed:
    """What a caller gets back: the command's outcome and the events it committed."""

    __slots__ = ("outcome", "records")

    def __init__(self, outcome: Outcome, records: list[Recorded]) -> None:
        self.outcome = outcome
        self.records = records


class _Request:
    __slots__ = ("command", "actor", "correlation_id", "batch_done", "answered", "result", "error")

    def __init__(self, command: Command, actor: Actor, correlation_id: str | None) -> None:
        self.command = command
        self.actor = actor
        self.correlation_id = correlation_id
        # One event per batch, not per request: set once every request in it is answered.
        self.batch_done: anyio.Event | None = None  # the write loop sets it on taking one
        self.answered = False
        self.result: Committed | None = None
        self.error: BaseException | None = None


Subscriber = Callable[[list[Recorded]], None]


def _replay(log_: EventLog) -> tuple[QueueState, QueueState]:
    """Start-up: fold the whole log once; the working copy is a copy of that fold."""
    front = fold_batches(log_.batches())
    with paused_gc():
        return front, front.copy()


class Engine:
    """Owns the log and the state; every change goes through :meth:`execute`."""

    def __init__(
        self,
        event_log: EventLog,
        *,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 5.0,
    ) -> None:
        self.log = event_log
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.state, self._work = _replay(event_log)
        self.replayed_seq = self.state.last_seq  # what start-up replayed; later seqs are ours
        self._missed: list[Recorded] = []  # committed, not yet folded into the working copy
        self._send, self._receive = anyio.create_memory_object_stream[_Request](math.inf)
        self._subscribers: list[Subscriber] = []
        self._broken: str | None = None  # set when the log cannot even be re-read
        self._committed = anyio.Event()
        self._next_done: anyio.Event | None = None  # the next batch's; made in the loop
        self._task_group: TaskGroup | None = None

    # ------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        """Run the write loop and the periodic pass for the duration of the block."""
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            task_group.start_soon(self._write_loop)
            task_group.start_soon(self._tick_loop)
            log.info(
                f"Queue scheduler started with {self.tick_seconds:g}s processing interval",
                events=self.state.last_seq,
            )
            try:
                yield self
            finally:
                task_group.cancel_scope.cancel()
                self._task_group = None

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber`` with each committed batch (after the swap)."""
        self._subscribers.append(subscriber)

    # ------------------------------------------------------------ the API of the writer

    async def execute(
        self, command: Command, actor: Actor, correlation_id: str | None = None
    ) -> Committed:
        """Queue a command, wait for its batch to be durable, return what it decided.

        Raises the command's :class:`DomainError`, or :class:`EngineUnavailable`.
        """
        if self._broken is not None:
            raise EngineUnavailable(self._broken)
        request = _Request(command, actor, correlation_id)
        try:
            self._send.send_nowait(request)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise EngineUnavailable("the queue is shutting down; try again") from None
        while not request.answered:
            # the event of the batch that holds it; until one does, the next batch's (a
            # request left over by a full batch wakes once for nothing, and waits again)
            done = request.batch_done or self._next_done
            if done is None:
                done = self._next_done = anyio.Event()
            await done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def execute_now(self, command: Command, actor: Actor) -> Committed:
        """Run one command before the write loop runs (start-up), appending on this thread.

        A batch of one, as the write loop makes it: what the batch decided besides the
        command (expired approvals, a pass) is committed even when the command is refused.
        Raises the command's :class:`DomainError`, or :class:`LogError` when the log cannot
        be written; the state is then read again from the log: nothing is half-applied.
        Nobody has subscribed yet, so nobody is told.
        """
        if self._task_group is not None:
            raise RuntimeError("the write loop runs: use execute")
        request = _Request(command, actor, None)
        self._catch_up()
        try:
            records, answers = self._decide_batch([request], self._now())
        except Exception:
            self._reload()  # a fold that failed half-way
            raise
        if records:
            try:
                self.log.append(records)
            except LogError:
                self._reload()
                raise
            self._swap_in(records)
        if request.error is not None:
            raise request.error
        ((_, outcome, mine),) = answers
        assert outcome is not None
        return Committed(outcome, mine)

    async def wait_for(self, predicate: Callable[[QueueState], bool], timeout: float) -> bool:
        """Wait until ``predicate(state)`` holds after some commit, up to ``timeout``."""
        with anyio.move_on_after(timeout):
            while not predicate(self.state):
                await self._committed.wait()
            return True
        return predicate(self.state)

    # ------------------------------------------------------------ the write loop

    async def _tick_loop(self) -> None:
        """The periodic pass (aging); its batch expires approvals first, as every batch."""
        while True:
            await anyio.sleep(self.tick_seconds)
            self._send.send_nowait(_Request(Process(), SYSTEM, None))

    async def _write_loop(self) -> None:
        async with self._receive:
            while True:
                batch = [await self._receive.receive()]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except anyio.WouldBlock:
                        break
                done = self._next_done or anyio.Event()
                self._next_done = anyio.Event()
                for request in batch:
                    request.batch_done = done
                await self._run_batch(batch, done)

    def _now(self) -> float:
        return max(self.clock(), self.state.last_at, self._work.last_at)

    def _swap_in(self, records: list[Recorded]) -> None:
        """``records`` are on disk: readers now see the working copy; the old front copy
        becomes the working one, and folds them at the start of the next batch."""
        self.state, self._work = self._work, self.state
        self._missed = records

    def _catch_up(self) -> None:
        for recorded in self._missed:
            apply_event(self._work, recorded.event, recorded.seq, recorded.at)
        self._missed = []

    def _seal_all(
        self,
        events: list[AnyEvent],
        actor: str,
        correlation_id: str | None,
        causation_id: int | None,
        now: float,
        into: list[Recorded],
    ) -> list[Recorded]:
        work = self._work
        sealed = []
        prev = into[-1].hash if into else self.log.last_hash
        for event in events:
            recorded = seal(prev, work.last_seq + 1, now, actor, correlation_id, causation_id, event)
            apply_event(work, event, recorded.seq, now)
            prev = recorded.hash
            sealed.append(recorded)
            into.append(recorded)
        return sealed

    def _schedule(
        self, now: float, into: list[Recorded], correlation_id: str | None
    ) -> list[Recorded]:
        cause = into[-1].seq if into else None
        dispatches = scheduler.decide(self._work, now)
        if not dispatches:
            return []
        return self._seal_all(list(dispatches), SCHEDULER_ACTOR, correlation_id, cause, now, into)

    async def _run_batch(self, batch: list[_Request], done: anyio.Event) -> None:
        try:
            self._catch_up()
            records, answers = self._decide_batch(batch, self._now())
        except Exception:  # a bug in a decider or a fold must fail the batch, not the engine
            log.exception("batch_failed", requests=len(batch))
            self._fail(batch, done, "the queue could not process this request; nothing was "
                       "changed, try again")
            return

        if records:
            try:
                await anyio.to_thread.run_sync(self.log.append, records)
            except LogError as exc:
                log.error("commit_failed", error=str(exc), events=len(records))
                self._fail(batch, done, "the event log could not be written; nothing was "
                           "changed, try again")
                return
            self._swap_in(records)
        for request, outcome, mine in answers:
            if outcome is not None:
                request.result = Committed(outcome, mine)
            request.answered = True
        done.set()
        if records:
            committed, self._committed = self._committed, anyio.Event()
            committed.set()
            for subscriber in self._subscribers:
                try:
                    subscriber(records)
                except Exception:
                    log.exception("subscriber_failed", subscriber=repr(subscriber))

    def _decide_batch(
        self, batch: list[_Request], now: float
    ) -> tuple[list[Recorded], list[tuple[_Request, Outcome | None, list[Recorded]]]]:
        """Handle each request against the working copy, then run a pass: the batch's events."""
        records: list[Recorded] = []
        answers: list[tuple[_Request, Outcome | None, list[Recorded]]] = []
        # An approval that has run out is rejected before anyone acts on the batch, so an
        # expired job cannot be approved in the seconds before the next tick (SPEC 5).
        expired = handle(ExpireApprovals(), self._work, SYSTEM, now).events
        if expired:
            self._seal_all(expired, SYSTEM.label, None, None, now, records)
        wants_pass = bool(expired)
        for request in batch:
            try:
                outcome = handle(request.command, self._work, request.actor, now)
            except DomainError as exc:
                request.error = exc
                answers.append((request, None, []))
                continue
            except Exception as exc:  # a bug must fail one request, not the engine
                log.exception("command_failed", command=type(request.command).__name__)
                request.error = exc
                answers.append((request, None, []))
                continue
            mine = self._seal_all(
                outcome.events, request.actor.label, request.correlation_id, None, now, records
            )
            command = request.command
            kind = type(command)  # commands are final Structs; isinstance misses are slow
            wants_pass = wants_pass or bool(outcome.events)  # a change since the last pass
            if kind is Submit and command.no_wait and outcome.events:
                # its answer promised a start: give it the pass before anyone else acts
                self._schedule(now, records, request.correlation_id)
                wants_pass = False
            if kind is Process:
                # a pass of its own, so that its answer can name what it dispatched
                mine = mine + self._schedule(now, records, request.correlation_id)
                wants_pass = False
            answers.append((request, outcome, mine))
        if wants_pass:
            self._schedule(now, records, batch[-1].correlation_id if len(batch) == 1 else None)
        return records, answers

    def _fail(self, batch: list[_Request], done: anyio.Event, why: str) -> None:
        """Answer every request of a batch that wrote nothing, and start again from the log."""
        for request in batch:
            request.result = None
            if not isinstance(request.error, DomainError):
                request.error = EngineUnavailable(why)
            request.answered = True
        done.set()
        try:
            self._reload()
        except LogError as exc:
            self._broken = f"the event log cannot be read ({exc}); restart the server"
            log.critical("engine_broken", error=str(exc))

    def _reload(self) -> None:
        """Rebuild both copies of the state from what the log really holds."""
        self.log.refresh()
        self.state, self._work = _replay(self.log)
        self._missed = []

