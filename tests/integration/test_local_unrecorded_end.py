"""A job whose end cannot be written down (a full disk when it ends): it is recorded with
its true exit status, never re-run for it, and nothing of it is left behind.

The write failure is real: the wrapper process gets ``RLIMIT_FSIZE`` 0 (``prlimit`` on
the running wrapper, or set before it is exec'd), so every write to a file fails with EFBIG, as a full disk fails it with ENOSPC (Python ignores SIGXFSZ, so the
write raises instead of killing the process). The job's own processes keep their limits.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_local_support import (
    SETTLE,
    Jobs,
    open_keeper,
    process_gone,
    submit_command,
    wait_seen,
    wait_status,
)

from events.types import JobFailed, JobRequeued
from service.commands import LOCAL_ADMIN
from service.executors.launch import wrapper_argv
from service.executors.run_files import RunFiles, exit_record_from


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def jobs(tmp_path: Path) -> Jobs:
    return Jobs(tmp_path / "jobs")


def no_file_writes(pid: int) -> None:
    """From now on every write of process ``pid`` to a file fails (EFBIG)."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, 0))


# runs argv[1:] with no file writes at all (a preexec_fn is unsafe once threads exist)
NO_FILE_WRITES = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)); "
                  "os.execv(sys.argv[1], sys.argv[1:])")


def eventually(probe: Callable[[], Any], what: str) -> Any:
    """Poll the outside world until ``probe`` holds (a safety net, never a timing)."""
    deadline = time.monotonic() + SETTLE
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.02)
    return value


def run_dir_names(files: RunFiles) -> list[str]:
    return sorted(path.name for path in files.dir.iterdir())


# ---------------------------------------------------------------- through the executor


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("flags", "stop", "status", "exit_code", "error"),
    [
        ((), False, "completed", 0, None),
        (("--exit", "3"), False, "failed", 3, "the command exited with code 3"),
        # stopped by a SIGTERM that is not a cancel (an operator's kill of the wrapper)
        ((), True, "failed", -15, "the command was killed by signal 15"),
    ],
)
async def test_a_job_whose_end_cannot_be_written_is_recorded_as_it_ended_and_not_rerun(
    tmp_path: Path, jobs: Jobs, flags: tuple[str, ...], stop: bool, status: str,
    exit_code: int, error: str | None,
) -> None:
    async with open_keeper(tmp_path) as (engine, _executor):
        await engine.execute(submit_command("j", jobs.command("--wait", *flags)), LOCAL_ADMIN)
        await wait_seen(jobs, "j")
        assert await engine.wait_for(lambda s: s.jobs["j"].pid is not None, SETTLE)
        wrapper = engine.state.jobs["j"].pid
        assert wrapper is not None

        no_file_writes(wrapper)  # the disk is full from now on, for the wrapper
        if stop:
            os.kill(wrapper, signal.SIGTERM)
        else:
            jobs.release("j")
        job = await wait_status(engine, "j", "completed", "failed")

        assert (job.status, job.exit_code, job.error_message) == (status, exit_code, error)
        assert job.attempt == 1  # its exit status is the job's answer: never re-run
        assert not any(isinstance(r.event, JobRequeued) for r in engine.log.read())
        assert engine.state.gpu_holder == {}
    # the exit record really could not be written, and no temporary file is left
    assert run_dir_names(RunFiles(tmp_path / "runs", "j")) == ["launch.json", "output.log"]


@pytest.mark.anyio
async def test_a_wrapper_killed_under_its_job_is_an_infrastructure_failure_run_again(
    tmp_path: Path, jobs: Jobs
) -> None:
    # no record at all: the wrapper's own death says nothing about how the job would end
    async with open_keeper(tmp_path, "1xA100:40") as (engine, _executor):
        await engine.execute(submit_command("j", jobs.command("--wait", "--grandchild")),
                             LOCAL_ADMIN)
        first = await wait_seen(jobs, "j")
        assert await engine.wait_for(lambda s: s.jobs["j"].pid is not None, SETTLE)
        wrapper = engine.state.jobs["j"].pid
        assert wrapper is not None
        (jobs.out / "j.json").unlink()

        os.kill(wrapper, signal.SIGKILL)
        await wait_seen(jobs, "j")  # attempt 2 runs, on the same GPU
        assert engine.state.jobs["j"].attempt == 2
        # attempt 1's grandchild held that GPU's lock: it is gone (and, as attempt 2 found
        # the lock free, it was gone before attempt 2 began: see conflicts below)
        assert process_gone(first["grandchild_pid"], first["grandchild_start"])
        jobs.release("j")
        job = await wait_status(engine, "j", "completed")
        assert (job.attempt, job.exit_code) == (2, 0)
        (failed,) = [r.event for r in engine.log.read() if isinstance(r.event, JobFailed)]
        assert failed.retryable and failed.exit_code is None
        assert failed.error == ("the job's wrapper was killed by signal 9 before it could "
                                "record how the job ended")
    assert jobs.conflicts() == ""


