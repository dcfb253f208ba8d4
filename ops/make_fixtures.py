"""Record the logs in ``fixtures/`` through the real engine, deterministically.

    python ops/make_fixtures.py [--out fixtures]

Each recording runs the real :class:`service.engine.Engine` on a fresh ``events.db`` in a
temporary directory, with a simulated clock and a seeded random generator, then writes
the log in the audit export format (``events/export.py``), one JSON object a line.
Commands that happen in the same simulated minute are sent together, so they share one
commit (group commit) as concurrent requests would. A small stand-in for the executor
answers each committed ``job.dispatched`` (started, then a clean exit, a nonzero exit, an
infrastructure failure, or the exit that follows a cancel), and keeps its processes
across a restart of the engine, as detached processes do.

- ``busy_day.jsonl``: ten users in three teams, a day and a bit of traffic, priority
  overrides, settings changes, cancels, retries, and a cleanup at the end;
- ``approval_day.jsonl``: costly and flagged jobs, approvals, rejections, expiry;
- ``restart.jsonl``: an engine stopped with jobs running, a new engine replaying the
  same file, recording a job that ended while it was down (with the time it ended),
  adopting or losing the others, and going on.

The files are history: tests fold them as recorded and never regenerate them. They are
re-recorded here, by hand, only when a scheduling rule changes (a test checks that every
recorded pass is what the scheduler decides today); the recording is deterministic, so
unchanged rules and event shapes give byte-identical files. An event that gains a field
changes the bytes a new recording writes, not what the old files mean: they are read as
recorded, the field taking its default.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from events.envelope import Recorded
from events.log import EventLog
from events.types import GpuDevice, JobCancelRequested, JobDispatched
from service.audit import write_export
from service.commands import (
    SYSTEM,
    Actor,
    Approve,
    Cancel,
    ChangeSettings,
    Cleanup,
    Command,
    ConfigSpec,
    CreateUser,
    DomainError,
    ExpireApprovals,
    ObserveInventory,
    Reject,
    ReportExited,
    ReportFailed,
    ReportStarted,
    SetPriority,
    Submit,
)
from service.engine import Engine

DAY_START = 1_767_254_400.0  # 2026-01-01T08:00:00Z
MINUTE = 60.0
HOUR = 3600.0

PEOPLE: list[tuple[str, str, str | None]] = [
    ("root", "admin", None),
    ("lena", "lead", "alpha"),
    ("alice", "researcher", "alpha"),
    ("bob", "researcher", "alpha"),
    ("carol", "researcher", "beta"),
    ("dave", "researcher", "beta"),
    ("vic", "viewer", "beta"),
    ("frank", "lead", "gamma"),
    ("erin", "researcher", "gamma"),
    ("gina", "researcher", None),
]

INVENTORY = (
    tuple(GpuDevice(index=i, name="NVIDIA A100-SXM4-80GB", memory_gb=80.0) for i in range(4))
    + tuple(GpuDevice(index=i, name="NVIDIA L4", memory_gb=24.0) for i in range(4, 8))
)


def actors() -> dict[str, Actor]:
    return {
        name: Actor(user_id=i, name=name, level=level, team_id=team)  # type: ignore[arg-type]
        for i, (name, level, team) in enumerate(PEOPLE, start=1)
    }


class Executor:
    """Stands in for the local executor: decides how each dispatched job ends."""

    def __init__(self, rng: random.Random, fates: dict[str, str]) -> None:
        self.rng = rng
        self.fates = fates  # job id -> ok | exit | lost | slow
        self.due: list[tuple[float, int, Command]] = []
        self.order = 0
        self.alive: set[str] = set()  # processes running, whatever the server does

    def later(self, when: float, command: Command) -> None:
        self.order += 1
        heapq.heappush(self.due, (when, self.order, command))

    def on_commit(self, records: list[Recorded]) -> None:
        for recorded in records:
            event = recorded.event
            if isinstance(event, JobDispatched):
                job_id, now = event.job_id, recorded.at
                fate = self.fates.get(job_id, "ok")
                if fate == "lost" and event.attempt == 1:
                    self.later(now + 30.0, ReportFailed(
                        job_id=job_id, error="launch failed: CUDA error: no CUDA-capable device",
                        retryable=True))
                    continue
                self.alive.add(job_id)
                self.later(now + self.rng.uniform(1.0, 20.0), ReportStarted(
                    job_id=job_id, pid=self.rng.randint(2000, 60000),
                    process_start_time=self.rng.randint(10**6, 10**7)))
                runtime = self.rng.uniform(5 * MINUTE, (3 if fate == "slow" else 1.5) * HOUR)
                code = self.rng.choice([1, 2, 137]) if fate == "exit" else 0
                self.later(now + runtime, ReportExited(job_id=job_id, exit_code=code))
            elif isinstance(event, JobCancelRequested):  # SIGTERM; the process exits
                self.later(recorded.at + self.rng.uniform(2.0, 12.0),
                           ReportExited(job_id=event.job_id, exit_code=-15))

    def reports_until(self, now: float) -> list[Command]:
        ready = []
        while self.due and self.due[0][0] <= now:
            command = heapq.heappop(self.due)[2]
            if isinstance(command, ReportExited):
                self.alive.discard(command.job_id)
            ready.append(command)
        return ready

    def forget(self, job_id: str) -> None:
        """The process is gone (it died with the server): nothing will report it."""
        self.alive.discard(job_id)
        self.due = [entry for entry in self.due if getattr(entry[2], "job_id", None) != job_id]
        heapq.heapify(self.due)


class Recording:
    """One engine (or several, one after another) on one log, driven minute by minute."""

    def __init__(self, path: Path, seed: int, start: float = DAY_START) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.now = start
        self.people = actors()
        self.fates: dict[str, str] = {}
        self.executor = Executor(random.Random(seed + 1), self.fates)
        self.engine: Engine | None = None
        self.log: EventLog | None = None
        self.wave = 0
        self.refused = 0

    # ------------------------------------------------------------ engine lifecycle

    def open(self) -> Engine:
        self.log = EventLog(self.path)
        self.engine = Engine(self.log, clock=lambda: self.now, tick_seconds=10**6)
        self.engine.subscribe(self.executor.on_commit)
        return self.engine

    def close(self) -> None:
        assert self.log is not None
        self.log.close()
        self.engine = self.log = None

    # ------------------------------------------------------------ commands

    async def send(self, commands: list[tuple[Command, Actor]]) -> list[Any]:
        """Send commands together: one batch, one commit. Domain errors are answers too."""
        assert self.engine is not None
        engine = self.engine
        self.wave += 1
        results: list[Any] = [None] * len(commands)

        async def one(index: int, command: Command, actor: Actor) -> None:
            try:
                results[index] = await engine.execute(
                    command, actor, f"req-{self.wave:05d}-{index}")
            except DomainError as error:
                self.refused += 1
                results[index] = error

        async with anyio.create_task_group() as group:
            for index, (command, actor) in enumerate(commands):
                group.start_soon(one, index, command, actor)
        return results

    def job_id(self) -> str:
        return "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(12))

    def submission(self, actor: Actor, **overrides: Any) -> Submit:
        rng = self.rng
        need = overrides.pop("num_processes", rng.choice([0, 1, 1, 1, 2, 2, 4]))
        options: dict[str, Any] = {}
        roll = rng.random()
        if need and roll < 0.08:
            options["device_ids"] = sorted(rng.sample(range(8), need))
        elif need and roll < 0.14:
            options["device_ids"] = sorted(rng.sample(range(8), need))
            options["any_gpu"] = True
        name = rng.choice(["llama-ft", "vit-base", "resnet50", "whisper-small", "sdxl-lora"])
        config = ConfigSpec(
            command=["python", "train.py", "--config", f"{name}.yaml"],
            num_processes=need, env={"WANDB_MODE": "offline"},
            working_dir=f"/srv/exp/{name}",
        )
        job_id = self.job_id()
        self.fates[job_id] = rng.choices(["ok", "exit", "lost", "slow"], [75, 8, 7, 10])[0]
        return Submit(
            job_id=job_id, config_name=name, config=config, num_processes=need,
            metadata={"run_name": f"{name}-{len(self.fates)}", "owner": actor.name},
            **options, **overrides,
        )

    def pending_of(self, actor: Actor | None = None, status: str = "pending") -> list[str]:
        assert self.engine is not None
        return [job.job_id for job in self.engine.state.jobs.values()
                if job.status == status and (actor is None or job.user_id == actor.user_id)]

    # ------------------------------------------------------------ the clock

    async def minutes(
        self, count: int, traffic: Callable[[], list[tuple[Command, Actor]]], tick: int = 5
    ) -> None:
        """Advance minute by minute; each minute sends the executor's reports and
        ``traffic()`` together, and every ``tick`` minutes the periodic pass."""
        for minute in range(count):
            self.now += MINUTE
            commands: list[tuple[Command, Actor]] = [
                (report, SYSTEM) for report in self.executor.reports_until(self.now)]
            commands += traffic()
            if minute % tick == 0:
                commands.append((ExpireApprovals(), SYSTEM))
            if commands:
                await self.send(commands)

    async def setup(self, settings: dict[str, Any]) -> None:
        admin = self.people["root"]
        await self.send([(ObserveInventory(backend="nvml", devices=INVENTORY), SYSTEM)])
        for name, actor in self.people.items():
            self.now += 1.0
            await self.send([(CreateUser(
                name=name, level=actor.level, team_id=actor.team_id,
                token_id=f"tok-{name}", token_hash=hashlib.sha256(name.encode()).hexdigest(),
            ), admin)])
        await self.send([(ChangeSettings(settings), admin)])


# ---------------------------------------------------------------- the three days


def export(path: Path, dest: Path) -> int:
    log = EventLog(path, readonly=True)
    count = log.verify()
    with dest.open("wb") as out:
        write_export(log.rows(), out)
    log.close()
    return count


def busy_traffic(rec: Recording) -> Callable[[], list[tuple[Command, Actor]]]:
    rng = rec.rng
    people = rec.people
    submitters = [people[n] for n in ("lena", "alice", "bob", "carol", "dave", "vic", "frank",
                                      "erin", "gina", "root")]
    weights = [2, 5, 4, 5, 3, 1, 2, 4, 3, 1]

    def traffic() -> list[tuple[Command, Actor]]:
        hour = (rec.now - DAY_START) / HOUR
        working = hour % 24 < 12
        commands: list[tuple[Command, Actor]] = []
        for _ in range(rng.choice([1, 1, 2]) if working else 1):
            if rng.random() < (0.16 if working else 0.03):
                actor = rng.choices(submitters, weights)[0]
                commands.append((rec.submission(actor), actor))
        roll = rng.random()
        if roll < 0.015:  # someone cancels one of their jobs, pending or running
            actor = rng.choices(submitters, weights)[0]
            mine = rec.pending_of(actor) + rec.pending_of(actor, "running")
            if mine:
                commands.append((Cancel(job_ids=(rng.choice(sorted(mine)),)), actor))
        elif roll < 0.025:  # a lead bumps or lowers a waiting job
            lead = rng.choice([people["lena"], people["frank"]])
            waiting = rec.pending_of()
            if waiting:
                priority = rng.choice([5, 15, 25, 40, 60, None])
                commands.append((SetPriority(rng.choice(sorted(waiting)), priority), lead))
        elif roll < 0.03:  # the admin approves what waits for approval
            for job_id in sorted(rec.pending_of(status="blocked")):
                commands.append((Approve(job_id), people["root"]))
        return commands

    return traffic


async def busy_day(path: Path) -> None:
    rec = Recording(path, seed=20260101)
    rec.open()
    assert rec.engine is not None
    root, bob = rec.people["root"], rec.people["bob"]
    async with rec.engine.running():
        await rec.setup({"max_concurrent": 6, "user_max_concurrent": 2, "team_max_concurrent": 4,
                         "local_job_max_concurrent": 12, "approval_cost_threshold": 50.0})
        traffic = busy_traffic(rec)
        await rec.minutes(3 * 60, traffic)                                  # 08:00-11:00
        await rec.send([(ChangeSettings({"enable_fair_share": True, "team_max_concurrent": 3}),
                         root)])
        await rec.minutes(3 * 60, traffic)                                  # 11:00-14:00
        await rec.send([(ChangeSettings({"max_concurrent": 8, "local_gpu_max_concurrent": 6,
                                         "local_job_max_concurrent": 12}), root)])
        costly = rec.submission(bob, num_processes=2)
        costly = msgspec.structs.replace(costly, estimated_cost=120.0)
        await rec.send([(costly, bob)])
        await rec.minutes(2 * 60, traffic)                                  # 14:00-16:00
        mine = sorted(rec.pending_of(bob))
        if mine:
            await rec.send([(Cancel(job_ids=tuple(mine)), bob)])            # a bulk cancel
        await rec.send([(ChangeSettings({"starvation_threshold_minutes": 30.0,
                                         "starvation_boost": 5}), root)])
        await rec.minutes(4 * 60, traffic)                                  # 16:00-20:00
        await rec.send([(ChangeSettings({"local_gpu_max_concurrent": None}), root)])
        await rec.minutes(14 * 60, traffic)                                 # 20:00-10:00
        await rec.send([(Cleanup(days=1), root)])
        await rec.minutes(30, traffic)
    rec.close()


async def approval_day(path: Path) -> None:
    rec = Recording(path, seed=20260102)
    rec.open()
    assert rec.engine is not None
    people = rec.people
    root, lena = people["root"], people["lena"]
    rng = rec.rng
    submitters = [people[n] for n in ("alice", "bob", "carol", "dave", "erin", "gina", "lena",
                                      "root")]
    reasons = ["over the monthly budget", "duplicate of an earlier run", "", "use the L4s"]

    def traffic() -> list[tuple[Command, Actor]]:
        commands: list[tuple[Command, Actor]] = []
        if rng.random() < 0.15:
            actor = rng.choice(submitters)
            submit = rec.submission(actor, num_processes=rng.choice([0, 1, 1, 2]))
            roll = rng.random()
            if roll < 0.2:
                submit = msgspec.structs.replace(submit, requires_approval=True)
            elif roll < 0.75:
                submit = msgspec.structs.replace(submit, estimated_cost=round(
                    rng.uniform(5.0, 90.0), 2))
            commands.append((submit, actor))
        away = 3 <= (rec.now - DAY_START) / HOUR < 5.5  # the admin is away: approvals expire
        if not away and rng.random() < 0.035:  # the admin goes through the approval queue
            for job_id in sorted(rec.pending_of(status="blocked")):
                roll = rng.random()
                if roll < 0.4:
                    commands.append((Approve(job_id), root))
                elif roll < 0.65:
                    commands.append((Reject(job_id, rng.choice(reasons) or None), root))
        if rng.random() < 0.02:  # the lead reorders the approval queue
            blocked = sorted(rec.pending_of(status="blocked"))
            if blocked:
                commands.append((SetPriority(rng.choice(blocked), rng.choice([25, 50])), lena))
        if rng.random() < 0.01:  # a mistaken approve of a job that is not blocked
            running = sorted(rec.pending_of(status="running"))
            if running:
                commands.append((Approve(rng.choice(running)), root))
        return commands

    async with rec.engine.running():
        await rec.setup({"max_concurrent": 4, "user_max_concurrent": 2,
                         "local_job_max_concurrent": 4, "approval_cost_threshold": 30.0,
                         "approval_timeout_hours": 2.0})
        await rec.minutes(5 * 60, traffic)
        await rec.send([(ChangeSettings({"approval_cost_threshold": 60.0}), root)])
        await rec.minutes(4 * 60, traffic)
    rec.close()


async def restart_day(path: Path) -> None:
    rec = Recording(path, seed=20260103)
    people = rec.people
    root = people["root"]
    traffic = busy_traffic(rec)

    rec.open()
    assert rec.engine is not None
    async with rec.engine.running():
        await rec.setup({"max_concurrent": 6, "user_max_concurrent": 2,
                         "local_job_max_concurrent": 6, "enable_fair_share": True,
                         "team_max_concurrent": 3})
        await rec.minutes(150, traffic)
        # dispatched in the last commit: the server stops before its process reports
        await rec.send([(rec.submission(root, num_processes=0, no_wait=True), root)])
    rec.close()  # the server stops with jobs running; their processes go on, or die
    stopped_at = rec.now

    rec.now += 7 * MINUTE
    engine = rec.open()  # a new engine replays the same file
    assert engine.state.running, "the recording should stop with jobs running"
    started = [job_id for job_id in sorted(engine.state.running)
               if job_id in rec.executor.alive and engine.state.jobs[job_id].pid is not None]
    assert started, "the recording should stop with started jobs running"
    # one ended while the server was down: its wrapper wrote the exit code, and when
    ended = ReportExited(job_id=started[0], exit_code=0, ended_at=stopped_at + 3 * MINUTE)
    rec.executor.forget(ended.job_id)
    lost = []
    for job_id in sorted(engine.state.running):
        job = engine.state.jobs[job_id]
        if job_id == ended.job_id:
            continue
        if job_id in rec.executor.alive and job.pid is not None and rec.rng.random() < 0.5:
            continue  # adopted: pid and start time match, it reports its exit later
        rec.executor.forget(job_id)
        lost.append(job_id)
    print(f"restart: {len(engine.state.running)} running, {len(lost)} lost, "
          "1 ended while down", file=sys.stderr)
    async with engine.running():
        await rec.send([(ObserveInventory(backend="nvml", devices=INVENTORY), SYSTEM)])
        await rec.send([(ReportFailed(job_id=job_id, error="process lost while the server "
                                      "was down", retryable=True), SYSTEM) for job_id in lost]
                       + [(ended, SYSTEM)])
        await rec.send([(ChangeSettings({"max_concurrent": 7}), root)])
        await rec.minutes(150, traffic)
    rec.close()


RECORDINGS = {
    "busy_day.jsonl": busy_day,
    "approval_day.jsonl": approval_day,
    "restart.jsonl": restart_day,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "fixtures")
    parser.add_argument("names", nargs="*", default=sorted(RECORDINGS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        with tempfile.TemporaryDirectory() as scratch:
            db = Path(scratch) / "events.db"
            anyio.run(RECORDINGS[name], db)
            count = export(db, args.out / name)
        print(f"{args.out / name}: {count} events")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
