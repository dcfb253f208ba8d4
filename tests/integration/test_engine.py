"""The engine on real SQLite files: group commit, failed commits, domain errors, replay.

The second half is a hypothesis state machine that drives the real engine with random
commands, executor reports, settings changes and time steps, and checks after every
step that no limit was exceeded by a dispatch, no GPU is held twice, no lower-priority
job took a GPU reserved for a waiting higher-priority one, positions are 1..n, and a
fresh fold of the log equals the engine's live state.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from events.envelope import Recorded
from events.log import EventLog, LogError
from events.types import GpuDevice, JobDispatched
from projections.fold import apply, fold
from projections.state import JobEntry, QueueState
from projections.views import snapshot
from service import scheduler
from service.commands import (
    LOCAL_ADMIN,
    SYSTEM,
    Actor,
    Approve,
    Cancel,
    ChangeSettings,
    Cleanup,
    Command,
    ConfigSpec,
    DomainError,
    ObserveInventory,
    Process,
    Reject,
    ReportCancelled,
    ReportExited,
    ReportFailed,
    ReportStarted,
    SetPriority,
    Submit,
    UnknownJob,
    WrongState,
)
from service.engine import Committed, Engine, EngineUnavailable

pytestmark = pytest.mark.anyio

ADMIN = Actor(user_id=1, name="root", level="admin")
LEAD = Actor(user_id=2, name="lena", level="lead", team_id="alpha")
ALICE = Actor(user_id=3, name="alice", level="researcher", team_id="alpha")
BOB = Actor(user_id=4, name="bob", level="researcher", team_id="alpha")
CAROL = Actor(user_id=5, name="carol", level="researcher", team_id="beta")
DAVE = Actor(user_id=6, name="dave", level="researcher")
VIEWER = Actor(user_id=7, name="vera", level="viewer", team_id="beta")
ACTORS = [ADMIN, LEAD, ALICE, BOB, CAROL, DAVE, VIEWER]
# alice once an admin has moved her to team beta: the jobs she submitted before keep alpha
ALICE_IN_BETA = Actor(user_id=3, name="alice", level="researcher", team_id="beta")

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingLog(EventLog):
    """The real log, counting its transactions; ``fail_appends`` makes the next ones fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.appends: list[list[Recorded]] = []
        self.fail_appends = 0
        self.failed_appends = 0

    def append(self, batch: Sequence[Recorded]) -> None:
        if self.fail_appends:
            self.fail_appends -= 1
            self.failed_appends += 1
            raise LogError("disk full (simulated)")
        super().append(batch)
        self.appends.append(list(batch))


def submit(job_id: str, num_processes: int = 0, **options: Any) -> Submit:
    config = ConfigSpec(command=["python", "train.py"], num_processes=num_processes)
    return Submit(job_id=job_id, config_name="train", config=config, **options)


def fold_of(path: Path) -> QueueState:
    log = EventLog(path, readonly=True)
    try:
        return fold(log.read())
    finally:
        log.close()


def gpus(count: int) -> tuple[GpuDevice, ...]:
    return tuple(GpuDevice(index=i, name="A100", memory_gb=40.0) for i in range(count))


async def setup(engine: Engine, gpu_count: int = 4, **limits: Any) -> None:
    await engine.execute(ObserveInventory(backend="fake", devices=gpus(gpu_count)), SYSTEM)
    if limits:
        await engine.execute(ChangeSettings(limits), LOCAL_ADMIN)


# ---------------------------------------------------------------- engine behaviour


async def test_group_commit_puts_many_concurrent_callers_in_one_transaction(
    tmp_path: Path,
) -> None:
    log = CountingLog(tmp_path / "events.db")
    engine = Engine(log, clock=Clock(), tick_seconds=3600)
    callers = 64
    results: dict[str, Committed] = {}
    async with engine.running():
        await setup(engine, max_concurrent=100, user_max_concurrent=100,
                    local_job_max_concurrent=100)
        transactions_before = len(log.appends)

        async def one(index: int) -> None:
            actor = ACTORS[index % len(ACTORS)]
            results[f"job{index:03d}"] = await engine.execute(
                submit(f"job{index:03d}"), actor, f"req-{index}")

        async with anyio.create_task_group() as callers_group:
            for index in range(callers):
                callers_group.start_soon(one, index)

    transactions = log.appends[transactions_before:]
    assert len(transactions) < callers / 4  # many callers share each fsync
    assert max(len({r.correlation_id for r in batch if r.correlation_id}) for batch in
               transactions) >= callers / 4
    # every caller got its own event, and each transaction's seqs are contiguous
    submitted = {result.records[0].event.job_id for result in results.values()}  # type: ignore[union-attr]
    assert submitted == set(results)
    for batch in transactions:
        assert [r.seq for r in batch] == list(range(batch[0].seq, batch[0].seq + len(batch)))
    assert log.verify() == log.last_seq
    assert snapshot(fold_of(log.path)) == snapshot(engine.state)
    assert engine.state.running_total == callers  # one pass per batch started them all


