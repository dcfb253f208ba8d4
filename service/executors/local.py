"""The local executor: the process keeper of SPEC section 8.

Theory of operation
-------------------
The executor acts only on what the log has committed (outbox): it subscribes to the
engine and, for each committed ``job.dispatched`` of a local job, starts the job's command
through the wrapper (``wrapper.py``) in a new session and process group; for each
``job.cancel_requested`` it sends SIGTERM to the group's leader (the wrapper, which relays
it to the whole group) and SIGKILLs the group after ``cancel_grace_seconds``. What happens
to a process comes back as facts through the engine: ``ReportStarted`` (pid and process
start time), then ``ReportExited`` (the exit code), ``ReportFailed`` or
``ReportCancelled``. GPUs are released by the fold of those facts, only once the process
group is gone, and the engine schedules after every commit.

Processes are watched with a pidfd (no thread, no polling; polling every 0.2 s only where
pidfds are not available), so nothing blocks the event loop.

The wrapper writes ``launch.json`` as it starts and ``exit_code`` when the command ends,
even when the server is gone (``run_files.py``). The wrapper this server started also
sends that record down a pipe (``--report-fd``): the executor, its parent, reads it once it
has reaped the wrapper, so a job that ends while its ``exit_code`` cannot be written (a
full disk) is still recorded as it ended, never re-run for it. A wrapper that ended with
no record at all (killed) is an infrastructure failure, re-queued. On start, before
anything else, the executor reconciles every running local job of the replayed state:

- its process still runs (pid, start time and boot all match): adopted, watched again;
- it ended while the server was down: recorded with the exit code the wrapper wrote;
- it is gone without an exit code, or it was dispatched but never launched: reported as
  a retryable failure, so it is re-queued with ``attempt + 1`` (or fails at
  ``max_attempts``);

then it asks for a scheduling pass. A job this server dispatched after its replay but before
the executor subscribed (the start-up inventory batch may dispatch) is launched, not taken
for a crash: the engine's ``replayed_seq`` tells the two apart.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from events.envelope import Recorded
from events.log import EventLog
from events.types import JobCancelRequested, JobDispatched, JobSpec
from projections.state import JobEntry
from service.commands import (
    SYSTEM,
    Command,
    Process,
    ReportCancelled,
    ReportExited,
    ReportFailed,
    ReportStarted,
)
from service.engine import Engine, EngineUnavailable
from service.executors.launch import job_environment, launch_problem, wrapper_argv
from service.executors.procfs import boot_id, is_running, process_start_time
from service.executors.run_files import ExitRecord, LaunchRecord, RunFiles, exit_record_from
from service.executors.wrapper import signal_job

__all__ = ["LocalExecutor"]

log = structlog.get_logger("gpuyard.executor")

POLL_SECONDS = 0.2  # only where pidfds are not available
REPORT_RETRY_SECONDS = 1.0

Signal = JobDispatched | JobCancelRequested


class _Run:
    """One attempt of one job whose process this executor keeps."""

    __slots__ = ("attempt", "cancelling", "exited", "job_id", "pid", "process", "report",
                 "start_time")

    def __init__(self, job_id: str, attempt: int) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.pid: int | None = None
        self.start_time: int | None = None
        self.process: subprocess.Popen[bytes] | None = None  # None when adopted
        self.report: int | None = None  # read end of the wrapper's report pipe; None when adopted
        self.exited = anyio.Event()
        self.cancelling = False


class LocalExecutor:
    """Runs local jobs as processes; reports what happens to them through the engine."""

    def __init__(self, engine: Engine, runs_dir: Path) -> None:
        self.engine = engine
        self.runs_dir = Path(runs_dir)
        self._runs: dict[str, _Run] = {}
        self._boot_id = boot_id()
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[Signal](math.inf)
        self._listening = False
        self._task_group: TaskGroup | None = None

    def log_path(self, job_id: str) -> Path:
        """Where the job's combined stdout and stderr go."""
        return RunFiles(self.runs_dir, job_id).output

    @property
    def active_job_ids(self) -> list[str]:
        """Jobs whose process this executor is keeping right now."""
        return sorted(self._runs)

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reconcile after the replay, report ready, then keep processes until cancelled."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        # Subscribe before reading the state: a dispatch committed while reconciling
        # (a re-queued job started again at once) must not be missed.
        self._listening = True
        self.engine.subscribe(self._on_commit)
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                await self._reconcile()
                task_status.started()
                async for signal_ in self._inbox:
                    if isinstance(signal_, JobDispatched):
                        self._on_dispatched(signal_)
                    else:
                        self._on_cancel_requested(signal_)
        finally:
            self._listening = False
            self._task_group = None

    def _on_commit(self, records: list[Recorded]) -> None:
        """Engine subscriber: runs in the event loop, so it only hands facts over."""
        if not self._listening:
            return
        for recorded in records:
            event = recorded.event
            if isinstance(event, (JobDispatched, JobCancelRequested)):
                self._inbox_send.send_nowait(event)

    def _spawn(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        assert self._task_group is not None, "the executor is not running"
        self._task_group.start_soon(fn, *args)

    # ------------------------------------------------------------ reconcile at start

    async def _reconcile(self) -> None:
        ours = self._dispatched_since_replay()
        state = self.engine.state
        running = [
            (job.job_id, job.attempt) for job in (state.jobs[j] for j in state.running)
            if _is_local(job)
        ]
        for job_id, attempt in running:
            job = self.engine.state.jobs.get(job_id)
            if job is None or job.status != "running" or job.attempt != attempt:
                continue  # it changed meanwhile (cancelled, finished by another report)
            if (job_id, attempt) in ours and job.pid is None:
                # dispatched by this server before the executor listened (the start-up
                # inventory batch can do that): not a crash, just launch it
                self._on_dispatched(JobDispatched(job_id=job_id, gpus=job.allocated_gpus,
                                                  attempt=attempt))
                continue
            await self._reconcile_job(job)
        await self._report(Process())

    def _dispatched_since_replay(self) -> set[tuple[str, int]]:
        """(job, attempt) of the dispatches this server committed after its start-up replay."""
        replayed = self.engine.replayed_seq
        if self.engine.state.last_seq <= replayed:
            return set()
        reader = EventLog(self.engine.log.path, readonly=True)
        try:
            return {
                (recorded.event.job_id, recorded.event.attempt)
                for recorded in reader.read(after_seq=replayed)
                if isinstance(recorded.event, JobDispatched)
            }
        finally:
            reader.close()

    async def _reconcile_job(self, job: JobEntry) -> None:
        files = RunFiles(self.runs_dir, job.job_id)
        launch = files.launch_record(job.attempt)
        if job.pid is None:
            # dispatched, and the server stopped before recording job.started
            if launch is not None and self._alive(launch.pid, launch.start_time, launch):
                log.info("job_adopted", job_id=job.job_id, pid=launch.pid, recorded_start=False)
                run = self._adopt(job, launch.pid, launch.start_time)
                await self._report(ReportStarted(
                    job_id=job.job_id, pid=launch.pid, process_start_time=launch.start_time))
                self._spawn(self._keep, run)
                return
        else:
            assert job.process_start_time is not None
            same = launch if launch is not None and launch.pid == job.pid else None
            if self._alive(job.pid, job.process_start_time, same):
                log.info("job_adopted", job_id=job.job_id, pid=job.pid, recorded_start=True)
                self._spawn(self._keep, self._adopt(job, job.pid, job.process_start_time))
                return
        record = files.exit_record(job.attempt)
        if record is not None:
            log.info("job_ended_while_down", job_id=job.job_id, exit_code=record.exit_code,
                     error=record.error)
            # it ended before this server learned it: the record says when
            await self._report(_report_for(job.job_id, record, ended_at=record.ended_at))
            return
        if job.pid is None and launch is None:
            why = "it was dispatched but never started: the server stopped before launching it"
        else:
            why = "its process was lost while the server was down, without an exit code"
        log.warning("job_lost", job_id=job.job_id, attempt=job.attempt, reason=why)
        await self._report(ReportFailed(job_id=job.job_id, error=why, retryable=True))

    def _alive(self, pid: int, start_time: int, launch: LaunchRecord | None) -> bool:
        if launch is not None and launch.boot_id and self._boot_id \
                and launch.boot_id != self._boot_id:
            return False  # start times only mean something within one boot
        return is_running(pid, start_time)

    def _adopt(self, job: JobEntry, pid: int, start_time: int) -> _Run:
        run = _Run(job.job_id, job.attempt)
        run.pid, run.start_time = pid, start_time
        self._runs[job.job_id] = run
        if job.cancel_requested:
            self._cancel(run)
        return run

    # ------------------------------------------------------------ acting on commits

    def _on_dispatched(self, event: JobDispatched) -> None:
        job = self.engine.state.jobs.get(event.job_id)
        if job is None or not _is_local(job) or job.status != "running":
            return
        if job.attempt != event.attempt or job.pid is not None:
            return  # a stale dispatch: that attempt already ended or was started
        current = self._runs.get(job.job_id)
        if current is not None and current.attempt == job.attempt:
            return
        run = _Run(job.job_id, job.attempt)
        self._runs[job.job_id] = run
        self._spawn(self._launch, run)

    def _on_cancel_requested(self, event: JobCancelRequested) -> None:
        run = self._runs.get(event.job_id)
        if run is not None and run.pid is not None:
            self._cancel(run)
        # not launched yet: _launch looks at cancel_requested once it has a pid

    # ------------------------------------------------------------ launching

    async def _launch(self, run: _Run) -> None:
        job = self.engine.state.jobs.get(run.job_id)
        if job is None or job.status != "running" or job.attempt != run.attempt:
            self._forget(run)
            return
        if job.cancel_requested:
            self._forget(run)
            await self._report(ReportCancelled(job_id=job.job_id))
            return
        files = RunFiles(self.runs_dir, job.job_id)
        spec = job.spec
        try:
            files.prepare()
            env = job_environment(os.environ, spec, job.job_id, job.allocated_gpus)
            problem = launch_problem(spec.command, spec.working_dir, env)
            if problem is not None:
                _note(files, problem)
                self._forget(run)
                log.warning("job_launch_refused", job_id=job.job_id, error=problem)
                # a launch error is an infrastructure failure (SPEC section 3): re-queued
                # with attempt + 1 until max_attempts, then failed with this error
                await self._report(ReportFailed(job_id=job.job_id, error=problem, retryable=True))
                return
            if job.attempt > 1:
                _note(files, f"attempt {job.attempt} of {job.max_attempts}")
            # fork and exec off the event loop (Popen waits until the exec is done)
            process, report = await anyio.to_thread.run_sync(
                _start_wrapper, files, job.attempt, spec, env)
        except OSError as exc:
            self._forget(run)
            error = f"could not launch the job: {exc}"
            log.error("job_launch_failed", job_id=job.job_id, error=error)
            await self._report(ReportFailed(job_id=job.job_id, error=error, retryable=True))
            return
        run.report = report
        try:
            start_time = process_start_time(process.pid)
            run.process, run.pid = process, process.pid
            run.start_time = start_time if start_time is not None else 0
            log.info("job_launched", job_id=job.job_id, pid=process.pid,
                     gpus=job.allocated_gpus, attempt=job.attempt)
            await self._report(ReportStarted(
                job_id=job.job_id, pid=process.pid, process_start_time=run.start_time))
            current = self.engine.state.jobs.get(job.job_id)
            if current is not None and current.cancel_requested:
                self._cancel(run)
            await self._keep(run)
        finally:
            _close_report(run)  # the server stops: the wrapper runs on, on its file alone

    # ------------------------------------------------------------ watching

    async def _keep(self, run: _Run) -> None:
        """Wait for the run's process to end, then report how it ended."""
        await self._wait_for_exit(run)
        status = run.process.wait() if run.process is not None else None  # only reaps it
        run.exited.set()
        self._forget(run)
        assert run.pid is not None
        # the wrapper's own word first (it needs no disk), then the file it wrote
        record = _read_report(run) or RunFiles(self.runs_dir, run.job_id).exit_record(
            run.attempt)
        if record is None:
            # the wrapper died without recording (killed): nothing of the job may outlive it
            await _kill_job(run.pid, run.job_id)
        if run.cancelling:
            log.info("job_cancelled", job_id=run.job_id)
            await self._report(ReportCancelled(job_id=run.job_id))
        elif record is None:
            error = _unrecorded(status)
            log.warning("job_lost", job_id=run.job_id, reason=error, wrapper_status=status)
            await self._report(ReportFailed(job_id=run.job_id, error=error, retryable=True))
        else:
            log.info("job_exited", job_id=run.job_id, exit_code=record.exit_code,
                     error=record.error)
            await self._report(_report_for(run.job_id, record))

    async def _wait_for_exit(self, run: _Run) -> None:
        assert run.pid is not None and run.start_time is not None
        process = run.process
        try:
            pidfd = os.pidfd_open(run.pid)
        except (AttributeError, OSError):
            pidfd = None
        if pidfd is not None:
            try:
                # the pidfd pins the process: check once more that it is still ours
                if process is not None or is_running(run.pid, run.start_time):
                    await anyio.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            return
        while (process.poll() is None) if process is not None else is_running(
            run.pid, run.start_time
        ):
            await anyio.sleep(POLL_SECONDS)

    def _forget(self, run: _Run) -> None:
        if self._runs.get(run.job_id) is run:
            del self._runs[run.job_id]

    # ------------------------------------------------------------ cancelling

    def _cancel(self, run: _Run) -> None:
        if run.cancelling or run.exited.is_set():
            return
        run.cancelling = True
        self._spawn(self._stop, run)

    async def _stop(self, run: _Run) -> None:
        """SIGTERM to the leader (it relays to the group); SIGKILL the group after the grace."""
        assert run.pid is not None
        grace = self.engine.state.settings.cancel_grace_seconds
        if not run.exited.is_set():
            log.info("job_cancel_sigterm", job_id=run.job_id, pid=run.pid, grace=grace)
            try:
                os.kill(run.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            with anyio.move_on_after(grace):
                await run.exited.wait()
        if not run.exited.is_set() or _group_exists(run.pid):
            log.info("job_cancel_sigkill", job_id=run.job_id, pid=run.pid)
            await _kill_job(run.pid, run.job_id)

    # ------------------------------------------------------------ reporting

    async def _report(self, command: Command) -> None:
        """Commit a fact; while the log cannot be written, try again (a fact is never dropped)."""
        while True:
            try:
                await self.engine.execute(command, SYSTEM)
                return
            except EngineUnavailable as exc:
                log.error("report_failed_retrying", command=type(command).__name__,
                          error=str(exc))
                await anyio.sleep(REPORT_RETRY_SECONDS)


def _start_wrapper(files: RunFiles, attempt: int, spec: JobSpec, env: dict[str, str]
                   ) -> tuple[subprocess.Popen[bytes], int]:
    """Start the wrapper as the leader of a new session, its output in the job's log, with
    the write end of a pipe to report the job's end; returns it and the pipe's read end."""
    read_end, write_end = os.pipe()  # both close-on-exec: no other child inherits them
    try:
        argv = wrapper_argv(files.dir, attempt, spec.working_dir, spec.command,
                            report_fd=write_end)
        with files.output.open("ab") as output:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=files.dir,
                env=env,
                start_new_session=True,
                close_fds=True,
                pass_fds=(write_end,),
            )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the wrapper holds the only write end: its exit is the EOF
    os.set_blocking(read_end, False)
    return process, read_end


def _read_report(run: _Run) -> ExitRecord | None:
    """The exit record the wrapper sent down its pipe, read once the wrapper is reaped
    (so all it wrote is there), or None when it sent none; closes the pipe."""
    if run.report is None:
        return None
    data = b""
    try:
        while chunk := os.read(run.report, 65536):
            data += chunk
    except OSError:  # BlockingIOError: nothing (more) to read
        pass
    finally:
        _close_report(run)
    try:
        raw = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return None
    return exit_record_from(raw, run.attempt)


def _close_report(run: _Run) -> None:
    if run.report is not None:
        os.close(run.report)
        run.report = None


def _unrecorded(status: int | None) -> str:
    """Why a run ended with no record of how the job ended (retried: infrastructure)."""
    if status is not None and status < 0:
        return (f"the job's wrapper was killed by signal {-status} before it could record "
                "how the job ended")
    if status is not None:
        return (f"the job's wrapper exited with status {status} without recording how the "
                "job ended")
    return "the job's wrapper was killed before it could record an exit code"


def _note(files: RunFiles, line: str) -> None:
    """A line from gpuyard in the job's output, if it can be written (a full disk)."""
    try:
        files.note(line)
    except OSError as exc:
        log.warning("job_note_failed", path=str(files.output), error=str(exc))


def _is_local(job: JobEntry) -> bool:
    return job.spec.target == "local" and job.worker_id is None


def _report_for(job_id: str, record: ExitRecord, ended_at: float | None = None) -> Command:
    """An exit code is the job's answer (never retried); a command the wrapper could not
    start is a launch error, retried like any infrastructure failure. ``ended_at`` only
    where the end was learned late: a live exit is recorded as it is learned."""
    if record.error is not None or record.exit_code is None:
        return ReportFailed(job_id=job_id, error=record.error or "the command could not start",
                            retryable=True, ended_at=ended_at)
    return ReportExited(job_id=job_id, exit_code=record.exit_code, ended_at=ended_at)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _kill_job(pgid: int, job_id: str) -> None:
    """SIGKILL the job's process group and the job's processes that left it (a /proc
    scan, so in a worker thread: the event loop serves on meanwhile)."""
    await anyio.to_thread.run_sync(signal_job, pgid, job_id, signal.SIGKILL)
