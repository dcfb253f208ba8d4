"""Restarts (SPEC section 8): a server that stops or is SIGKILLed while jobs run loses no
job and no result. Real processes and a real SQLite log; the SIGKILL test kills a real
process that runs the engine and the local executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_local_support import (
    OPEN_LIMITS,
    Jobs,
    gpu_holding_violations,
    kill_leftover_groups,
    open_engine,
    open_keeper,
    settle,
    submit_command,
    wait_seen,
    wait_status,
)

from events.log import EventLog
from events.types import JobFailed, JobRequeued, JobStarted
from projections.fold import fold
from projections.state import QueueState
from service.commands import (
    LOCAL_ADMIN,
    SYSTEM,
    Cancel,
    ReportStarted,
)
from service.executors.launch import job_environment, wrapper_argv
from service.executors.procfs import process_start_time
from service.executors.run_files import RunFiles

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Jobs]:
    jobs = Jobs(tmp_path / "jobs")
    yield jobs
    # whatever a failed test left running: every job's group leader is in the log
    path = tmp_path / "events.db"
    if path.exists():
        kill_leftover_groups([job.pid for job in read_state(path).jobs.values() if job.pid])


def read_state(db: Path) -> QueueState:
    reader = EventLog(db, readonly=True)
    try:
        return fold(reader.read())
    finally:
        reader.close()


def recorded(db: Path, kind: type) -> list:
    reader = EventLog(db, readonly=True)
    try:
        return [r.event for r in reader.read() if isinstance(r.event, kind)]
    finally:
        reader.close()


# ---------------------------------------------------------------- in-process restarts


async def test_a_job_dispatched_but_never_started_is_requeued_with_attempt_2(
    tmp_path: Path, jobs: Jobs
) -> None:
    # the engine alone: it commits the dispatch, and "crashes" before any executor acts
    async with open_engine(tmp_path) as engine:
        await engine.execute(submit_command("j", jobs.command()), LOCAL_ADMIN)
        assert engine.state.jobs["j"].status == "running"
        assert engine.state.jobs["j"].pid is None

    async with open_keeper(tmp_path) as (engine, _executor):
        job = await wait_status(engine, "j", "completed")
        assert (job.attempt, job.exit_code) == (2, 0)
    (failed,) = recorded(tmp_path / "events.db", JobFailed)
    assert failed.retryable and "never started" in failed.error
    (requeued,) = recorded(tmp_path / "events.db", JobRequeued)
    assert requeued.attempt == 2
    assert gpu_holding_violations(tmp_path / "events.db") == []


async def test_a_lost_job_at_max_attempts_fails_instead(tmp_path: Path, jobs: Jobs) -> None:
    async with open_engine(tmp_path) as engine:
        command = submit_command("j", jobs.command())
        from msgspec.structs import replace

        await engine.execute(replace(command, max_attempts=1), LOCAL_ADMIN)
    async with open_keeper(tmp_path) as (engine, _executor):
        job = await wait_status(engine, "j", "failed")
        assert job.attempt == 1 and job.exit_code is None
        assert job.error_message is not None and "never started" in job.error_message
    assert recorded(tmp_path / "events.db", JobRequeued) == []


async def test_a_cancel_requested_before_the_crash_is_honoured(
    tmp_path: Path, jobs: Jobs
) -> None:
    async with open_engine(tmp_path) as engine:
        await engine.execute(submit_command("j", jobs.command("--wait")), LOCAL_ADMIN)
        await engine.execute(Cancel(job_ids=("j",)), LOCAL_ADMIN)
        assert engine.state.jobs["j"].cancel_requested
    async with open_keeper(tmp_path) as (engine, _executor):
        job = await wait_status(engine, "j", "cancelled")
        assert job.attempt == 1
    assert jobs.seen("j") is None  # nothing was launched for it


async def test_a_process_started_but_not_recorded_is_adopted(
    tmp_path: Path, jobs: Jobs
) -> None:
    """The server died between launching the wrapper and committing job.started."""
    async with open_engine(tmp_path) as engine:
        await engine.execute(submit_command("j", jobs.command("--wait", "--exit", "4")),
                             LOCAL_ADMIN)
        job = engine.state.jobs["j"]
        files = RunFiles(tmp_path / "runs", "j")
        files.prepare()
        with files.output.open("ab") as output:  # exactly what the executor would launch
            wrapper = subprocess.Popen(  # noqa: ASYNC220 - the test plays a crashed server
                wrapper_argv(files.dir, job.attempt, None, job.spec.command),
                env=job_environment(os.environ, job.spec, "j", job.allocated_gpus),
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await wait_seen(jobs, "j")
        async with open_keeper(tmp_path) as (engine, _executor):
            assert await engine.wait_for(lambda s: s.jobs["j"].pid == wrapper.pid, 30)
            assert engine.state.jobs["j"].attempt == 1
            jobs.release("j")
            job = await wait_status(engine, "j", "failed")
            assert (job.exit_code, job.attempt) == (4, 1)
    finally:
        wrapper.kill()
        wrapper.wait()


async def test_a_reused_pid_is_never_adopted(tmp_path: Path, jobs: Jobs) -> None:
    """The recorded pid belongs to a live process, but not the one that started the job."""
    me = os.getpid()
    my_start = process_start_time(me)
    assert my_start is not None
    async with open_engine(tmp_path) as engine:
        await engine.execute(submit_command("j", jobs.command()), LOCAL_ADMIN)
        await engine.execute(ReportStarted(job_id="j", pid=me, process_start_time=my_start + 1),
                             SYSTEM)
    async with open_keeper(tmp_path) as (engine, _executor):
        job = await wait_status(engine, "j", "completed")
        assert job.attempt == 2  # lost, re-queued, run again
    failed = recorded(tmp_path / "events.db", JobFailed)
    assert [f.error for f in failed] == [
        "its process was lost while the server was down, without an exit code"]


async def test_a_process_killed_while_the_server_was_down_is_requeued(
    tmp_path: Path, jobs: Jobs
) -> None:
    async with open_keeper(tmp_path) as (engine, _executor):
        await engine.execute(submit_command("j", jobs.command("--wait")), LOCAL_ADMIN)
        await wait_seen(jobs, "j")
        assert await engine.wait_for(lambda s: s.jobs["j"].pid is not None, 30)
        leader = engine.state.jobs["j"].pid
    # the server is stopped; the job survived it; now it is SIGKILLed without a trace
    assert leader is not None and process_start_time(leader) is not None
    os.killpg(leader, signal.SIGKILL)
    assert await settle(lambda: process_start_time(leader) is None or _zombie(leader))
    (jobs.out / "j.json").unlink()
    async with open_keeper(tmp_path) as (engine, _executor):
        await wait_seen(jobs, "j")
        assert engine.state.jobs["j"].attempt == 2
        jobs.release("j")
        assert (await wait_status(engine, "j", "completed")).exit_code == 0
    assert jobs.conflicts() == ""
    assert gpu_holding_violations(tmp_path / "events.db") == []


async def test_a_job_dispatched_by_the_startup_inventory_is_launched_not_requeued(
    tmp_path: Path, jobs: Jobs
) -> None:
    limits = {**OPEN_LIMITS, "local_job_max_concurrent": 2}
    async with open_keeper(tmp_path, "1xA100:40", limits) as (engine, _executor):
        await engine.execute(submit_command("a", jobs.command("--wait")), LOCAL_ADMIN)
        await engine.execute(submit_command("b", jobs.command()), LOCAL_ADMIN)
        await wait_seen(jobs, "a")
        assert engine.state.jobs["b"].status == "pending"
    # a GPU was added while the server was down: recording the inventory at start-up
    # dispatches b before the executor subscribes
    async with open_keeper(tmp_path, "2xA100:40", limits) as (engine, _executor):
        job = await wait_status(engine, "b", "completed")
        assert (job.attempt, job.allocated_gpus) == (1, (1,))
        assert engine.state.jobs["a"].status == "running"  # adopted
        jobs.release("a")
        assert (await wait_status(engine, "a", "completed")).attempt == 1
    assert recorded(tmp_path / "events.db", JobRequeued) == []


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


# ---------------------------------------------------------------- SIGKILL of a server process

SERVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {here!r})
sys.path.insert(0, {repo!r})
import anyio
from test_local_support import open_keeper, submit_command
from service.commands import LOCAL_ADMIN

args = json.loads(sys.argv[1])

async def main():
    async with open_keeper(Path(args["data_dir"]), args["gpus"], args["settings"]) as (engine, _):
        for submission in args["submit"]:
            await engine.execute(submit_command(**submission), LOCAL_ADMIN)
        Path(args["ready"]).write_text(str(engine.state.last_seq))
        await anyio.sleep_forever()

anyio.run(main)
"""