async def test_a_failed_commit_fails_the_batch_and_leaves_the_state_a_fold_of_the_log(
    tmp_path: Path,
) -> None:
    log = CountingLog(tmp_path / "events.db")
    engine = Engine(log, clock=Clock(), tick_seconds=3600)
    async with engine.running():
        await setup(engine, local_job_max_concurrent=1)
        await engine.execute(submit("before"), ALICE)
        before = snapshot(engine.state)

        log.fail_appends = 10**6  # every commit fails until this is reset
        outcomes: list[BaseException | Committed] = []

        async def one(command: Command, actor: Actor) -> None:
            try:
                outcomes.append(await engine.execute(command, actor))
            except (EngineUnavailable, DomainError) as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as group:
            for index in range(8):
                group.start_soon(one, submit(f"lost{index}"), BOB)
            group.start_soon(one, Approve("no-such-job"), ADMIN)
        log.fail_appends = 0

        assert 1 <= log.failed_appends <= 8
        assert sorted(type(o).__name__ for o in outcomes) == ["EngineUnavailable"] * 8 + [
            "UnknownJob"]
        assert snapshot(engine.state) == before == snapshot(fold_of(log.path))
        assert not any(job_id.startswith("lost") for job_id in engine.state.jobs)

        # the engine goes on: the next commands commit and seqs stay gapless
        await engine.execute(submit("after"), BOB)
        await engine.execute(ReportExited(job_id="before", exit_code=0), SYSTEM)
        assert engine.state.jobs["after"].status == "running"
        assert log.verify() == engine.state.last_seq
        assert snapshot(fold_of(log.path)) == snapshot(engine.state)


async def test_a_domain_error_writes_no_event(tmp_path: Path) -> None:
    log = CountingLog(tmp_path / "events.db")
    engine = Engine(log, clock=Clock(), tick_seconds=3600)
    async with engine.running():
        await setup(engine, gpu_count=2)
        await engine.execute(submit("j"), ALICE)
        seq, transactions = log.last_seq, len(log.appends)
        refused = [
            (Approve("j"), ADMIN, WrongState),
            (Approve("nope"), ADMIN, UnknownJob),
            (submit("big", num_processes=3), ALICE, DomainError),
            (ChangeSettings({"max_concurrent": 0}), ADMIN, DomainError),
            (SetPriority("j", 50), ALICE, DomainError),
        ]
        for command, actor, error in refused:
            with pytest.raises(error):
                await engine.execute(command, actor)
        assert (log.last_seq, len(log.appends)) == (seq, transactions)
        assert "big" not in engine.state.jobs


