"""The job wrapper: runs one job's command and writes down how it ended.

Run as ``python -I wrapper.py --run-dir DIR --attempt N [--cwd DIR] -- ARGV...`` by the
local executor, as the leader of a new session and process group (``start_new_session``);
the command runs as its child, in the same group. It uses the standard library only, so
it works whatever the job's environment or the server's state.

1. Writes ``DIR/launch.json`` (``attempt``, its own ``pid``, process ``start_time`` from
   ``/proc`` and the ``boot_id``), so a restarted server can adopt the job even if it died
   before recording ``job.started``.
2. Starts the command; SIGTERM, SIGINT and SIGHUP sent to the wrapper are relayed to the
   whole process group (the wrapper ignores its own echo), so ``kill <wrapper pid>`` stops
   the command and everything it spawned.
3. When the command ends, writes ``DIR/exit_code`` atomically (``attempt`` and
   ``exit_code``: negative N means killed by signal N), or ``error`` when the command could
   not start (missing binary, bad working directory), with ``ended_at`` (epoch seconds);
   this happens even when the server is gone. Then it SIGKILLs whatever the command left running in its group, so the GPUs are
   really free once the job is recorded as finished, and exits with the command's status.

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

RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
JOB_MARK = "GPUYARD_JOB_ID"  # in the environment of every process of a job


def _write_atomically(path: str, payload: dict[str, object]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
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


def _write_ended(path: str, attempt: int, **how: object) -> None:
    """The exit record: how the command ended (``exit_code`` or ``error``) and when."""
    _write_atomically(path, {"attempt": attempt, **how, "ended_at": time.time()})


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuyard-wrapper")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--cwd", default=None)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    options = parser.parse_args(args)
    argv = options.argv[1:] if options.argv[:1] == ["--"] else options.argv
    run_dir = options.run_dir
    exit_file = os.path.join(run_dir, "exit_code")
    pid = os.getpid()
    me = stat_fields(pid)
    assert me is not None  # this very process
    _write_atomically(os.path.join(run_dir, "launch.json"), {
        "attempt": options.attempt, "pid": pid, "start_time": int(me[19]),
        "boot_id": boot_id(),
    })
    for signum in RELAYED:
        signal.signal(signum, _relay)
    if not argv:
        error = "the job has an empty command"
        print(f"gpuyard: {error}", file=sys.stderr, flush=True)
        _write_ended(exit_file, options.attempt, error=error)
        return 127
    try:
        child = subprocess.Popen(argv, cwd=options.cwd)
    except OSError as exc:
        error = _launch_error(exc, argv, options.cwd)
        print(f"gpuyard: {error}", file=sys.stderr, flush=True)
        _write_ended(exit_file, options.attempt, error=error)
        return 127
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
            continue
    _write_ended(exit_file, options.attempt, exit_code=code)
    _kill_leftovers()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
