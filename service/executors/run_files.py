"""The files of one job's run, under ``<data-dir>/runs/<job_id>/``.

- ``output.log``: the command's stdout and stderr (every attempt, appended);
- ``launch.json``: written by the wrapper as it starts: ``attempt``, ``pid``,
  ``start_time`` and ``boot_id``;
- ``exit_code``: written atomically by the wrapper when the command ends: ``attempt`` and
  ``exit_code``, or ``error`` when the command could not start, and ``ended_at``. The same
  record also reaches the executor that started the wrapper through a pipe
  (:func:`exit_record_from` reads both), for when the file cannot be written.

Every record carries its attempt: a record left by an earlier attempt is never read as the
current one's.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import BinaryIO

from msgspec import Struct

__all__ = ["ExitRecord", "LaunchRecord", "RunFiles", "exit_record_from", "read_tail"]


class LaunchRecord(Struct, frozen=True, kw_only=True):
    attempt: int
    pid: int
    start_time: int
    boot_id: str | None = None


class ExitRecord(Struct, frozen=True, kw_only=True):
    attempt: int
    exit_code: int | None = None
    error: str | None = None
    ended_at: float | None = None  # epoch seconds; None in a record without it


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def exit_record_from(raw: object, attempt: int) -> ExitRecord | None:
    """The wrapper's exit record for ``attempt`` in ``raw`` (parsed JSON), or None when it
    is not one or belongs to another attempt."""
    if not isinstance(raw, dict) or raw.get("attempt") != attempt:
        return None
    code, error, ended_at = raw.get("exit_code"), raw.get("error"), raw.get("ended_at")
    if not (isinstance(ended_at, (int, float)) and not isinstance(ended_at, bool)
            and math.isfinite(ended_at)):
        ended_at = None
    if isinstance(error, str):
        return ExitRecord(attempt=attempt, error=error, ended_at=ended_at)
    if isinstance(code, int) and not isinstance(code, bool):
        return ExitRecord(attempt=attempt, exit_code=code, ended_at=ended_at)
    return None


class RunFiles:
    """Paths and records of one job's run directory."""

    def __init__(self, runs_dir: Path, job_id: str) -> None:
        self.dir = runs_dir / job_id
        self.output = self.dir / "output.log"
        self.launch = self.dir / "launch.json"
        self.exit = self.dir / "exit_code"

    def prepare(self) -> None:
        """Create the directory and remove an earlier attempt's launch and exit records."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in (self.launch, self.exit):
            path.unlink(missing_ok=True)

    def launch_record(self, attempt: int) -> LaunchRecord | None:
        raw = _read_json(self.launch)
        if raw is None or raw.get("attempt") != attempt:
            return None
        pid, start_time = raw.get("pid"), raw.get("start_time")
        if not isinstance(pid, int) or not isinstance(start_time, int):
            return None
        boot = raw.get("boot_id")
        return LaunchRecord(attempt=attempt, pid=pid, start_time=start_time,
                            boot_id=boot if isinstance(boot, str) else None)

    def exit_record(self, attempt: int) -> ExitRecord | None:
        return exit_record_from(_read_json(self.exit), attempt)

    def note(self, line: str) -> None:
        """Append one line from gpuyard itself to the job's output."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.output.open("a", encoding="utf-8") as handle:
            handle.write(f"gpuyard: {line}\n")


class NotTheJobsOutput(Exception):
    """What stands where a job's output log should be is not a plain file in its own run
    directory (the job replaced it, or its directory, with something else)."""


def open_output(runs_dir: Path, job_id: str) -> BinaryIO | None:
    """The job's ``output.log``, opened for reading; ``None`` when there is none yet.

    A job runs in its own directory and could put anything in place of its log, or of the
    directory: a FIFO (a read that never returns), a symlink (a file that is not the
    job's), a directory. Nothing is followed (``O_NOFOLLOW`` on both steps, the log opened
    relative to the directory opened first) and nothing blocks (``O_NONBLOCK``); what was
    opened is checked to be a plain file. Raises :class:`NotTheJobsOutput`.
    """
    where = runs_dir / job_id
    try:
        dir_fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP (a symlink), ENOTDIR (a file)
        raise NotTheJobsOutput(f"the job's run directory {where} is not a directory "
                               f"({exc.strerror})") from None
    try:
        fd = os.open("output.log", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink
        raise NotTheJobsOutput(f"the job's output log {where / 'output.log'} cannot be read "
                               f"as its own file ({exc.strerror})") from None
    finally:
        os.close(dir_fd)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else (
            "a pipe" if stat.S_ISFIFO(mode) else "not a regular file")
        raise NotTheJobsOutput(f"the job's output log {where / 'output.log'} is {kind}, not "
                               "the file the job wrote")
    return os.fdopen(fd, "rb")


def read_tail(handle: BinaryIO, lines: int, *, block: int = 64 * 1024) -> bytes:
    """The last ``lines`` lines of an open file. Reads backwards in blocks, so a tail of a
    large log costs only what it returns."""
    end = handle.seek(0, 2)
    position = end
    chunks: list[bytes] = []
    newlines = 0
    while position > 0 and newlines <= lines:
        step = min(block, position)
        position -= step
        handle.seek(position)
        chunk = handle.read(step)
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    # a final newline ends the last line; it does not start an empty one
    body = data[:-1] if data.endswith(b"\n") else data
    kept = body.split(b"\n")[-lines:]
    tail = b"\n".join(kept)
    return tail + b"\n" if data.endswith(b"\n") else tail
