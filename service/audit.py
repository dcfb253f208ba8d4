"""Reading a log back, from a SQLite file or an audit export, and proving its hash chain.

A log reaches an auditor in one of two forms: the ``events.db`` file itself (a backup or
a copy of production) or an audit export (JSONL or CSV, SPEC section 10). Both come
back here as the same stream of stored rows, read lazily so a large log is never held
in memory, and ``verify`` recomputes ``hash = sha256(prev_hash || canonical bytes)``
along the stream and names the first ``seq`` where it breaks.

A filtered export (``--since``, ``--job`` ...) is not a whole chain: its first line's
predecessor is missing. ``verify_partial`` checks every link the file holds and says how
many lines had to be taken on trust.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec

from events.codec import decode_event
from events.envelope import GENESIS_HASH, Recorded, canonical_bytes, chain_hash
from events.export import FIELDS, csv_cells, jsonl_line, row_from_export
from events.log import ChainBroken, EventLog, LogError, Row, checked_rows, verify_rows

__all__ = [
    "AuditError",
    "ChainBroken",
    "LogError",
    "Verified",
    "is_sqlite",
    "export_rows",
    "source_rows",
    "read_records",
    "verify_file",
    "verify_partial",
    "write_export",
    "backup_log",
]

SQLITE_MAGIC = b"SQLite format 3\x00"
_CSV_FIELD_LIMIT = 64 * 1024 * 1024


class AuditError(Exception):
    """The file is not a log or an export that can be read (it names where, and why)."""


class BadLine(AuditError):
    """An export line that cannot be read back as a stored row. ``seq`` is the one the
    line names, when that much of it can still be read."""

    def __init__(self, path: str | Path, number: int, why: str, seq: int | None) -> None:
        super().__init__(f"{path} line {number}: {why}")
        self.seq = seq
        self.unreadable = f"line {number} cannot be read back: {why}"


# an export line starts with its seq (``row_to_export``); a "seq" inside data is not it
_SEQ_IN_LINE = re.compile(r'\s*\{\s*"seq"\s*:\s*(\d+)\s*[,}]')


class Verified(msgspec.Struct, frozen=True, kw_only=True):
    """A chain that checked out: how many events, and where it ends."""

    count: int
    first_seq: int | None
    last_seq: int | None
    head_hash: str | None  # hex of the last event's hash: anchor it somewhere else
    trusted: int = 0  # partial checks only: lines whose predecessor the file lacks


# ---------------------------------------------------------------- reading


def is_sqlite(path: str | Path) -> bool:
    """Whether ``path`` is a SQLite database file (by its header)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _first_char(handle: IO[str]) -> str:
    while True:
        char = handle.read(1)
        if not char or not char.isspace():
            return char


def export_rows(path: str | Path) -> Iterator[Row]:
    """The stored rows of an audit export, JSONL or CSV (told apart by their first byte)."""
    try:
        handle = open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with handle:
        try:
            first = _first_char(handle)
            handle.seek(0)
            if first == "{":
                yield from _jsonl_rows(handle, path)
            elif first:
                yield from _csv_rows(handle, path)
        except UnicodeDecodeError as exc:
            raise AuditError(f"{path} is neither an event database nor a text export "
                             f"({exc.reason})") from exc


def _jsonl_rows(handle: IO[str], path: str | Path) -> Iterator[Row]:
    decoder = msgspec.json.Decoder(dict[str, Any])
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            yield row_from_export(decoder.decode(line))
        except (msgspec.DecodeError, ValueError) as exc:
            named = _SEQ_IN_LINE.match(line)
            raise BadLine(path, number, _why(exc), int(named[1]) if named else None) from exc


def _csv_rows(handle: IO[str], path: str | Path) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, _CSV_FIELD_LIMIT))
    reader = csv.DictReader(handle)
    missing = [name for name in FIELDS if name not in (reader.fieldnames or ())]
    if missing:
        raise AuditError(f"{path} is neither an events.db nor an audit export (JSONL, or CSV "
                         f"with the columns {','.join(FIELDS)})")
    for record in reader:
        try:
            yield row_from_export(record)
        except ValueError as exc:
            named = str(record.get("seq") or "").strip()
            seq = int(named) if named.isascii() and named.isdigit() else None
            raise BadLine(path, reader.line_num, _why(exc), seq) from exc
        except csv.Error as exc:  # pragma: no cover - a torn quote at the very end
            raise AuditError(f"{path} line {reader.line_num}: {exc}") from exc


def _why(exc: Exception) -> str:
    text = str(exc)
    return text if text.startswith("malformed") else f"malformed export line: {text}"


def _db_rows(path: str | Path) -> Iterator[Row]:
    log = EventLog(path, readonly=True)
    try:
        yield from log.rows()
    finally:
        log.close()


def source_rows(path: str | Path) -> Iterator[Row]:
    """Stored rows from a SQLite log or an export file, whichever ``path`` is."""
    if not Path(path).is_file():
        raise AuditError(f"no such file: {path}")
    return _db_rows(path) if is_sqlite(path) else export_rows(path)


