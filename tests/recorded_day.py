"""Record a day of a busy queue into a real ``events.db``, through the real engine.

The engine runs with a simulated clock; a small stand-in for the executor answers each
committed ``job.dispatched`` with the job's end after its run time (a clean exit, a
nonzero exit, an infrastructure failure that re-queues it, or a cancel while running).
Users submit at seeded random times. The result is a log the current code wrote, which
is what ``gpuyard replay --check`` must find no difference in.
"""

from __future__ import annotations

import heapq
import random
from pathlib import Path
from typing import Any

import anyio

from events.envelope import Recorded
from events.log import EventLog
from events.types import GpuDevice, JobCancelRequested, JobDispatched
from service.commands import (
    LOCAL_ADMIN,
    Actor,
    Approve,
    Cancel,
    ChangeSettings,
    Command,
    ConfigSpec,
    CreateUser,
    DomainError,
    ObserveInventory,
    ReportExited,
    ReportFailed,
    Submit,
)
from service.engine import Engine

DAY_START = 1_767_225_600.0  # 2026-01-01T00:00:00Z

PEOPLE = [
    ("root", "admin", None),
    ("lena", "lead", "alpha"),
    ("alice", "researcher", "alpha"),
    ("bob", "researcher", "alpha"),
    ("carol", "researcher", "beta"),
    ("dave", "researcher", "beta"),
]


def actors() -> list[Actor]:
    return [Actor(user_id=i + 1, name=name, level=level, team_id=team)  # type: ignore[arg-type]
            for i, (name, level, team) in enumerate(PEOPLE)]


def record_busy_day(
    path: Path,
    *,
    jobs: int = 36,
    seed: int = 7,
    gpu_count: int = 4,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write a busy day into ``path`` (a new SQLite log) and return it."""
    rng = random.Random(seed)
    people = actors()
    submitters = people[1:]
    schedule: list[tuple[float, int, Command, Actor]] = []
    order = 0

    def at(when: float, command: Command, actor: Actor = LOCAL_ADMIN) -> None:
        nonlocal order
        order += 1
        heapq.heappush(schedule, (when, order, command, actor))

    devices = tuple(GpuDevice(index=i, name="A100", memory_gb=40.0) for i in range(gpu_count))
    at(DAY_START, ObserveInventory(backend="fake", devices=devices))
    at(DAY_START, ChangeSettings(settings or {
        "max_concurrent": 2, "user_max_concurrent": 2, "local_job_max_concurrent": 4,
    }))
    for user_id, (name, level, team) in enumerate(PEOPLE, start=1):
        at(DAY_START + user_id, CreateUser(name=name, level=level, team_id=team,
                                           token_id=f"t{user_id}", token_hash=f"h{user_id}"))

    run_time: dict[str, float] = {}
    fate: dict[str, str] = {}
    when = DAY_START + 60.0
    for index in range(jobs):
        when += rng.expovariate(1 / 600.0)  # a submission every 10 minutes on average
        job_id = f"job{index:03d}"
        actor = rng.choice(submitters)
        need = rng.choice([1, 1, 1, 2, 2, 4, 0])
        options: dict[str, Any] = {}
        roll = rng.random()
        if roll < 0.08:
            options["requires_approval"] = True
        elif roll < 0.14 and need:
            options["device_ids"] = sorted(rng.sample(range(gpu_count), need))
        run_time[job_id] = rng.uniform(300.0, 5400.0)
        fate[job_id] = rng.choices(["ok", "exit", "lost", "cancel"], [70, 8, 8, 14])[0]
        config = ConfigSpec(command=["python", "train.py", job_id], num_processes=need,
                            estimated_cost=round(rng.uniform(1, 40), 1))
        at(when, Submit(job_id=job_id, config_name=f"cfg-{need}", config=config,
                        metadata={"run_name": f"run-{index}"}, **options), actor)
        if options.get("requires_approval"):
            at(when + rng.uniform(60, 1800), Approve(job_id))
        if fate[job_id] == "cancel" and rng.random() < 0.5:
            at(when + rng.uniform(30, 900), Cancel(job_ids=(job_id,)), actor)

    def on_commit(records: list[Recorded]) -> None:
        for recorded in records:
            event = recorded.event
            if isinstance(event, JobDispatched):
                job_id, attempt = event.job_id, event.attempt
                end = recorded.at + run_time[job_id]
                if fate[job_id] == "lost" and attempt == 1:
                    at(recorded.at + 20.0, ReportFailed(job_id=job_id, error="launch failed",
                                                        retryable=True))
                elif fate[job_id] == "exit":
                    at(end, ReportExited(job_id=job_id, exit_code=3))
                elif fate[job_id] == "cancel":
                    at(recorded.at + run_time[job_id] / 3, Cancel(job_ids=(job_id,)))
                    at(end, ReportExited(job_id=job_id, exit_code=0))
                else:
                    at(end, ReportExited(job_id=job_id, exit_code=0))
            elif isinstance(event, JobCancelRequested):  # SIGTERM, the process exits
                at(recorded.at + 5.0, ReportExited(job_id=event.job_id, exit_code=-15))

    clock = [DAY_START]

    async def drive() -> None:
        log = EventLog(path)
        engine = Engine(log, clock=lambda: clock[0], tick_seconds=10**6)
        engine.subscribe(on_commit)
        async with engine.running():
            while schedule:
                when, _, command, actor = heapq.heappop(schedule)
                clock[0] = when
                try:
                    await engine.execute(command, actor)
                except DomainError:
                    pass  # e.g. cancelling a job that already finished
        log.close()

    anyio.run(drive)
    return path
