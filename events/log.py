"""The append-only event log on SQLite (apsw). The only module that touches SQL.

WAL with ``synchronous=FULL``: an append returns only once its transaction is on disk.
Triggers abort any UPDATE or DELETE. apsw's exceptions become :class:`LogError` here
and nowhere else.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import itemgetter
from pathlib import Path

import apsw
import msgspec

from events.codec import UPCASTERS, Decoded, decode_batch, decode_event, decoder_for
from events.envelope import GENESIS_HASH, Recorded, canonical_bytes, chain_hash
from events.export import FIELDS, Row
from events.types import AnyEvent

__all__ = ["EventLog", "LogError", "LogConflict", "ChainBroken", "checked_rows", "verify_rows"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    type TEXT NOT NULL,
    actor TEXT NOT NULL,
    correlation_id TEXT,
    causation_id INTEGER,
    data BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the event log is append-only: UPDATE is refused'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the event log is append-only: DELETE is refused'); END;
"""

_COLUMNS = ", ".join(FIELDS)  # the stored row is the export line, field for field

# A replay batch, built by SQLite in one statement: ``[[seq, at, {"type": tag, ...}], ...]``.
# The tag goes first (stored data has sorted keys, so its own "type" comes late, and the
# union would read each event twice; msgspec checks that the two agree), and ``at`` is
# written with 17 significant digits, which round-trips any double.
_BATCH_SQL = """
SELECT CAST('[' || group_concat(
    '[' || seq || ',' || printf('%!.17g', at) || ',{"type":"' || type || '",'
        || substr(data, 2) || ']',
    ',') || ']' AS BLOB)
FROM (SELECT seq, at, type, data FROM events WHERE seq > ? AND seq <= ? ORDER BY seq)
"""
BATCH_EVENTS = 4096
# An append inserts its rows with one statement (8 parameters a row, within SQLite's
# 32,766). ``executemany`` would take the GIL back for every row, and the engine appends
# from a worker thread while the event loop runs: each time, that thread can wait up to
# the interpreter's switch interval for the GIL (p90 43 ms for 64 rows against a busy
# loop, measured; 8 ms with one statement).
INSERT_ROWS = 4000
BATCH_MAX_BYTES = 64 << 20  # a longer batch is read row by row instead
_seq_of = itemgetter(0)


@functools.lru_cache(maxsize=64)
def _insert_sql(rows: int) -> str:
    return f"INSERT INTO events({_COLUMNS}) VALUES " + ",".join(("(?,?,?,?,?,?,?,?)",) * rows)


class LogError(Exception):
    """The log could not be read or written."""


class LogConflict(LogError):
    """An append did not continue the chain (wrong seq or prev hash)."""


class ChainBroken(LogError):
    """Verification found an event whose hash does not match; ``seq`` names it."""

    def __init__(self, seq: int, why: str, *, missing: bool = False) -> None:
        super().__init__(f"hash chain broken at seq {seq}: {why}")
        self.seq = seq
        self.why = why
        self.missing = missing  # seq is not there at all (another one came in its place)



def checked_rows(rows: Iterable[Row]) -> Iterator[Row]:
    """Pass rows through in seq order, raising :class:`ChainBroken` at the first bad link."""
    prev = GENESIS_HASH
    expected = 1
    for row in rows:
        seq, at, type_, actor, corr, cause, data, digest = row
        if seq != expected:
            raise ChainBroken(expected, f"seq {expected} is missing (found {seq})", missing=True)
        if not (isinstance(data, bytes) and isinstance(digest, bytes)):
            # SQLite keeps whatever type an UPDATE wrote (replace() gives TEXT)
            raise ChainBroken(seq, "its data or hash is not stored as bytes: the row was altered")
        if chain_hash(prev, canonical_bytes(seq, at, type_, actor, corr, cause, data)) != digest:
            raise ChainBroken(seq, "stored hash does not match its contents")
        prev = digest
        expected += 1
        yield row


def verify_rows(rows: Iterable[Row]) -> int:
    """Check a stream of rows in seq order; return the count or raise :class:`ChainBroken`."""
    return sum(1 for _ in checked_rows(rows))