def read_records(rows: Iterable[Row], *, verify: bool = True) -> Iterator[Recorded]:
    """Decode stored rows into :class:`Recorded`, checking the chain as they pass."""
    for seq, at, type_, actor, corr, cause, data, digest in (checked_rows(rows) if verify else rows):
        if not (isinstance(data, bytes) and isinstance(digest, bytes)):  # unverified: say so
            raise AuditError(f"seq {seq}: its data or hash is not stored as bytes: the row was "
                             "altered")
        try:
            event = decode_event(type_, data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise AuditError(f"seq {seq}: cannot decode a {type_!r} event: {exc}") from exc
        yield Recorded(
            seq=seq, at=at, actor=actor, correlation_id=corr, causation_id=cause,
            event=event, data=data, hash=bytes(digest),
        )


# ---------------------------------------------------------------- verifying


class _Tail:
    """Remembers the first and last row that went through it."""

    def __init__(self, rows: Iterable[Row]) -> None:
        self.rows = rows
        self.first: Row | None = None
        self.last: Row | None = None

    def __iter__(self) -> Iterator[Row]:
        for row in self.rows:
            if self.first is None:
                self.first = row
            self.last = row
            yield row

    def verified(self, count: int, trusted: int = 0) -> Verified:
        return Verified(
            count=count,
            first_seq=self.first[0] if self.first else None,
            last_seq=self.last[0] if self.last else None,
            head_hash=bytes(self.last[7]).hex() if self.last else None,
            trusted=trusted,
        )


def verify_file(path: str | Path) -> Verified:
    """Check the whole chain of a log file or an export, from the first event on.

    Raises :class:`ChainBroken` (its ``seq`` is the first bad event), :class:`AuditError`
    for a file that cannot be read as either, or :class:`LogError` for a damaged database.
    """
    tail = _Tail(source_rows(path))
    try:
        count = verify_rows(iter(tail))
    except BadLine as exc:
        # a whole chain has no gaps: whatever that line was, the event after the last good
        # one is not there intact
        after = tail.last[0] if tail.last else 0
        raise ChainBroken(after + 1, exc.unreadable) from exc
    return tail.verified(count)


def verify_partial(path: str | Path) -> Verified:
    """Check every link a filtered export holds.

    An event whose predecessor (``seq - 1``) is in the file must hash from it; one whose
    predecessor is not can only be taken on trust (``trusted`` counts them). Lines must
    still come in increasing ``seq`` order.
    """
    tail = _Tail(source_rows(path))
    prev_seq: int | None = None
    prev_hash = GENESIS_HASH
    count = trusted = 0
    try:
        for seq, at, type_, actor, corr, cause, data, digest in tail:
            if prev_seq is not None and seq <= prev_seq:
                raise ChainBroken(
                    seq, f"seq {seq} comes after seq {prev_seq}: lines are out of order")
            linked = seq == 1 or seq - 1 == prev_seq
            if linked:
                canonical = canonical_bytes(seq, at, type_, actor, corr, cause, data)
                if chain_hash(prev_hash if seq > 1 else GENESIS_HASH, canonical) != digest:
                    raise ChainBroken(seq, "stored hash does not match its contents")
            else:
                trusted += 1
            prev_seq, prev_hash = seq, bytes(digest)
            count += 1
    except BadLine as exc:
        if exc.seq is None or (prev_seq is not None and exc.seq <= prev_seq):
            # which event it held cannot be told
            after = f"the line after seq {prev_seq}" if prev_seq is not None else "the first line"
            raise AuditError(f"{exc} ({after})") from exc
        raise ChainBroken(exc.seq, exc.unreadable) from exc
    return tail.verified(count, trusted)


# ---------------------------------------------------------------- writing an export


def write_export(rows: Iterable[Row], out: IO[bytes], fmt: str = "jsonl") -> int:
    """Write rows as an audit export (the same lines as ``GET /api/audit/export``)."""
    if fmt == "jsonl":
        count = 0
        for row in rows:
            out.write(jsonl_line(row))
            count += 1
        return count
    if fmt != "csv":
        raise AuditError(f"unknown export format {fmt!r}: use jsonl or csv")
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(FIELDS)
    count = 0
    for row in rows:
        writer.writerow(csv_cells(row))
        count += 1
    text.detach()
    return count



# ---------------------------------------------------------------- backup


def backup_log(source: str | Path, dest: str | Path) -> Verified:
    """A consistent online copy of a live log (SQLite's backup API), then verified.

    The copy is taken from a read-only connection: the server keeps writing while it
    runs (WAL), and the copy holds exactly the events committed when it started.
    The copy is written beside ``dest`` and moved into place only once it verifies, so a
    backup that fails (a full disk) leaves nothing half-written, and an earlier ``dest``
    as it was.
    """
    dest = Path(dest).resolve()  # a symlink: replace the file it names, keep the link
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        log = EventLog(source, readonly=True)
        try:
            log.backup_to(partial)
        except LogError as exc:  # named by the file asked for, not the one on the way
            raise LogError(str(exc).replace(str(partial), str(dest), 1)) from exc
        finally:
            log.close()
        verified = verify_file(partial)
        os.replace(partial, dest)
    finally:
        for leftover in (partial, *(partial.with_name(partial.name + suffix)
                                    for suffix in ("-journal", "-wal", "-shm"))):
            leftover.unlink(missing_ok=True)
    return verified
