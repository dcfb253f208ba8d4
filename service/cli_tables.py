"""How the CLI shows things: rich tables for people, stable JSON for programs.

Nothing here talks to a server or reads a file; it turns plain data (API answers,
replay views) into text.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

__all__ = [
    "console",
    "print_json",
    "pick",
    "cell",
    "when",
    "duration",
    "table",
    "key_values",
]

_MISSING = object()


def console(stderr: bool = False) -> Console:
    """A console that never squeezes a table into 80 columns when output is piped."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(file=stream, soft_wrap=False)
    width = max(shutil.get_terminal_size((200, 24)).columns, 200)
    return Console(file=stream, width=width, soft_wrap=False, color_system=None)


def print_json(value: Any) -> None:
    """Stable, machine-readable JSON on stdout (keys in the order they were built)."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def pick(entry: Any, path: str) -> Any:
    """``pick({"metadata": {"run_name": "x"}}, "metadata.run_name") == "x"``; ``None`` if absent."""
    value = entry
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.lstrip("-").isdigit():
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else _MISSING
        else:
            value = _MISSING
        if value is _MISSING:
            return None
    return value


def when(value: Any) -> str:
    """A time for a table: ISO strings shortened, epoch seconds turned into UTC."""
    if value is None:
        return "-"
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
        except (OverflowError, OSError, ValueError):  # beyond the years 1-9999
            return str(value)
    text = str(value)
    return text.replace("T", " ").split(".")[0].removesuffix("Z").removesuffix("+00:00")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def cell(value: Any, field: str = "") -> str:
    """One value as table text."""
    if value is None:
        return "-"
    if field.endswith("_at") and value not in ("", None):
        return when(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), default=str)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table(
    rows: Iterable[dict[str, Any]],
    columns: Sequence[str],
    *,
    title: str | None = None,
    headers: Sequence[str] | None = None,
) -> Table:
    """A table of ``rows`` showing ``columns`` (dot paths reach into nested fields)."""
    out = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False,
                min_width=len(title) if title else None)
    for name in headers or columns:
        out.add_column(name, overflow="fold")
    for row in rows:
        out.add_row(*(cell(pick(row, column), column) for column in columns))
    return out


def stats_pairs(stats: dict[str, Any]) -> list[tuple[str, Any]]:
    """The rows of SPEC section 7's stats (``GET /api/queue/stats``, or a replayed
    moment's), for :func:`key_values`."""
    local = stats.get("local") or {}
    return [
        ("queued", stats.get("queue_depth")),
        ("running", stats.get("running")),
        ("blocked", stats.get("blocked")),
        ("avg wait (24 h)", duration(stats.get("avg_wait_seconds"))),
        ("max_concurrent", stats.get("max_concurrent")),
        ("user_max_concurrent", stats.get("user_max_concurrent")),
        ("team_max_concurrent", stats.get("team_max_concurrent")),
        ("enable_fair_share", stats.get("enable_fair_share")),
        ("local_job_max_concurrent", stats.get("local_job_max_concurrent")),
        ("local_gpu_max_concurrent", stats.get("local_gpu_max_concurrent") or "unlimited"),
        ("local running jobs", local.get("running_jobs")),
        ("local allocated GPUs", local.get("allocated_gpus")),
        ("local available GPUs", local.get("available_gpus")),
        ("local total GPUs", local.get("total_gpus")),
        ("by status", stats.get("by_status")),
        ("by user (pending+running)", stats.get("by_user")),
    ]


def key_values(pairs: Iterable[tuple[str, Any]], *, title: str | None = None) -> Table:
    """A two-column table of settings or stats."""
    out = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_header=False,
                pad_edge=False, min_width=len(title) if title else None)
    out.add_column("key", style="bold")
    out.add_column("value", overflow="fold")
    for key, value in pairs:
        out.add_row(key, cell(value, key))
    return out
