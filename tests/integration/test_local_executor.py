"""The process keeper with real processes: an engine on a real SQLite file, the local
executor, and a real job script (see ``test_local_support.py``). No mocks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_local_support import (
    OPEN_LIMITS,
    Jobs,
    gpu_holding_violations,
    open_keeper,
    process_gone,
    settle,
    submit_command,
    wait_seen,
    wait_status,
)

from events.types import JobRequeued
from service.commands import LOCAL_ADMIN, Cancel, ChangeSettings
from service.executors.procfs import process_start_time

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def requeued_count(engine, job_id: str) -> int:
    return sum(isinstance(r.event, JobRequeued) and r.event.job_id == job_id
               for r in engine.log.read())


@pytest.fixture
def jobs(tmp_path: Path) -> Jobs:
    return Jobs(tmp_path / "jobs")


async def test_two_gpu_job_sees_exactly_its_allocated_gpus(tmp_path: Path, jobs: Jobs) -> None:
    workdir = tmp_path / "exp"
    workdir.mkdir()
    async with open_keeper(tmp_path, "4xA100:40", OPEN_LIMITS) as (engine, executor):
        await engine.execute(submit_command("first", jobs.command("--wait")), LOCAL_ADMIN)
        await engine.execute(submit_command(
            "pair", jobs.command("--wait"), num_processes=2,
            env={"FROM_CONFIG": "yes", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
            working_dir=str(workdir),
        ), LOCAL_ADMIN)
        seen = await wait_seen(jobs, "pair")
        job = engine.state.jobs["pair"]

        assert job.allocated_gpus == (1, 2)  # GPU 0 is the first job's
        assert seen["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, job.allocated_gpus))
        assert seen["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert seen["GPUYARD_JOB_ID"] == "pair"
        assert seen["FROM_CONFIG"] == "yes"
        assert seen["cwd"] == str(workdir)
        # job.started names the group leader (the wrapper) with its /proc start time
        assert await engine.wait_for(lambda s: s.jobs["pair"].pid is not None, 30)
        started = engine.state.jobs["pair"]
        assert seen["pgid"] == started.pid and seen["sid"] == started.pid
        assert started.process_start_time == process_start_time(started.pid)

        for job_id in ("first", "pair"):
            jobs.release(job_id)
        for job_id in ("first", "pair"):
            assert (await wait_status(engine, job_id, "completed")).exit_code == 0
        assert engine.state.gpu_holder == {}
        assert "job pair exits with 0" in executor.log_path("pair").read_text()
    assert jobs.conflicts() == ""
    assert gpu_holding_violations(tmp_path / "events.db") == []


@pytest.mark.parametrize(
    ("flags", "status", "exit_code", "error"),
    [
        ((), "completed", 0, None),
        (("--exit", "3"), "failed", 3, "the command exited with code 3"),
    ],
)
async def test_exit_code_decides_the_outcome(
    tmp_path: Path, jobs: Jobs, flags: tuple[str, ...], status: str, exit_code: int,
    error: str | None,
) -> None:
    async with open_keeper(tmp_path) as (engine, executor):
        await engine.execute(submit_command("j", jobs.command(*flags)), LOCAL_ADMIN)
        job = await wait_status(engine, "j", "completed", "failed")
        assert (job.status, job.exit_code, job.error_message) == (status, exit_code, error)
        assert job.attempt == 1  # an exit code is the job's answer: never retried
        assert engine.state.gpu_holder == {}
        assert f"job j exits with {exit_code}" in executor.log_path("j").read_text()


@pytest.mark.parametrize(
    ("command", "working_dir", "error"),
    [
        (["no-such-binary-gpuyard", "--help"], None,
         "command not found: no-such-binary-gpuyard (not on the job's PATH)"),
        (["./missing.sh"], "{tmp}", "command not found: ./missing.sh"),
        ([sys.executable, "-c", "pass"], "{tmp}/nowhere", "working_dir '{tmp}/nowhere' does not exist"),
    ],
)
async def test_a_command_that_cannot_start_fails_with_a_readable_error(
    tmp_path: Path, command: list[str], working_dir: str | None, error: str
) -> None:
    tmp = str(tmp_path)
    wd = working_dir.format(tmp=tmp) if working_dir else None
    async with open_keeper(tmp_path) as (engine, executor):
        await engine.execute(submit_command("bad", command, working_dir=wd), LOCAL_ADMIN)
        job = await wait_status(engine, "bad", "failed")
        assert job.error_message == error.format(tmp=tmp)
        # a launch error is an infrastructure failure: tried max_attempts times (SPEC 3)
        assert (job.exit_code, job.attempt, job.pid) == (None, job.max_attempts, None)
        assert job.max_attempts == 3
        assert requeued_count(engine, "bad") == 2
        assert engine.state.gpu_holder == {}
        assert error.format(tmp=tmp) in executor.log_path("bad").read_text()


async def test_the_wrapper_reports_a_launch_error_the_preflight_could_not_see(
    tmp_path: Path,
) -> None:
    # A file that exists and is executable but cannot be executed (no interpreter line).
    script = tmp_path / "not-a-program"
    script.write_bytes(b"\x00\x01garbage")
    script.chmod(0o755)
    async with open_keeper(tmp_path) as (engine, executor):
        await engine.execute(submit_command("odd", [str(script)]), LOCAL_ADMIN)
        job = await wait_status(engine, "odd", "failed")
        assert job.error_message is not None
        assert job.error_message.startswith(f"could not start {script}")
        assert job.exit_code is None and job.attempt == job.max_attempts == 3
        assert requeued_count(engine, "odd") == 2
        assert job.pid is not None  # it did start: the wrapper ran, and told us why not
        assert "gpuyard: could not start" in executor.log_path("odd").read_text()


async def test_cancel_kills_the_whole_process_group(tmp_path: Path, jobs: Jobs) -> None:
    async with open_keeper(tmp_path, "2xA100:40", OPEN_LIMITS) as (engine, _executor):
        await engine.execute(
            submit_command("parent", jobs.command("--wait", "--grandchild"), num_processes=2),
            LOCAL_ADMIN)
        await engine.execute(submit_command("next", jobs.command()), LOCAL_ADMIN)
        seen = await wait_seen(jobs, "parent")
        grandchild = (seen["grandchild_pid"], seen["grandchild_start"])
        assert not process_gone(*grandchild)
        assert engine.state.jobs["next"].status == "pending"  # every GPU is the parent's

        await engine.execute(Cancel(job_ids=("parent",)), LOCAL_ADMIN)
        job = await wait_status(engine, "parent", "cancelled")

        assert job.exit_code is None
        assert process_gone(*grandchild)
        assert await settle(lambda: process_start_time(seen["pid"]) is None)
        # the GPUs were free only once the group was gone; the next job got them
        assert (await wait_status(engine, "next", "completed")).allocated_gpus == (0,)
    assert jobs.conflicts() == ""
    assert gpu_holding_violations(tmp_path / "events.db") == []


async def test_cancel_reaches_a_grandchild_that_left_the_group(
    tmp_path: Path, jobs: Jobs
) -> None:
    async with open_keeper(tmp_path, "1xA100:40", OPEN_LIMITS) as (engine, _executor):
        await engine.execute(ChangeSettings({"cancel_grace_seconds": 0.3}), LOCAL_ADMIN)
        await engine.execute(
            submit_command("parent", jobs.command("--wait", "--grandchild", "--escape")),
            LOCAL_ADMIN)
        await engine.execute(submit_command("next", jobs.command()), LOCAL_ADMIN)
        seen = await wait_seen(jobs, "parent")
        escaped = (seen["grandchild_pid"], seen["grandchild_start"])
        assert os.getsid(escaped[0]) == escaped[0] != seen["sid"]  # a session of its own

        await engine.execute(Cancel(job_ids=("parent",)), LOCAL_ADMIN)
        await wait_status(engine, "parent", "cancelled")

        assert process_gone(*escaped)
        # it held the GPU's lock: the next job on that GPU would have found it taken
        assert (await wait_status(engine, "next", "completed")).allocated_gpus == (0,)
    assert jobs.conflicts() == ""


async def test_a_finished_job_leaves_no_grandchild_behind_even_outside_its_group(
    tmp_path: Path, jobs: Jobs
) -> None:
    async with open_keeper(tmp_path, "1xA100:40", OPEN_LIMITS) as (engine, _executor):
        await engine.execute(
            submit_command("parent", jobs.command("--wait", "--grandchild", "--escape")),
            LOCAL_ADMIN)
        seen = await wait_seen(jobs, "parent")
        escaped = (seen["grandchild_pid"], seen["grandchild_start"])
        assert not process_gone(*escaped)

        jobs.release("parent")
        await wait_status(engine, "parent", "completed")
        assert await settle(lambda: process_gone(*escaped))


async def test_a_job_ignoring_sigterm_is_killed_after_the_grace(
    tmp_path: Path, jobs: Jobs
) -> None:
    async with open_keeper(tmp_path) as (engine, _executor):
        await engine.execute(ChangeSettings({"cancel_grace_seconds": 0.3}), LOCAL_ADMIN)
        await engine.execute(
            submit_command("stubborn", jobs.command("--wait", "--ignore-term", "--grandchild")),
            LOCAL_ADMIN)
        seen = await wait_seen(jobs, "stubborn")

        await engine.execute(Cancel(job_ids=("stubborn",)), LOCAL_ADMIN)
        job = await wait_status(engine, "stubborn", "cancelled")

        terms = jobs.out / "stubborn.terms"
        # it got SIGTERM once (the wrapper relays; it does not echo), ignored it, and died
        assert terms.read_text() == "TERM\n"
        assert process_gone(seen["grandchild_pid"], seen["grandchild_start"])
        assert await settle(lambda: process_start_time(seen["pid"]) is None)
        assert job.exit_code is None and engine.state.gpu_holder == {}


async def test_queued_jobs_run_in_turn_on_the_freed_gpus(tmp_path: Path, jobs: Jobs) -> None:
    limits = {**OPEN_LIMITS, "local_job_max_concurrent": 3}
    async with open_keeper(tmp_path, "3xA100:40", limits) as (engine, executor):
        for number in range(6):
            await engine.execute(
                submit_command(f"j{number}", jobs.command(), num_processes=1 + number % 2),
                LOCAL_ADMIN)
        for number in range(6):
            job = await wait_status(engine, f"j{number}", "completed")
            assert job.exit_code == 0
        assert engine.state.gpu_holder == {} and executor.active_job_ids == []
    assert jobs.conflicts() == ""
    assert gpu_holding_violations(tmp_path / "events.db") == []
