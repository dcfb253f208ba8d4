"""Given / when / then over events, for the pure core (no disk, no clock).

A :class:`World` is a log held in memory: each command goes through
``service.commands.handle``, its events are sealed into the hash chain and folded with
``projections.fold.apply``; ``schedule`` runs ``service.scheduler.decide`` the same way.
``now`` is always an argument. ``world.refold()`` folds the recorded log from scratch,
which must always equal the state built event by event.
"""

from __future__ import annotations

from typing import Any

from events.envelope import GENESIS_HASH, Recorded, seal
from events.types import AnyEvent, GpuDevice, JobDispatched
from projections.fold import apply, fold
from projections.state import QueueState
from projections.views import snapshot
from service import scheduler
from service.commands import (
    LOCAL_ADMIN,
    Actor,
    ChangeSettings,
    Command,
    ConfigSpec,
    ObserveInventory,
    Outcome,
    Submit,
    handle,
)

SCHEDULER = "system:scheduler"

ADMIN = Actor(user_id=1, name="root", level="admin", team_id=None)
LEAD = Actor(user_id=2, name="lena", level="lead", team_id="alpha")
ALICE = Actor(user_id=3, name="alice", level="researcher", team_id="alpha")
BOB = Actor(user_id=4, name="bob", level="researcher", team_id="alpha")
CAROL = Actor(user_id=5, name="carol", level="researcher", team_id="beta")
DAVE = Actor(user_id=6, name="dave", level="researcher", team_id=None)
VIEWER = Actor(user_id=7, name="vera", level="viewer", team_id="beta")


def gpus(count: int, name: str = "A100", memory_gb: float = 40.0) -> tuple[GpuDevice, ...]:
    return tuple(GpuDevice(index=i, name=name, memory_gb=memory_gb) for i in range(count))


def config(
    num_processes: int | None = None,
    device_ids: list[int] | None = None,
    estimated_cost: float | None = None,
) -> ConfigSpec:
    return ConfigSpec(
        command=["python", "train.py"],
        num_processes=num_processes,
        device_ids=device_ids,
        estimated_cost=estimated_cost,
    )


class Default:
    """A marker for "argument left out"."""


DEFAULT = Default()


class World:
    """A log in memory and the state folded from it."""

    def __init__(self, gpu_count: int = 0, **settings: Any) -> None:
        self.records: list[Recorded] = []
        self.state = QueueState()
        if gpu_count:
            self.do(ObserveInventory(backend="fake", devices=gpus(gpu_count)), now=0.0)
        if settings:
            self.do(ChangeSettings(settings), now=0.0)

    # ------------------------------------------------------------ when

    def record(self, events: list[AnyEvent], actor: str, now: float) -> list[Recorded]:
        """Seal ``events`` into the chain and fold each one."""
        sealed = []
        for event in events:
            prev = self.records[-1].hash if self.records else GENESIS_HASH
            recorded = seal(prev, len(self.records) + 1, now, actor, None, None, event)
            self.records.append(recorded)
            apply(self.state, recorded)
            sealed.append(recorded)
        return sealed

    def do(self, command: Command, actor: Actor = LOCAL_ADMIN, *, now: float) -> Outcome:
        """Handle a command and record its events (a domain error records nothing)."""
        outcome = handle(command, self.state, actor, now)
        self.record(outcome.events, actor.label, now)
        return outcome

    def submit(
        self,
        actor: Actor,
        job_id: str,
        *,
        now: float,
        num_processes: int | None | Default = DEFAULT,
        device_ids: list[int] | None = None,
        estimated_cost: float | None = None,
        **options: Any,
    ) -> Outcome:
        """Submit a job whose config asks for ``num_processes`` GPUs.

        Left out, the config is CPU-only (0), or names no count when ``device_ids`` does.
        """
        if isinstance(num_processes, Default):
            num_processes = None if device_ids is not None else 0
        command = Submit(
            job_id=job_id,
            config_name="train",
            config=config(num_processes, device_ids, estimated_cost),
            **options,
        )
        return self.do(command, actor, now=now)

    def schedule(self, now: float) -> list[str]:
        """One scheduling pass; its dispatches are recorded. Returns the started job ids."""
        dispatches = scheduler.decide(self.state, now)
        self.record(list(dispatches), SCHEDULER, now)
        return [d.job_id for d in dispatches]

    # ------------------------------------------------------------ then

    def status(self, job_id: str) -> str:
        return self.state.jobs[job_id].status

    def statuses(self) -> dict[str, str]:
        return {job_id: job.status for job_id, job in self.state.jobs.items()}

    def gpus_of(self, job_id: str) -> tuple[int, ...]:
        return self.state.jobs[job_id].allocated_gpus

    def reasons(self, job_id: str, now: float) -> list[str]:
        return [reason.code for reason in scheduler.explain(self.state, job_id, now).reasons]

    def reason(self, job_id: str, now: float) -> str:
        """The first reason ``explain`` gives (the rule that holds the job back)."""
        return self.reasons(job_id, now)[0]

    def order(self, now: float) -> list[str]:
        return [job.job_id for job in scheduler.pending_in_order(self.state, now)]

    def positions(self, now: float) -> dict[str, int | None]:
        return {
            job_id: scheduler.position(self.state, job, now)
            for job_id, job in self.state.jobs.items()
        }

    def event_types(self) -> list[str]:
        return [recorded.type for recorded in self.records]

    def dispatched(self) -> dict[str, JobDispatched]:
        return {
            r.event.job_id: r.event for r in self.records if isinstance(r.event, JobDispatched)
        }

    def refold(self) -> QueueState:
        return fold(self.records)

    def assert_replay_equal(self) -> None:
        assert snapshot(self.refold()) == snapshot(self.state)