class ServerProcess:
    """A real process running the engine and the local executor on a data directory."""

    def __init__(self, data_dir: Path, gpus: str, settings: dict[str, object]) -> None:
        self.data_dir = data_dir
        self.gpus = gpus
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = data_dir / "server.ready"

    async def start(self, submit: list[dict[str, object]] = ()) -> None:  # type: ignore[assignment]
        self.ready.unlink(missing_ok=True)
        args = {"data_dir": str(self.data_dir), "gpus": self.gpus, "settings": self.settings,
                "submit": list(submit), "ready": str(self.ready)}
        code = SERVER.format(here=str(HERE), repo=str(REPO))
        self.process = subprocess.Popen(  # noqa: ASYNC220 - a fast fork/exec in a test
            [sys.executable, "-c", code, json.dumps(args)], cwd=REPO)
        assert await settle(lambda: self.ready.exists() or self.process.poll() is not None)
        assert self.process.poll() is None, "the server process died at start"

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def state(self) -> QueueState:
        return read_state(self.data_dir / "events.db")

    async def until(self, predicate, what: str) -> QueueState:  # type: ignore[no-untyped-def]
        assert await settle(lambda: predicate(self.state())), f"never: {what}"
        return self.state()


async def test_sigkilled_server_loses_no_job_and_no_result(tmp_path: Path, jobs: Jobs) -> None:
    settings = {**OPEN_LIMITS, "local_job_max_concurrent": 2}
    server = ServerProcess(tmp_path, "4xA100:40", settings)
    try:
        await server.start(submit=[
            {"job_id": "early", "command": jobs.command("--wait", "--exit", "7"),
             "num_processes": 2},
            {"job_id": "late", "command": jobs.command("--wait"), "num_processes": 2},
            {"job_id": "next", "command": jobs.command(), "num_processes": 2},
        ])
        before = await server.until(
            lambda s: all(s.jobs[j].pid is not None for j in ("early", "late")),
            "both jobs started")
        assert before.jobs["next"].status == "pending"  # every GPU is taken
        late_pid = before.jobs["late"].pid
        early_gpus = before.jobs["early"].allocated_gpus

        server.kill()
        # while the server is down, "early" finishes; its wrapper records the exit code
        jobs.release("early")
        early_files = RunFiles(tmp_path / "runs", "early")
        assert await settle(lambda: early_files.exit_record(1) is not None)
        assert server.state().jobs["early"].status == "running"  # nobody recorded it yet
        ended_at = early_files.exit_record(1).ended_at
        assert ended_at is not None

        restarted_at = time.time()
        await server.start()
        after = await server.until(lambda s: s.jobs["next"].status == "completed",
                                   "the next job ran on the freed GPUs")
        early = after.jobs["early"]
        assert (early.status, early.exit_code) == ("failed", 7)
        # it ended when its wrapper recorded it, not when the restarted server learned it
        assert early.completed_at == ended_at < restarted_at
        (failed,) = recorded(tmp_path / "events.db", JobFailed)
        assert failed.ended_at == ended_at
        assert after.jobs["next"].allocated_gpus == early_gpus
        late = after.jobs["late"]
        assert (late.status, late.pid, late.attempt) == ("running", late_pid, 1)  # adopted

        jobs.release("late")
        done = await server.until(lambda s: s.jobs["late"].status == "completed",
                                  "the adopted job completed")
        assert done.jobs["late"].exit_code == 0
        # one job.started each: the adopted job was not started twice
        starts = [e.job_id for e in recorded(tmp_path / "events.db", JobStarted)]
        assert sorted(starts) == ["early", "late", "next"]
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()
    assert jobs.conflicts() == ""
    assert gpu_holding_violations(tmp_path / "events.db") == []