class EventLog:
    """One SQLite file holding the log. Not thread-safe: one writer at a time."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = str(path)
        try:
            if readonly:
                flags = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
                self._db = apsw.Connection(f"file:{self.path}?mode=ro", flags=flags)
            else:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._db = apsw.Connection(self.path)
                self._refuse_a_foreign_database()
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                with self._db:
                    self._db.execute(_SCHEMA)
            self._db.setbusytimeout(5000)
            self.last_seq, self.last_hash = self._tail()
        except apsw.Error as exc:
            raise LogError(f"cannot open event log {self.path}: {exc}") from exc

    def _refuse_a_foreign_database(self) -> None:
        """An SQLite file with tables and no ``events`` is somebody else's: not taken over."""
        tables = [name for (name,) in self._db.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
        if tables and "events" not in tables:
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            self._db.close()
            raise LogError(f"{self.path} is an SQLite database but not a gpuyard event log "
                           f"(it holds the tables {shown}); nothing was changed")

    def _tail(self) -> tuple[int, bytes]:
        row = self._db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            return 0, GENESIS_HASH
        return int(row[0]), bytes(row[1])

    def refresh(self) -> None:
        """Re-read where the log ends (after a failed append, say)."""
        try:
            self.last_seq, self.last_hash = self._tail()
        except apsw.Error as exc:
            raise LogError(f"reading the event log failed: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def append(self, batch: Sequence[Recorded]) -> None:
        """Append sealed events in one durable transaction; all or nothing."""
        if not batch:
            return
        if batch[0].seq != self.last_seq + 1:
            raise LogConflict(f"append starts at seq {batch[0].seq}, log ends at {self.last_seq}")
        try:
            with self._db:
                for start in range(0, len(batch), INSERT_ROWS):
                    chunk = batch[start:start + INSERT_ROWS]
                    values: list[object] = []
                    for r in chunk:
                        values += (r.seq, r.at, r.type, r.actor, r.correlation_id,
                                   r.causation_id, r.data, r.hash)
                    self._db.execute(_insert_sql(len(chunk)), values)
        except apsw.ConstraintError as exc:
            raise LogConflict(f"append refused: {exc}") from exc
        except apsw.Error as exc:
            raise LogError(f"append failed: {exc}") from exc
        self.last_seq = batch[-1].seq
        self.last_hash = batch[-1].hash

    def _select(self, after_seq: int, until_seq: int | None) -> apsw.Cursor:
        sql = f"SELECT {_COLUMNS} FROM events WHERE seq > ?"
        args: tuple[int, ...] = (after_seq,)
        if until_seq is not None:
            sql += " AND seq <= ?"
            args = (after_seq, until_seq)
        return self._db.cursor().execute(sql + " ORDER BY seq", args)

    def rows(self, after_seq: int = 0, until_seq: int | None = None) -> Iterator[Row]:
        """Raw rows in seq order (seq > after_seq, and <= until_seq when given)."""
        try:
            yield from self._select(after_seq, until_seq)  # type: ignore[misc]
        except apsw.Error as exc:
            raise LogError(f"reading the event log failed: {exc}") from exc

    def read(self, after_seq: int = 0, until_seq: int | None = None) -> Iterator[Recorded]:
        """Decoded events in seq order."""
        decoders: dict[str, Callable[[bytes], AnyEvent]] = {}
        try:
            # one loop straight over the cursor: a replay reads a million rows here
            for seq, at, type_, actor, corr, cause, data, digest in self._select(
                after_seq, until_seq
            ):
                decode = decoders.get(type_)
                if decode is None:
                    decode = decoders[type_] = decoder_for(type_)
                try:
                    event = decode(data)
                except msgspec.DecodeError:
                    event = decode_event(type_, data)  # the bytes are not of their type
                yield Recorded(
                    seq=seq,
                    at=at,
                    actor=actor,
                    correlation_id=corr,
                    causation_id=cause,
                    event=event,
                    data=data,
                    hash=digest,
                )
        except apsw.Error as exc:
            raise LogError(f"reading the event log failed: {exc}") from exc

    def batches(
        self, after_seq: int = 0, until_seq: int | None = None
    ) -> Iterator[list[Decoded]]:
        """``(seq, at, event)`` in seq order, a list at a time: the replay's fast path.

        SQLite writes each batch of rows as one JSON text, in a read-ahead thread (apsw
        lets go of the GIL while SQLite works), and msgspec decodes it in one call while
        the caller folds the batch before. A batch that does not decode whole (an old
        shape, a damaged row) or that the thread could not build is read again row by
        row through :meth:`read`, which upcasts or names the error; so is everything
        while an upcaster is registered.
        """
        end = self._end() if until_seq is None else until_seq
        ranges = [(lo, min(lo + BATCH_EVENTS, end)) for lo in range(after_seq, end, BATCH_EVENTS)]
        if UPCASTERS:
            for lo, hi in ranges:
                yield self._read_decoded(lo, hi)
            return
        reader = _ReadAhead(self._connect_reader, ranges)
        try:
            for lo, hi, text in reader:
                try:
                    batch = decode_batch(text) if text is not None else []
                except msgspec.DecodeError:
                    batch = []
                # group_concat keeps the subquery's order in practice, not by contract: a
                # batch is taken only when it holds exactly the seqs lo+1..hi, in order
                if list(map(_seq_of, batch)) != list(range(lo + 1, hi + 1)):
                    batch = self._read_decoded(lo, hi)
                yield batch
        finally:
            reader.close()

    def _read_decoded(self, after_seq: int, until_seq: int) -> list[Decoded]:
        """One batch read row by row through :meth:`read` (upcasting, naming errors)."""
        return [(r.seq, r.at, r.event) for r in self.read(after_seq, until_seq)]

    def _end(self) -> int:
        try:
            row = self._db.execute("SELECT max(seq) FROM events").fetchone()
        except apsw.Error as exc:
            raise LogError(f"reading the event log failed: {exc}") from exc
        return int(row[0] or 0) if row is not None else 0

    def _connect_reader(self) -> apsw.Connection:
        flags = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
        reader = apsw.Connection(f"file:{self.path}?mode=ro", flags=flags)
        reader.setbusytimeout(5000)
        reader.limit(apsw.SQLITE_LIMIT_LENGTH, BATCH_MAX_BYTES)  # bounds the read-ahead's memory
        return reader

    def verify(self) -> int:
        """Check the whole chain; return the event count or raise :class:`ChainBroken`."""
        return verify_rows(self.rows())

    def backup_to(self, dest: str | Path) -> None:
        """A consistent online copy of the log into ``dest`` (SQLite's backup API)."""
        try:
            target = apsw.Connection(str(dest))
            try:
                with target.backup("main", self._db, "main") as job:
                    job.step(-1)
            finally:
                target.close()
        except apsw.Error as exc:
            raise LogError(f"backup to {dest} failed: {_described(exc)}") from exc

    def execute_raw(self, sql: str) -> None:
        """Run raw SQL against the log (tests use it to prove the triggers hold)."""
        try:
            with self._db:
                self._db.execute(sql)
        except apsw.Error as exc:
            raise LogError(str(exc)) from exc


def _described(exc: apsw.Error) -> str:
    """apsw's message, or what its class means where the message says nothing (a backup
    that cannot write its copy reports SQLite's "not an error")."""
    text = str(exc)
    if text and text != "not an error":
        return text
    if isinstance(exc, apsw.FullError):
        return "the disk is full"
    if isinstance(exc, apsw.IOError):
        return "a write failed (is the disk full, or the file larger than allowed?)"
    return type(exc).__name__


class _ReadAhead:
    """Runs the batch statements of a replay in a thread of its own, a few batches ahead.

    Iterating yields ``(after_seq, until_seq, json bytes or None)`` in order. ``None``
    means the thread could not build that batch (its connection would not open, the text
    would pass ``BATCH_MAX_BYTES``, a read failed): the caller reads those rows itself,
    and its own read names any real error. :meth:`close` stops the thread, also when the
    caller gives up half way.
    """

    DEPTH = 4

    def __init__(
        self, connect: Callable[[], apsw.Connection], ranges: list[tuple[int, int]]
    ) -> None:
        self._queue: queue.Queue[tuple[int, int, bytes | None] | None] = queue.Queue(self.DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(connect, ranges), name="gpuyard-log-read-ahead",
            daemon=True,
        )
        self._thread.start()

    def _run(self, connect: Callable[[], apsw.Connection], ranges: list[tuple[int, int]]) -> None:
        try:
            db: apsw.Connection | None = connect()
        except apsw.Error:
            db = None
        try:
            for lo, hi in ranges:
                text = None
                if db is not None:
                    try:
                        row = db.execute(_BATCH_SQL, (lo, hi)).fetchone()
                        text = row[0] if row else None
                    except apsw.Error:
                        text = None
                if not self._put((lo, hi, text)):
                    return
        finally:
            if db is not None:
                db.close()
            self._put(None)

    def _put(self, item: tuple[int, int, bytes | None] | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[int, int, bytes | None]]:
        while (item := self._queue.get()) is not None:
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