async def test_replay_at_start_equals_the_live_state_before_the_restart(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    clock = Clock()
    log = EventLog(path)
    engine = Engine(log, clock=clock, tick_seconds=3600)
    async with engine.running():
        await setup(engine, gpu_count=2, local_job_max_concurrent=2, max_concurrent=3)
        for index, actor in enumerate([ALICE, BOB, CAROL, ALICE, DAVE, LEAD]):
            clock.now += 60
            await engine.execute(submit(f"j{index}", num_processes=index % 2), actor)
        await engine.execute(submit("costly", estimated_cost=99.0), CAROL)
        clock.now += 60
        await engine.execute(ReportStarted(job_id="j0", pid=4242, process_start_time=7), SYSTEM)
        await engine.execute(ReportExited(job_id="j0", exit_code=0), SYSTEM)
        await engine.execute(ReportFailed(job_id="j1", error="lost", retryable=True), SYSTEM)
        await engine.execute(SetPriority("costly", 90), ADMIN)
        live = snapshot(engine.state)
        live_stats = engine.state.settings, engine.state.last_seq
    log.close()

    restarted_log = EventLog(path)
    restarted = Engine(restarted_log, clock=clock, tick_seconds=3600)
    assert snapshot(restarted.state) == live
    assert (restarted.state.settings, restarted.state.last_seq) == live_stats
    async with restarted.running():
        clock.now += 60
        result = await restarted.execute(submit("later"), DAVE)
        assert result.records[0].seq == live_stats[1] + 1
        await restarted.execute(Approve("costly"), ADMIN)
    assert restarted_log.verify() == restarted.state.last_seq
    assert snapshot(fold_of(path)) == snapshot(restarted.state)


async def test_no_wait_starts_in_the_same_commit_or_is_rejected(tmp_path: Path) -> None:
    engine = Engine(EventLog(tmp_path / "events.db"), clock=Clock(), tick_seconds=3600)
    async with engine.running():
        await setup(engine, gpu_count=1)
        started = await engine.execute(submit("now", num_processes=1, no_wait=True), ALICE)
        assert [r.type for r in started.records] == ["job.submitted"]
        assert engine.state.jobs["now"].status == "running"
        refused = await engine.execute(submit("never", num_processes=1, no_wait=True), BOB)
        assert (refused.outcome.status, refused.records) == ("rejected", [])
        assert "never" not in engine.state.jobs


async def test_subscribers_get_each_committed_batch(tmp_path: Path) -> None:
    engine = Engine(EventLog(tmp_path / "events.db"), clock=Clock(), tick_seconds=3600)
    batches: list[list[str]] = []
    engine.subscribe(lambda records: batches.append([r.type for r in records]))
    async with engine.running():
        await setup(engine, gpu_count=1)
        await engine.execute(submit("j", num_processes=1), ALICE)
    assert batches == [["gpu.inventory_observed"], ["job.submitted", "job.dispatched"]]


async def test_the_periodic_pass_expires_approvals(tmp_path: Path) -> None:
    clock = Clock()
    engine = Engine(EventLog(tmp_path / "events.db"), clock=clock, tick_seconds=0.02)
    async with engine.running():
        await engine.execute(submit("wait", requires_approval=True), ALICE)
        clock.now += 24 * 3600 + 1
        expired = await engine.wait_for(
            lambda state: state.jobs["wait"].status == "rejected", timeout=10)
        assert expired
        assert engine.state.jobs["wait"].error_message == "approval expired"


async def test_an_expired_approval_cannot_be_approved_before_the_next_tick(
    tmp_path: Path,
) -> None:
    clock = Clock()
    engine = Engine(EventLog(tmp_path / "events.db"), clock=clock, tick_seconds=3600)
    async with engine.running():
        await engine.execute(submit("wait", requires_approval=True), ALICE)
        clock.now += 24 * 3600 + 1  # past the timeout; no tick comes in this test
        with pytest.raises(WrongState, match=r"is rejected \(approval expired\); only blocked"):
            await engine.execute(Approve("wait"), LOCAL_ADMIN)
        job = engine.state.jobs["wait"]
        assert (job.status, job.error_message) == ("rejected", "approval expired")
        rejected = [r for r in engine.log.read() if r.type == "job.rejected"]
        assert [(r.actor, r.event.job_id) for r in rejected] == [("system", "wait")]


def test_a_start_up_command_that_is_refused_still_commits_what_its_batch_decided(
    tmp_path: Path,
) -> None:
    """``execute_now`` is a batch of one: the approval that expired before it is rejected
    and written even though the command itself is refused, and the state is the log's."""
    clock = Clock()
    log = EventLog(tmp_path / "events.db")
    engine = Engine(log, clock=clock)
    engine.execute_now(submit("wait", requires_approval=True), ALICE)
    clock.now += 24 * 3600 + 1
    with pytest.raises(UnknownJob):
        engine.execute_now(Approve("nosuch"), LOCAL_ADMIN)
    assert [r.type for r in log.read()] == ["job.submitted", "job.rejected"]
    assert engine.state.jobs["wait"].status == "rejected"
    assert snapshot(engine.state) == snapshot(fold(list(log.read())))
    engine.execute_now(submit("next"), ALICE)  # the working copy is in step: no conflict
    assert log.last_seq == engine.state.last_seq == 4  # submitted, dispatched


def test_each_batch_runs_one_scheduling_pass(tmp_path: Path, monkeypatch) -> None:
    """A tick, a submit, a ``no_wait`` submit, a batch that also expires an approval: one
    pass each (a pass walks the whole queue: two would double the engine's work)."""
    passes: list[float] = []
    decide = scheduler.decide

    def counted(state: QueueState, now: float) -> list[JobDispatched]:
        passes.append(now)
        return decide(state, now)

    monkeypatch.setattr(scheduler, "decide", counted)
    clock = Clock()
    engine = Engine(EventLog(tmp_path / "events.db"), clock=clock)

    def pass_count(command: Command, actor: Actor) -> int:
        passes.clear()
        with contextlib.suppress(DomainError):
            engine.execute_now(command, actor)
        return len(passes)

    assert pass_count(Process(), SYSTEM) == 1  # the periodic tick
    assert pass_count(ChangeSettings({"local_job_max_concurrent": 5}), LOCAL_ADMIN) == 1
    assert pass_count(submit("a"), ALICE) == 1
    assert pass_count(submit("b", no_wait=True), BOB) == 1
    assert engine.state.jobs["b"].status == "running"
    assert pass_count(submit("wait", requires_approval=True), CAROL) == 1
    clock.now += 24 * 3600 + 1
    assert pass_count(Process(), SYSTEM) == 1  # expires "wait" and passes once
    assert engine.state.jobs["wait"].status == "rejected"
    clock.now += 24 * 3600 + 1
    assert pass_count(Approve("nosuch"), LOCAL_ADMIN) == 0  # nothing changed: no pass


# ---------------------------------------------------------------- a reference pass

# The rules of SPEC section 4 transliterated as plainly as possible: sort every pending
# job, walk them, count. The state machine compares each pass the engine recorded with
# this walk over the same state, and checks each dispatch against the state before it.

ALL_GPUS = "all"


class Reservation:
    def __init__(self, job: JobEntry, devices: frozenset[int] | str) -> None:
        self.job = job
        self.devices = devices


def reference_order(state: QueueState, now: float) -> list[JobEntry]:
    s = state.settings
    threshold = s.starvation_threshold_minutes * 60

    def effective(job: JobEntry) -> int:
        p = job.priority if job.priority_override is None else job.priority_override
        if p >= 30:
            return p
        steps = int((now - job.queued_at) // threshold)
        return min(30, p + s.starvation_boost * steps)

    pending = [job for job in state.jobs.values() if job.status == "pending"]
    return sorted(pending, key=lambda job: (-effective(job), job.queued_at, job.submit_seq))


Start = tuple[str, tuple[int, ...], "Reservation | None"]


class PassPlan:
    """What a pass must do: its dispatches in order (job id, GPUs, the reservation in
    force when it starts), and the job that reserved GPUs in it, if any."""

    def __init__(self, starts: list[Start], reservation: Reservation | None) -> None:
        self.starts = starts
        self.reservation = reservation


def held_by_a_limit(state: QueueState, job: JobEntry) -> bool:
    """Whether a user, team or GPU limit holds ``job`` back in ``state`` (not GPUs)."""
    s = state.settings
    running = [state.jobs[job_id] for job_id in state.running]
    if sum(other.user_id == job.user_id for other in running) >= s.user_max_concurrent:
        return True
    team = sum(other.team_id == job.team_id for other in running)
    if s.enable_fair_share and job.team_id is not None and team >= s.team_max_concurrent:
        return True
    limit = s.local_gpu_max_concurrent
    allocated = sum(len(other.allocated_gpus) for other in running)
    return limit is not None and allocated + job.spec.num_processes > limit


def pick_gpus(job: JobEntry, usable: set[int]) -> tuple[int, ...] | None:
    """Its ``device_ids`` when all are usable (unless ``any_gpu``), else the lowest usable."""
    spec = job.spec
    if spec.device_ids and not spec.any_gpu:
        return spec.device_ids if set(spec.device_ids) <= usable else None
    return tuple(sorted(usable)[: spec.num_processes]) if len(usable) >= spec.num_processes else None


def reference_pass(state: QueueState, now: float) -> PassPlan:
    """The pass SPEC section 4 calls for, walked as plainly as possible."""
    s = state.settings
    running = [job for job in state.jobs.values() if job.status == "running"]
    total = len(running)
    per_user = Counter(job.user_id for job in running)
    per_team = Counter(job.team_id for job in running if job.team_id is not None)
    local = sum(1 for job in running if job.spec.target == "local")
    allocated = sum(len(job.allocated_gpus) for job in running)
    free = {d.index for d in state.gpus} - {i for job in running for i in job.allocated_gpus}
    reservation: Reservation | None = None
    starts = []
    for job in reference_order(state, now):
        if total >= s.max_concurrent:
            break
        if per_user[job.user_id] >= s.user_max_concurrent:
            continue
        team = job.team_id
        if s.enable_fair_share and team is not None and per_team[team] >= s.team_max_concurrent:
            continue
        need = job.spec.num_processes
        is_local = job.spec.target == "local"
        chosen: tuple[int, ...] | None = ()
        if is_local and local >= s.local_job_max_concurrent:
            continue
        if is_local and not need and reservation is not None and reservation.devices == ALL_GPUS:
            continue  # no lower-priority local job starts, CPU-only ones included
        if is_local and need:
            limit = s.local_gpu_max_concurrent
            if limit is not None and allocated + need > limit:
                if reservation is None and need <= limit:  # waits for GPUs to be released
                    reservation = Reservation(job, ALL_GPUS)
                continue
            if pick_gpus(job, free) is None:  # waits for GPUs: the first such job reserves
                if reservation is None:
                    exact = bool(job.spec.device_ids) and not job.spec.any_gpu
                    devices = frozenset(job.spec.device_ids or ()) if exact else ALL_GPUS
                    reservation = Reservation(job, devices)
                continue
            if reservation is None:
                chosen = pick_gpus(job, free)
            elif reservation.devices != ALL_GPUS:
                chosen = pick_gpus(job, free - set(reservation.devices))
            else:
                chosen = None
            if chosen is None:
                continue
        starts.append((job.job_id, chosen, reservation))
        total += 1
        per_user[job.user_id] += 1
        if team is not None:
            per_team[team] += 1
        if is_local:
            local += 1
            allocated += len(chosen)
            free -= set(chosen)
    return PassPlan(starts, reservation)


def check_dispatch(state: QueueState, dispatch: JobDispatched, now: float, expected: Start) -> None:
    """One recorded dispatch against the state just before it."""
    s = state.settings
    job = state.jobs[dispatch.job_id]
    where = f"dispatch of {job.job_id} at {now}"
    assert job.status == "pending", where
    # no limit is exceeded by starting it
    assert state.running_total < s.max_concurrent, f"{where}: global limit"
    assert state.user_running.get(job.user_id, 0) < s.user_max_concurrent, f"{where}: user"
    if s.enable_fair_share and job.team_id is not None:
        assert state.team_running.get(job.team_id, 0) < s.team_max_concurrent, f"{where}: team"
    assert state.local_running < s.local_job_max_concurrent, f"{where}: local job limit"
    gpus_now = set(dispatch.gpus)
    need = job.spec.num_processes
    assert len(dispatch.gpus) == len(gpus_now) == need, f"{where}: {dispatch.gpus} for {need}"
    if need and s.local_gpu_max_concurrent is not None:  # a CPU-only job takes no GPU
        assert state.allocated_gpu_count + need <= s.local_gpu_max_concurrent, f"{where}: gpus"
    # no GPU twice: each one it gets is in the inventory and held by no running job
    assert gpus_now <= set(state.free_gpus()), f"{where}: {dispatch.gpus} not all free"
    if job.spec.device_ids and not job.spec.any_gpu:
        assert dispatch.gpus == job.spec.device_ids, f"{where}: not its device_ids"
    # no lower-priority job on a GPU reserved for a waiting higher-priority one, and no
    # lower-priority local job at all (CPU-only included) while every GPU is reserved
    reservation = expected[2]
    if reservation is not None and job.spec.target == "local":
        assert reservation.devices != ALL_GPUS, (
            f"{where}: every GPU is reserved for {reservation.job.job_id}")
        assert not gpus_now & set(reservation.devices), (
            f"{where}: GPUs {sorted(gpus_now & set(reservation.devices))} are reserved for "
            f"{reservation.job.job_id}")
    # and it is the dispatch the rules call for, with the GPUs they call for
    assert (dispatch.job_id, dispatch.gpus) == expected[:2], where
    assert dispatch.attempt == job.attempt


# ---------------------------------------------------------------- the state machine

SETTINGS_VALUES: dict[str, Any] = {
    "max_concurrent": st.integers(1, 6),
    "user_max_concurrent": st.integers(1, 4),
    "team_max_concurrent": st.integers(1, 4),
    "enable_fair_share": st.booleans(),
    "local_job_max_concurrent": st.integers(1, 6),
    "local_gpu_max_concurrent": st.none() | st.integers(1, 4),
    "starvation_threshold_minutes": st.sampled_from([0.5, 1, 1.5, 10, 60]),
    "starvation_boost": st.integers(0, 15),
    "approval_cost_threshold": st.sampled_from([0.0, 25.0, 50.0, 1000.0]),
    "approval_timeout_hours": st.sampled_from([0.5, 1, 24]),
}
BAD_SETTINGS = st.sampled_from([
    {"max_concurrent": 0}, {"user_max_concurrent": -1}, {"local_gpu_max_concurrent": 0},
    {"starvation_threshold_minutes": 0}, {"enable_fair_share": "yes"}, {"bogus": 1},
])


@st.composite
def settings_changes(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.sets(st.sampled_from(sorted(SETTINGS_VALUES)), min_size=1, max_size=4))
    return {name: draw(SETTINGS_VALUES[name]) for name in sorted(names)}


# (actor, num_processes, device_ids, any_gpu, requires_approval, estimated_cost)
JobRequest = tuple[Actor, "int | None", "list[int] | None", bool, bool, "float | None"]


def job_requests() -> st.SearchStrategy[JobRequest]:
    return st.tuples(
        st.sampled_from(ACTORS + [ALICE, BOB, CAROL, ALICE_IN_BETA]),
        st.sampled_from([None, 0, 0, 1, 1, 1, 2, 3]),
        st.none() | st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True),
        st.sampled_from([False, False, True]),
        st.sampled_from([False] * 7 + [True]),
        st.sampled_from([None, None, 1.0, 40.0, 75.0]),
    )


class EngineMachine(RuleBasedStateMachine):
    """Random traffic through the real engine on a real SQLite file, with a hand clock."""

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.path = directory / "events.db"
        self.portal = self.stack.enter_context(anyio.from_thread.start_blocking_portal())
        self.clock = Clock()
        self.log = EventLog(self.path)
        self.stack.callback(self.log.close)
        self.engine: Engine = self.portal.call(
            lambda: Engine(self.log, clock=self.clock, tick_seconds=10**6))
        self.stack.enter_context(self.portal.wrap_async_context_manager(self.engine.running()))
        self.reader = EventLog(self.path, readonly=True)  # sees each commit once it is durable
        self.stack.callback(self.reader.close)
        self.shadow = QueueState()  # folded here from the file, record by record
        self.last_pass: tuple[int, Reservation | None] = (0, None)  # last dispatch seq
        self.next_job = 0

    def teardown(self) -> None:
        self.stack.close()

    # ------------------------------------------------------------ driving the engine

    def execute(self, command: Command, actor: Actor) -> Committed | DomainError:
        seq = self.log.last_seq
        try:
            return self.portal.call(self.engine.execute, command, actor, None)
        except DomainError as error:
            self.assert_wrote_nothing_since(seq, "a refused command")
            return error

    def assert_wrote_nothing_since(self, seq: int, what: str) -> None:
        """Nothing after ``seq`` but what every batch decides before its commands: the
        approvals that have run out, rejected by the system (SPEC 5; engine.py)."""
        written = [(r.type, r.actor, getattr(r.event, "reason", None))
                   for r in self.log.read(after_seq=seq)]
        assert all(w == ("job.rejected", "system", "approval expired") for w in written), (
            f"{what} wrote events: {written}")

    def running_job(self, data: st.DataObject) -> str | None:
        running = sorted(self.engine.state.running)
        return data.draw(st.sampled_from(running)) if running else None

    def new_submit(self, spec: JobRequest, flags: str = "", key: str | None = None) -> Submit:
        self.next_job += 1
        num_processes, device_ids, any_gpu, requires_approval, cost = spec[1:]
        return Submit(
            job_id=f"job{self.next_job:03d}", config_name="train",
            config=ConfigSpec(command=["python", "train.py"], num_processes=num_processes,
                              estimated_cost=cost),
            device_ids=device_ids, any_gpu=any_gpu, requires_approval=requires_approval,
            no_wait=flags == "no_wait", dry_run=flags == "dry_run", idempotency_key=key,
            request_hash=repr((spec[1:], flags)),  # as the API does: same body, same hash
        )

    def submit_together(self, specs: list[JobRequest]) -> list[str]:
        """Several callers at once: they share one commit. Returns the ids queued."""
        commands = [(self.new_submit(spec), spec[0]) for spec in specs]

        async def all_at_once() -> list[Any]:
            results: list[Any] = [None] * len(commands)

            async def one(index: int, command: Command, actor: Actor) -> None:
                try:
                    results[index] = await self.engine.execute(command, actor)
                except DomainError as error:
                    results[index] = error

            async with anyio.create_task_group() as group:
                for index, (command, actor) in enumerate(commands):
                    group.start_soon(one, index, command, actor)
            return results

        results = self.portal.call(all_at_once)
        assert all(result is not None for result in results)
        return [command.job_id for (command, _), result in zip(commands, results)
                if not isinstance(result, DomainError)]

    @initialize(target=jobs, gpu_count=st.integers(2, 4), limits=settings_changes(),
                backlog=st.lists(job_requests(), max_size=12))
    def start(self, gpu_count: int, limits: dict[str, Any], backlog: list[JobRequest]) -> Any:
        self.execute(ObserveInventory(backend="fake", devices=gpus(gpu_count)), SYSTEM)
        limits.setdefault("local_job_max_concurrent", 4)
        self.execute(ChangeSettings(limits), ADMIN)
        return multiple(*self.submit_together(backlog))

    @rule(
        target=jobs,
        spec=job_requests(),
        flags=st.sampled_from(["", "", "", "", "no_wait", "dry_run"]),
        key=st.none() | st.sampled_from(["k", "l"]),
    )
    def submit(self, spec: JobRequest, flags: str, key: str | None) -> Any:
        command = self.new_submit(spec, flags, key)
        job_id = command.job_id
        seq = self.log.last_seq
        result = self.execute(command, spec[0])
        if isinstance(result, DomainError):
            return multiple()
        outcome = result.outcome
        if command.dry_run:
            self.assert_wrote_nothing_since(seq, "a dry run")
            assert job_id not in self.engine.state.jobs
            assert outcome.job_id is None and outcome.status in ("running", "queued", "blocked")
            return multiple()
        if command.no_wait and outcome.status == "rejected":
            self.assert_wrote_nothing_since(seq, "a no_wait submit that cannot start")
            assert job_id not in self.engine.state.jobs
            return multiple()
        if outcome.job_id != job_id:  # idempotent replay of an earlier submission
            self.assert_wrote_nothing_since(seq, "an idempotent replay")
            assert job_id not in self.engine.state.jobs
            return multiple()
        if command.no_wait:  # accepted with no_wait: it started in that same commit
            assert self.engine.state.jobs[job_id].status == "running"
        return job_id

    @rule(target=jobs, specs=st.lists(job_requests(), min_size=2, max_size=8))
    def burst(self, specs: list[JobRequest]) -> Any:
        return multiple(*self.submit_together(specs))

    @rule(chosen=st.lists(jobs, min_size=1, max_size=3, unique=True),
          actor=st.sampled_from(ACTORS))
    def cancel(self, chosen: list[str], actor: Actor) -> None:
        statuses = {job: self.engine.state.jobs[job].status for job in chosen
                    if job in self.engine.state.jobs}
        result = self.execute(Cancel(job_ids=tuple(chosen)), actor)
        if isinstance(result, DomainError):  # atomic: none of them changed
            assert {job: self.engine.state.jobs[job].status for job in statuses} == statuses
        else:
            for job in chosen:
                assert self.engine.state.jobs[job].status in ("running", "cancelled")

    @rule(actor=st.sampled_from([ALICE, CAROL, VIEWER]))
    def cancel_all(self, actor: Actor) -> None:
        self.execute(Cancel(all=True), actor)

    @rule(job=jobs, approve=st.booleans())
    def decide_approval(self, job: str, approve: bool) -> None:
        self.execute(Approve(job) if approve else Reject(job, "not now"), ADMIN)

    @rule(job=jobs, priority=st.none() | st.integers(0, 100),
          actor=st.sampled_from([ADMIN, LEAD, ALICE]))
    def override_priority(self, job: str, priority: int | None, actor: Actor) -> None:
        self.execute(SetPriority(job, priority), actor)

    @rule(data=st.data(), report=st.sampled_from(
        ["started", "exit0", "exit1", "killed", "retryable", "fatal", "cancelled"]))
    def executor_reports(self, data: st.DataObject, report: str) -> None:
        job = self.running_job(data)
        if job is None:
            return
        # an end learned after a restart: earlier than now, maybe before the run began
        ago = data.draw(st.sampled_from([None, 0.0, 5.0, 10.0**9]))
        ended_at = None if ago is None else self.clock.now - ago
        command: Command = {
            "started": ReportStarted(job_id=job, pid=1000, process_start_time=1),
            "exit0": ReportExited(job_id=job, exit_code=0, ended_at=ended_at),
            "exit1": ReportExited(job_id=job, exit_code=1, ended_at=ended_at),
            "killed": ReportExited(job_id=job, exit_code=-9, ended_at=ended_at),
            "retryable": ReportFailed(job_id=job, error="lost", retryable=True,
                                      ended_at=ended_at),
            "fatal": ReportFailed(job_id=job, error="bad", retryable=False, ended_at=ended_at),
            "cancelled": ReportCancelled(job_id=job),
        }[report]
        self.execute(command, SYSTEM)

    @rule(data=st.data())
    def running_jobs_finish_together(self, data: st.DataObject) -> None:
        """Several executor reports at once (one commit, one pass)."""
        running = sorted(self.engine.state.running)
        if not running:
            return
        done = data.draw(st.lists(st.sampled_from(running), min_size=1, unique=True))

        async def report_all() -> None:
            async with anyio.create_task_group() as group:
                for job_id in done:
                    group.start_soon(self.engine.execute, ReportExited(job_id=job_id,
                                                                       exit_code=0), SYSTEM)

        self.portal.call(report_all)
        assert not set(done) & set(self.engine.state.running)

    @rule(changes=settings_changes())
    def change_settings(self, changes: dict[str, Any]) -> None:
        result = self.execute(ChangeSettings(changes), ADMIN)
        assert not isinstance(result, DomainError), result
        for name, value in changes.items():
            assert getattr(self.engine.state.settings, name) == value

    @rule(changes=BAD_SETTINGS)
    def refuse_bad_settings(self, changes: dict[str, Any]) -> None:
        before = self.engine.state.settings
        assert isinstance(self.execute(ChangeSettings(changes), ADMIN), DomainError)
        assert self.engine.state.settings == before

    @rule(seconds=st.sampled_from([1, 29, 30, 61, 600, 1800, 3600, 7200, 90000]))
    def time_passes(self, seconds: int) -> None:
        self.clock.now += seconds
        self.execute(Process(), SYSTEM)  # what the periodic tick sends

    @rule()
    def process(self) -> None:
        self.execute(Process(), ADMIN)

    @precondition(lambda self: self.engine.state.status_counts["completed"] > 0)
    @rule(days=st.integers(1, 3))
    def cleanup(self, days: int) -> None:
        self.clock.now += days * 86400 + 1
        self.execute(Cleanup(days), ADMIN)

    # ------------------------------------------------------------ after every step

    @invariant()
    def after_every_step(self) -> None:
        self.every_dispatch_followed_the_rules()
        self.nothing_more_could_start()
        self.no_gpu_is_held_twice()
        self.counts_match_the_jobs()
        self.every_run_ends_within_itself()
        self.positions_are_1_to_n()
        self.a_fresh_fold_of_the_log_equals_the_live_state()

    def every_dispatch_followed_the_rules(self) -> None:
        """Fold what reached the file, checking each pass against the reference walk."""
        new = list(self.reader.read(after_seq=self.shadow.last_seq))
        expected: deque[Start] | None = None
        reserving: Reservation | None = None
        cause: object = object()
        for recorded in new:
            event = recorded.event
            if isinstance(event, JobDispatched):
                if expected is None or recorded.causation_id != cause:
                    assert not expected, f"the pass left out {list(expected or ())}"
                    plan = reference_pass(self.shadow, recorded.at)
                    expected = deque(plan.starts)
                    cause = recorded.causation_id
                    reserving = plan.reservation
                assert expected, f"{event.job_id} started, the rules start nothing more"
                check_dispatch(self.shadow, event, recorded.at, expected.popleft())
                self.last_pass = (recorded.seq, reserving)
            else:
                assert not expected, f"the pass left out {list(expected or ())}"
                expected = None
            apply(self.shadow, recorded)
        assert not expected, f"the pass left out {list(expected or ())}"

    def nothing_more_could_start(self) -> None:
        """After a pass, a second pass at the same time starts nothing, with one exception.

        A pass holds GPUs for the first job that waits for them; if later in that same
        pass a lower-priority job of the same user (CPU-only, or on other GPUs) takes
        that user's last slot, the reserving job is now held by its user limit instead,
        and the *next* pass (the next command, or the 5 s tick) lets others have the GPUs.
        """
        state = self.engine.state
        more = reference_pass(state, state.last_at).starts
        if not more:
            return
        seq, reservation = self.last_pass
        assert seq == state.last_seq, f"the last commit's pass left {more} startable"
        assert reservation is not None, f"the last pass left {more} startable"
        holder = state.jobs[reservation.job.job_id]
        assert holder.status == "pending" and held_by_a_limit(state, holder), (
            f"the last pass left {more} startable")

    def no_gpu_is_held_twice(self) -> None:
        state = self.engine.state
        held = [i for job_id in state.running for i in state.jobs[job_id].allocated_gpus]
        assert len(held) == len(set(held))
        assert state.gpu_holder == {
            i: job_id for job_id in state.running for i in state.jobs[job_id].allocated_gpus}
        assert all(job.allocated_gpus == () for job in state.jobs.values()
                   if job.status in ("pending", "blocked"))

    def counts_match_the_jobs(self) -> None:
        state = self.engine.state
        running = [state.jobs[job_id] for job_id in state.running]
        assert all(job.status == "running" for job in running)
        assert sum(job.status == "running" for job in state.jobs.values()) == len(running)
        users = Counter(job.user_id for job in running)
        assert {k: v for k, v in state.user_running.items() if v} == dict(users)
        teams = Counter(job.team_id for job in running if job.team_id is not None)
        assert {k: v for k, v in state.team_running.items() if v} == dict(teams)

    def every_run_ends_within_itself(self) -> None:
        """A run ends after it began and no later than the end was recorded, however late
        (or wrong) the time an executor reports."""
        state = self.engine.state
        for job in state.jobs.values():
            if job.completed_at is not None and job.started_at is not None:
                assert job.started_at <= job.completed_at <= state.last_at
        sums = state.run_sums
        assert all(later >= earlier for earlier, later in zip(sums, sums[1:]))
        assert state.run_end_at == sorted(state.run_end_at)

    def positions_are_1_to_n(self) -> None:
        state = self.engine.state
        now = max(self.clock.now, state.last_at)
        order = reference_order(state, now)
        positions = [scheduler.position(state, job, now) for job in order]
        assert positions == list(range(1, len(order) + 1))
        assert list(scheduler.pending_in_order(state, now)) == order
        assert all(scheduler.position(state, job, now) is None
                   for job in state.jobs.values() if job.status != "pending")

    def a_fresh_fold_of_the_log_equals_the_live_state(self) -> None:
        assert snapshot(fold(self.reader.read())) == snapshot(self.engine.state)
        assert snapshot(self.shadow) == snapshot(self.engine.state)


EngineMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_engine_state_machine = EngineMachine.TestCase