async def test_a_gpu_removed_under_a_running_job_crashes_nothing(
    tmp_path: Path, jobs: Jobs
) -> None:
    limits = {**OPEN_LIMITS, "local_job_max_concurrent": 3}
    async with open_keeper(tmp_path, "4xA100:40", limits) as (engine, _executor):
        await engine.execute(submit_command("holder", jobs.command("--wait"), device_ids=[2, 3],
                                            num_processes=2), LOCAL_ADMIN)
        await engine.execute(submit_command("wide", jobs.command(), num_processes=4),
                             LOCAL_ADMIN)
        await wait_seen(jobs, "holder")
    # restarted with GPUs 2 and 3 gone: the holder keeps running and keeps its entry
    async with open_keeper(tmp_path, "2xA100:40", limits) as (engine, _executor):
        state = engine.state
        assert [d.index for d in state.gpus] == [0, 1]
        assert state.jobs["holder"].status == "running"
        assert state.gpu_holder == {2: "holder", 3: "holder"}
        assert state.free_gpus() == [0, 1]
        # the 4-GPU job can no longer fit: it stays pending, and explain says why
        from service.scheduler import explain

        assert state.jobs["wide"].status == "pending"
        (reason,) = explain(state, "wide", engine.clock()).reasons
        assert reason.code == "gpu_inventory"
        assert reason.detail.startswith("it needs 4 GPUs and the GPU inventory now has 2")
        # a smaller job still runs on what is left: the one that cannot fit reserves nothing
        await engine.execute(submit_command("small", jobs.command(), num_processes=1),
                             LOCAL_ADMIN)
        small = await wait_status(engine, "small", "completed")
        assert small.allocated_gpus == (0,)
        jobs.release("holder")
        assert (await wait_status(engine, "holder", "completed")).exit_code == 0
        assert engine.state.gpu_holder == {}
    assert jobs.conflicts() == ""
