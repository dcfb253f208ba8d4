"""The job wrapper: runs one job's command and writes down how it ended.

Run as ``python -I wrapper.py --run-dir DIR --attempt N [--cwd DIR] [--report-fd FD]
-- ARGV...`` by the local executor, as the leader of a new session and process group
(``start_new_session``); the command runs as its child, in the same group. It uses the
standard library only, so it works whatever the job's environment or the server's state.

1. Writes ``DIR/launch.json`` (``attempt``, its own ``pid``, process ``start_time`` from
   ``/proc`` and the ``boot_id``), so a restarted server can adopt the job even if it died
   before recording ``job.started``. If it cannot (a full disk), the command is not
   started: a server that restarted before recording ``job.started`` could not know it
   runs, and would start it again on the same GPUs. That is reported as an ``error``.
2. Starts the command; SIGTERM, SIGINT and SIGHUP sent to the wrapper are relayed to the
   whole process group (the wrapper ignores its own echo), so ``kill <wrapper pid>`` stops
   the command and everything it spawned.
3. When the command ends, records how: ``attempt`` and ``exit_code`` (negative N means
   killed by signal N), or ``error`` when the command could not start (missing binary,
   bad working directory), with ``ended_at`` (epoch seconds). The record goes to
   ``DIR/exit_code`` (atomically; no temporary file is left when the write fails), which
   outlives the server, and, when the executor that started the wrapper passed
   ``--report-fd``, as one JSON line down that pipe: it needs no disk, so the server
   learns the true end even when the file cannot be written (a full disk). Then, whatever
   happened to the record, it SIGKILLs what the command left running in its group, so
   the GPUs are really free once the job is recorded as finished, and exits with the
   command's status as a shell reports it (N, or 128+N for signal N; 127 when it could
   not start). The exit status is for people only: eight bits cannot tell a job's own
   ``exit 143`` from a SIGTERM, nor reserve a value no job uses; the pipe can.

Processes that left the group (``setsid``) are found by the ``GPUYARD_JOB_ID`` in their
environment (:func:`job_processes`): relayed signals and the final SIGKILL reach them
too, and so does the local executor's SIGKILL after a cancel's grace.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
JOB_MARK = "GPUYARD_JOB_ID"  # in the environment of every process of a job
NOT_STARTED = 127  # the wrapper's exit status when the command could not start


def _write_atomically(path: str, payload: dict[str, object]) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file that is removed
    again if anything fails (a full disk fails the write, not the creation)."""
    data = memoryview(json.dumps(payload).encode())
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (after the command name), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    return stat[stat.rindex(")") + 2:].split()


def boot_id() -> str | None:
    """This boot's id; process start times are only comparable within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _carries(pid: int, mark: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return mark in b"\0" + handle.read()
    except OSError:
        return False


def job_processes(pgid: int, job_id: str | None, *, group: bool) -> list[int]:
    """Live pids of one job (the caller excluded), read from ``/proc``: with ``group``,
    those in process group ``pgid``; and those outside it that carry the job's mark.

    Every process of a job inherits ``GPUYARD_JOB_ID`` (the local executor sets it), so a
    descendant that moved to a session or group of its own (``setsid``, a daemonizing
    double fork) is still found through ``/proc/<pid>/environ``. (A process that clears
    its environment, or a job run by another user, is out of reach.)
    """
    mark = f"\0{JOB_MARK}={job_id}\0".encode() if job_id else None
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        fields = stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        if int(fields[2]) == pgid:
            if group:
                found.append(pid)
        elif mark is not None and _carries(pid, mark):
            found.append(pid)
    return found


def signal_job(pgid: int, job_id: str | None, signum: int) -> None:
    """Send ``signum`` to process group ``pgid`` and to the job's processes that left it."""
    try:
        os.killpg(pgid, signum)
    except OSError:
        pass
    for pid in job_processes(pgid, job_id, group=False):
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def _kill_leftovers() -> None:
    """SIGKILL what the command left behind: its group, and the job's processes that left
    it (never the wrapper itself)."""
    pgid = os.getpgrp()
    if pgid != os.getpid():
        return  # not a group leader: the group is not ours to clean
    job_id = os.environ.get(JOB_MARK)
    for _ in range(20):
        members = job_processes(pgid, job_id, group=True)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _launch_error(exc: OSError, argv: list[str], cwd: str | None) -> str:
    if cwd is not None and exc.filename == cwd:
        return f"working_dir {cwd!r} cannot be used: {exc.strerror}"
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {argv[0]}"
    if isinstance(exc, PermissionError):
        return f"command is not executable: {argv[0]}"
    return f"could not start {argv[0]}: {exc.strerror or exc}"


