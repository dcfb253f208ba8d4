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
from pathlib import Path

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


def read_tail(path: Path, lines: int | None, *, block: int = 64 * 1024) -> bytes:
    """The last ``lines`` lines of ``path`` (all of it when None); b"" when it does not exist.

    Reads backwards in blocks, so a tail of a large log costs only what it returns.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return b""
    with handle:
        if lines is None:
            return handle.read()
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