@pytest.mark.anyio
async def test_a_job_killed_by_sigkill_is_failed_not_run_again(
    tmp_path: Path, jobs: Jobs
) -> None:
    async with open_keeper(tmp_path) as (engine, _executor):
        await engine.execute(submit_command("j", jobs.command("--wait")), LOCAL_ADMIN)
        seen = await wait_seen(jobs, "j")
        os.kill(seen["pid"], signal.SIGKILL)  # the job's process, not its wrapper
        job = await wait_status(engine, "j", "failed")
        assert (job.exit_code, job.attempt) == (-9, 1)
        assert job.error_message == "the command was killed by signal 9"


# ---------------------------------------------------------------- the wrapper alone


def start_wrapper(files: RunFiles, command: list[str], *, report_fd: int | None = None,
                  no_writes: bool = False) -> subprocess.Popen[bytes]:
    """The wrapper as the executor starts it (its own session, output to the run's log),
    or as it runs on after the server is gone (``report_fd`` None: no parent listens);
    with ``no_writes``, unable to write any file from its first instruction."""
    files.prepare()
    env = {**os.environ, "GPUYARD_JOB_ID": files.dir.name}
    argv = wrapper_argv(files.dir, 1, None, tuple(command), report_fd=report_fd)
    if no_writes:
        argv = [sys.executable, "-c", NO_FILE_WRITES, *argv]
    with files.output.open("ab") as output:
        return subprocess.Popen(
            argv, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            pass_fds=() if report_fd is None else (report_fd,))


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Process groups a failed test must not leave running."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


def test_the_wrapper_kills_what_the_job_left_even_when_it_cannot_record_the_end(
    tmp_path: Path, jobs: Jobs, leftovers: list[int]
) -> None:
    # no server listens (it is down): the wrapper alone must free the job's GPUs
    files = RunFiles(tmp_path / "runs", "w")
    wrapper = start_wrapper(files, jobs.command("--wait", "--grandchild"))
    leftovers.append(wrapper.pid)
    seen = eventually(lambda: jobs.seen("w"), "the job ran")
    grandchild = (seen["grandchild_pid"], seen["grandchild_start"])
    assert not process_gone(*grandchild)

    no_file_writes(wrapper.pid)
    jobs.release("w")
    code = wrapper.wait(timeout=SETTLE)

    assert process_gone(*grandchild)  # it held the job's GPU
    assert code == 0  # the job's own status, as a shell would report it
    assert run_dir_names(files) == ["launch.json", "output.log"]


def test_the_wrapper_tells_its_parent_how_the_job_ended_when_no_file_can_be_written(
    tmp_path: Path, jobs: Jobs, leftovers: list[int]
) -> None:
    files = RunFiles(tmp_path / "runs", "w")
    read_end, write_end = os.pipe()
    report = os.fdopen(read_end, "rb")  # closed once, by the with
    with report:
        try:
            wrapper = start_wrapper(files, jobs.command("--wait", "--exit", "130"),
                                    report_fd=write_end)
        finally:
            os.close(write_end)  # the wrapper holds its own copy
        leftovers.append(wrapper.pid)
        eventually(lambda: jobs.seen("w"), "the job ran")
        no_file_writes(wrapper.pid)
        jobs.release("w")
        assert wrapper.wait(timeout=SETTLE) == 130
        said = json.loads(report.read())
    record = exit_record_from(said, 1)
    # 130 is the job's own exit code, not a SIGINT: only the exit status could not tell
    assert record is not None and (record.exit_code, record.error) == (130, None)
    assert run_dir_names(files) == ["launch.json", "output.log"]


def test_a_wrapper_that_cannot_write_its_launch_record_starts_nothing(
    tmp_path: Path, leftovers: list[int]
) -> None:
    # the job would run unknown to a server that restarts before it records job.started,
    # and be started a second time on the same GPUs: it must not start at all
    files = RunFiles(tmp_path / "runs", "w")
    marker = tmp_path / "ran"
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as report:
        try:
            wrapper = start_wrapper(
                files, [sys.executable, "-c", "import os, sys; os.mkdir(sys.argv[1])",
                        str(marker)],
                report_fd=write_end, no_writes=True)
        finally:
            os.close(write_end)
        leftovers.append(wrapper.pid)
        assert wrapper.wait(timeout=SETTLE) != 0
        said = json.loads(report.read())

    record = exit_record_from(said, 1)
    assert record is not None and record.exit_code is None
    assert record.error is not None and record.error.startswith(
        f"could not write {files.launch}:")
    assert not marker.exists()
    assert run_dir_names(files) == ["output.log"]  # no launch record, no temporary file
