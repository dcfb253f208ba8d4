"""Shared pieces of the local-execution tests (no tests here): a real job script, an
in-process engine with the local executor on a real SQLite file, and the GPU invariant.

The job script (``JOB_SCRIPT``) is a real program the tests run as a job's command. It
writes what it saw (its environment, pid, process group) to ``<out>/<job_id>.json``, takes
a ``flock`` on ``<locks>/gpu<N>`` for each GPU in ``CUDA_VISIBLE_DEVICES`` (held until the
job and every child it forked are gone: the kernel drops it with the last holder), and
writes ``CONFLICT`` if a lock is already held, which would mean two live jobs share a GPU.
Jobs finish when the test creates ``<out>/<job_id>.go``: no test waits on a clock.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from events.log import EventLog
from events.types import (
    JobCancelled,
    JobCompleted,
    JobDispatched,
    JobFailed,
    JobRequeued,
)
from projections.state import JobEntry
from service.commands import (
    LOCAL_ADMIN,
    SYSTEM,
    ChangeSettings,
    ConfigSpec,
    ObserveInventory,
    Submit,
)
from service.engine import Engine
from service.executors.local import LocalExecutor
from service.executors.procfs import is_running, process_start_time
from service.gpus import parse_gpu_spec

JOB_SCRIPT = textwrap.dedent(
    '''
    import argparse, fcntl, json, os, signal, subprocess, sys, time

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--locks", required=True)
    parser.add_argument("--exit", type=int, default=0)
    parser.add_argument("--wait", action="store_true", help="wait for <out>/<job>.go")
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--escape", action="store_true",
                        help="the grandchild leaves the group: its own session (setsid)")
    args = parser.parse_args()
    job_id = os.environ["GPUYARD_JOB_ID"]

    def write(path, payload):
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(payload, handle)
        os.replace(tmp, path)

    if args.ignore_term:
        def noted(signum, frame):
            with open(os.path.join(args.out, job_id + ".terms"), "a") as handle:
                handle.write("TERM\\n")
        signal.signal(signal.SIGTERM, noted)

    held = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    for index in filter(None, visible.split(",")):
        lock = open(os.path.join(args.locks, "gpu" + index), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(os.path.join(args.out, "CONFLICT"), "a") as handle:
                handle.write(job_id + " gpu" + index + "\\n")
            sys.exit(99)
        held.append(lock)

    seen = {key: os.environ.get(key) for key in
            ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUYARD_JOB_ID", "FROM_CONFIG")}
    seen.update(pid=os.getpid(), pgid=os.getpgrp(), sid=os.getsid(0), cwd=os.getcwd())
    if args.grandchild:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 pass_fds=[lock.fileno() for lock in held],
                                 start_new_session=args.escape)
        with open("/proc/%d/stat" % child.pid) as handle:
            stat = handle.read()
        seen.update(grandchild_pid=child.pid,
                    grandchild_start=int(stat[stat.rindex(")") + 2:].split()[19]))
    print("job", job_id, "running on", visible, flush=True)
    write(os.path.join(args.out, job_id + ".json"), seen)
    go = os.path.join(args.out, job_id + ".go")
    while args.wait and not os.path.exists(go):
        time.sleep(0.02)
    print("job", job_id, "exits with", args.exit, flush=True)
    sys.exit(args.exit)
    '''
)

SETTLE = 30.0  # a safety net for waits on real processes, never an assertion on time


class Jobs:
    """A job script on disk, and what its runs write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.out = root / "out"
        self.locks = root / "locks"
        self.out.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(parents=True, exist_ok=True)
        self.script = root / "job.py"
        self.script.write_text(JOB_SCRIPT)

    def command(self, *flags: str) -> list[str]:
        return [sys.executable, str(self.script), "--out", str(self.out),
                "--locks", str(self.locks), *flags]

    def seen(self, job_id: str) -> dict[str, Any] | None:
        path = self.out / f"{job_id}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def release(self, job_id: str) -> None:
        (self.out / f"{job_id}.go").touch()

    def conflicts(self) -> str:
        path = self.out / "CONFLICT"
        return path.read_text() if path.exists() else ""


