"""What /proc says about a process: its start time, whether it still runs, the boot id.

A pid alone is not an identity (pids are reused); a pid with its start time (clock ticks
since boot, field 22 of ``/proc/<pid>/stat``) and the boot id is.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["boot_id", "is_running", "process_start_time"]

_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (after the command name), or None if gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_bytes().decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    return stat[stat.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def is_running(pid: int, start_time: int) -> bool:
    """True when ``pid`` is alive (not a zombie) and is the process that started at ``start_time``."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return int(fields[19]) == start_time


def boot_id() -> str | None:
    """This boot's id; start times are only comparable within one boot."""
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return None
