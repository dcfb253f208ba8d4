"""What /proc says about a process: its start time, whether it still runs, the boot id.

A pid alone is not an identity (pids are reused); a pid with its start time (clock ticks
since boot, field 22 of ``/proc/<pid>/stat``) and the boot id is.
"""

from __future__ import annotations

from service.executors.wrapper import boot_id, stat_fields

__all__ = ["boot_id", "is_running", "process_start_time"]


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it does not exist."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def is_running(pid: int, start_time: int) -> bool:
    """True when ``pid`` is alive (not a zombie) and is the process that started at ``start_time``."""
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return int(fields[19]) == start_time