def _relay(signum: int, _frame: object) -> None:
    """Relay a stop signal to the whole group, ignoring the copy that comes back to us,
    and to the job's processes that left the group."""
    signal.signal(signum, signal.SIG_IGN)
    try:
        signal_job(os.getpgrp(), os.environ.get(JOB_MARK), signum)
    finally:
        signal.signal(signum, _relay)


def _say(line: str) -> None:
    """One line from gpuyard in the job's output, if it can be written (a full disk).
    Straight to fd 2: a failed write left in ``sys.stderr``'s buffer would fail again as
    Python exits, and turn the wrapper's exit status into 120."""
    try:
        os.write(2, f"gpuyard: {line}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def _tell_parent(report_fd: int | None, record: dict[str, object]) -> bool:
    """Send the record down the executor's pipe: one short write, atomic, no disk."""
    if report_fd is None:
        return False
    try:
        os.write(report_fd, json.dumps(record).encode() + b"\n")
        return True
    except OSError:  # the server that started us is gone (EPIPE): the file must do
        return False
    finally:
        try:
            os.close(report_fd)
        except OSError:
            pass


def _record_end(exit_file: str, report_fd: int | None, attempt: int, **how: object) -> None:
    """The exit record: how the command ended (``exit_code`` or ``error``) and when, in
    the exit file and down the executor's pipe."""
    record = {"attempt": attempt, **how, "ended_at": time.time()}
    try:
        _write_atomically(exit_file, record)
    except OSError as exc:
        _say(f"could not record how the job ended in {exit_file}: {exc.strerror or exc}")
    _tell_parent(report_fd, record)


def _report_fd(value: int | None) -> int | None:
    """The pipe to the executor, kept from the command; None if it is not open."""
    if value is None:
        return None
    try:
        os.set_inheritable(value, False)
    except OSError:
        return None
    return value


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuyard-wrapper")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--cwd", default=None)
    parser.add_argument("--report-fd", type=int, default=None)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    options = parser.parse_args(args)
    argv = options.argv[1:] if options.argv[:1] == ["--"] else options.argv
    run_dir = options.run_dir
    exit_file = os.path.join(run_dir, "exit_code")
    report_fd = _report_fd(options.report_fd)

    def ended(**how: object) -> None:
        _record_end(exit_file, report_fd, options.attempt, **how)

    try:
        return _run(options.attempt, run_dir, options.cwd, argv, ended)
    finally:
        _kill_leftovers()  # whatever happened to the record: the job may hold GPUs


def _run(attempt: int, run_dir: str, cwd: str | None, argv: list[str],
         ended: Callable[..., None]) -> int:
    """Start the command, wait for it, record how it ended; the wrapper's exit status."""
    pid = os.getpid()
    me = stat_fields(pid)
    assert me is not None  # this very process
    launch_file = os.path.join(run_dir, "launch.json")
    try:
        _write_atomically(launch_file, {
            "attempt": attempt, "pid": pid, "start_time": int(me[19]), "boot_id": boot_id(),
        })
    except OSError as exc:
        error = f"could not write {launch_file}: {exc.strerror or exc}"
        _say(f"{error}; the command was not started")
        ended(error=error)
        return NOT_STARTED
    for signum in RELAYED:
        signal.signal(signum, _relay)
    if not argv:
        error = "the job has an empty command"
        _say(error)
        ended(error=error)
        return NOT_STARTED
    try:
        child = subprocess.Popen(argv, cwd=cwd)
    except OSError as exc:
        error = _launch_error(exc, argv, cwd)
        _say(error)
        ended(error=error)
        return NOT_STARTED
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
            continue
    ended(exit_code=code)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
