"""The audit export's line format, both ways (pure).

One line per event: ``seq, at, type, actor, correlation_id, causation_id, data, hash``
with ``data`` as a JSON object and ``hash`` as hex. Re-encoding ``data`` with sorted keys
gives back the stored bytes, so an export can be verified without the database.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import msgspec

from events.codec import canonical_json

__all__ = [
    "FIELDS", "Row", "csv_cells", "jsonl_line", "parse_time", "row_from_export", "row_to_export",
]

FIELDS = ("seq", "at", "type", "actor", "correlation_id", "causation_id", "data", "hash")

Row = tuple[int, float, str, str, "str | None", "int | None", bytes, bytes]

_ENCODE = msgspec.json.Encoder().encode


def row_to_export(row: Row) -> dict[str, Any]:
    seq, at, type_, actor, corr, cause, data, digest = row
    return {
        "seq": seq,
        "at": at,
        "type": type_,
        "actor": actor,
        "correlation_id": corr,
        "causation_id": cause,
        "data": msgspec.json.decode(data),
        "hash": bytes(digest).hex(),
    }


def jsonl_line(row: Row) -> bytes:
    """The row as one line of a JSONL export, newline included."""
    return _ENCODE(row_to_export(row)) + b"\n"


def csv_cells(row: Row) -> list[object]:
    """The row as the cells of a CSV export line (``data`` as its JSON text)."""
    seq, at, type_, actor, corr, cause, data, digest = row
    return [seq, repr(float(at)), type_, actor, corr or "", "" if cause is None else cause,
            bytes(data).decode("utf-8"), bytes(digest).hex()]


def row_from_export(line: dict[str, Any]) -> Row:
    """Rebuild the stored row from an exported line (``ValueError`` if malformed)."""
    # a short CSV row has None for its missing cells; only the two ids may be null
    missing = [name for name in FIELDS if name not in line
               or (line[name] is None and name not in ("correlation_id", "causation_id"))]
    if missing:
        raise ValueError(f"malformed export line: it lacks {', '.join(map(repr, missing))}")
    try:
        digest = bytes.fromhex(line["hash"])
    except (TypeError, ValueError):
        raise ValueError(f"malformed export line: its hash {line['hash']!r} is not "
                         "hexadecimal") from None
    try:
        data = line["data"]
        if isinstance(data, str):  # CSV carries data as a JSON string
            data = msgspec.json.decode(data)
        cause = line["causation_id"]
        return (
            int(line["seq"]),
            float(line["at"]),
            str(line["type"]),
            str(line["actor"]),
            line["correlation_id"] or None,
            int(cause) if cause not in (None, "") else None,
            canonical_json(data),
            digest,
        )
    except (KeyError, TypeError, ValueError, msgspec.DecodeError) as exc:
        raise ValueError(f"malformed export line: {exc}") from exc


_FIRST_EPOCH = datetime(1, 1, 1, tzinfo=UTC).timestamp()
_LAST_EPOCH = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def parse_time(text: str) -> float:
    """An export filter's time as epoch seconds: ISO 8601 (``Z`` or an offset; naive is
    UTC) or epoch seconds. ``ValueError`` says what it must be instead."""
    text = text.strip()
    try:
        epoch = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(epoch):
            raise ValueError("must be a finite time")
        if not _FIRST_EPOCH <= epoch <= _LAST_EPOCH:
            raise ValueError("must be a time between the years 1 and 9999")
        return epoch
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError("must be an ISO 8601 time (2024-01-31T12:00:00Z) or epoch seconds") \
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