def submit_command(job_id: str, command: list[str], num_processes: int = 1,
                   **config: Any) -> Submit:
    return Submit(
        job_id=job_id,
        config_name="test",
        config=ConfigSpec(command=command, num_processes=num_processes, **config),
        target="local",
    )


async def settle(predicate: Callable[[], bool], timeout: float = SETTLE) -> bool:
    """Poll a condition on the outside world (files, /proc) until it holds."""
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)
        return True
    return predicate()


async def wait_status(engine: Engine, job_id: str, *statuses: str) -> JobEntry:
    def reached(state: Any) -> bool:
        job = state.jobs.get(job_id)
        return job is not None and job.status in statuses

    assert await engine.wait_for(reached, SETTLE), (
        f"{job_id} never reached {statuses}: {engine.state.jobs.get(job_id)}"
    )
    return engine.state.jobs[job_id]


async def wait_seen(jobs: Jobs, job_id: str) -> dict[str, Any]:
    assert await settle(lambda: jobs.seen(job_id) is not None), f"{job_id} never ran"
    seen = jobs.seen(job_id)
    assert seen is not None
    return seen


OPEN_LIMITS = {"max_concurrent": 10, "user_max_concurrent": 10, "local_job_max_concurrent": 10}


@asynccontextmanager
async def open_engine(data_dir: Path, gpus: str | None = "4xA100:40",
                      settings: dict[str, Any] | None = None) -> AsyncIterator[Engine]:
    """An engine on ``<data_dir>/events.db`` (replayed if it exists), without an executor."""
    event_log = EventLog(data_dir / "events.db")
    try:
        engine = Engine(event_log, tick_seconds=3600.0)
        async with engine.running():
            if gpus is not None:
                await engine.execute(
                    ObserveInventory(backend="spec", devices=parse_gpu_spec(gpus)), SYSTEM)
            if settings:
                await engine.execute(ChangeSettings(settings), LOCAL_ADMIN)
            yield engine
    finally:
        event_log.close()


@asynccontextmanager
async def open_keeper(data_dir: Path, gpus: str | None = "4xA100:40",
                      settings: dict[str, Any] | None = None
                      ) -> AsyncIterator[tuple[Engine, LocalExecutor]]:
    """An engine and a running local executor on ``data_dir`` (a server, minus HTTP)."""
    async with open_engine(data_dir, gpus, settings) as engine:
        executor = LocalExecutor(engine, data_dir / "runs")
        async with anyio.create_task_group() as task_group:
            await task_group.start(executor.run)
            try:
                yield engine, executor
            finally:
                task_group.cancel_scope.cancel()


def gpu_holding_violations(event_log_path: Path) -> list[str]:
    """Walk the recorded log: every dispatch must get GPUs no running job holds."""
    holder: dict[int, str] = {}
    held_by: dict[str, tuple[int, ...]] = {}
    problems = []
    reader = EventLog(event_log_path, readonly=True)
    try:
        for recorded in reader.read():
            event = recorded.event
            if isinstance(event, JobDispatched):
                for index in event.gpus:
                    if index in holder:
                        problems.append(f"seq {recorded.seq}: GPU {index} given to "
                                        f"{event.job_id} while {holder[index]} holds it")
                    holder[index] = event.job_id
                held_by[event.job_id] = event.gpus
            elif isinstance(event, (JobCompleted, JobFailed, JobCancelled, JobRequeued)):
                for index in held_by.pop(event.job_id, ()):
                    if holder.get(index) == event.job_id:
                        del holder[index]
    finally:
        reader.close()
    return problems


def process_gone(pid: int, start_time: int) -> bool:
    return not is_running(pid, start_time)


def start_time_of(pid: int) -> int | None:
    return process_start_time(pid)


def kill_leftover_groups(pids: list[int]) -> None:
    """Test cleanup: SIGKILL the process groups a test left behind."""
    import signal

    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass

