"""The event log on real SQLite files: append, read, verify, refuse changes, survive SIGKILL."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from events.envelope import GENESIS_HASH, Recorded, seal
from events.export import row_from_export, row_to_export
from events.log import (
    INSERT_ROWS,
    ChainBroken,
    EventLog,
    LogConflict,
    LogError,
    verify_rows,
)
from events.types import AnyEvent, JobSpec, JobSubmitted, Settings, SettingsChanged, UserCreated

REPO = Path(__file__).resolve().parents[2]


def sample_events(count: int) -> list[AnyEvent]:
    events: list[AnyEvent] = []
    for i in range(count):
        if i % 3 == 0:
            events.append(UserCreated(user_id=i + 1, name=f"user{i}", level="researcher",
                                      team_id="alpha" if i % 2 else None))
        elif i % 3 == 1:
            events.append(JobSubmitted(
                job_id=f"job{i:04d}", user_id=1, team_id=None, priority=10,
                spec=JobSpec(config_name="train", command=("python", "train.py", str(i)),
                             env={"SEED": str(i)}, estimated_cost=1.5 * i),
                metadata={"run": {"name": f"r{i}", "tags": ["a", "b"]}},
            ))
        else:
            events.append(SettingsChanged(settings=Settings(max_concurrent=i + 1)))
    return events


def sealed(log: EventLog, events: list[AnyEvent], at: float = 1000.0) -> list[Recorded]:
    """Seal ``events`` to continue ``log``."""
    prev, seq = log.last_hash, log.last_seq
    batch = []
    for event in events:
        seq += 1
        recorded = seal(prev, seq, at + seq, f"user:{seq}", f"corr-{seq}", seq - 1 or None, event)
        prev = recorded.hash
        batch.append(recorded)
    return batch


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "events.db"


def filled_log(path: Path, count: int = 30) -> list[Recorded]:
    log = EventLog(path)
    written: list[Recorded] = []
    events = sample_events(count)
    for start in range(0, count, 7):  # several transactions of a few events
        batch = sealed(log, events[start:start + 7])
        log.append(batch)
        written.extend(batch)
    log.close()
    return written


def test_append_read_and_verify(log_path: Path) -> None:
    written = filled_log(log_path, 30)

    log = EventLog(log_path)
    assert (log.last_seq, log.last_hash) == (30, written[-1].hash)
    assert list(log.read()) == written
    assert list(log.read(after_seq=10, until_seq=12)) == written[10:12]
    assert log.verify() == 30

    # appending continues the chain; a batch that does not is refused, all of it
    more = sealed(log, sample_events(2))
    log.append(more)
    assert log.last_seq == 32
    with pytest.raises(LogConflict):
        log.append(sealed(log, sample_events(2))[1:])  # starts at 34, log ends at 32
    stale = sealed(log, sample_events(1))
    log.append(stale)
    log.last_seq, log.last_hash = 32, more[-1].hash  # pretend another writer got there first
    with pytest.raises(LogConflict):
        log.append(sealed(log, sample_events(1)))
    log.close()

    reopened = EventLog(log_path, readonly=True)
    assert reopened.verify() == 33
    assert list(reopened.read()) == written + more + stale
    reopened.close()


def test_a_batch_longer_than_one_insert_is_one_transaction(log_path: Path) -> None:
    log = EventLog(log_path)
    batch = sealed(log, sample_events(INSERT_ROWS + 5))  # two INSERT statements
    log.append(batch)
    assert list(log.read()) == batch and log.verify() == INSERT_ROWS + 5

    # a duplicate seq in the second statement: the first one's rows are not kept either
    more = sealed(log, sample_events(INSERT_ROWS + 2))
    clash = more[:-1] + [more[0]]
    with pytest.raises(LogConflict):
        log.append(clash)
    assert log.last_seq == INSERT_ROWS + 5
    log.close()
    reopened = EventLog(log_path, readonly=True)
    assert list(reopened.read()) == batch
    reopened.close()


def test_a_new_log_is_empty_and_verifies(log_path: Path) -> None:
    log = EventLog(log_path)
    assert (log.last_seq, log.last_hash, log.verify()) == (0, GENESIS_HASH, 0)
    log.append([])
    assert list(log.read()) == []


def test_export_lines_rebuild_the_stored_rows(log_path: Path) -> None:
    filled_log(log_path, 20)
    log = EventLog(log_path, readonly=True)
    rows = list(log.rows())
    exported = [row_to_export(row) for row in rows]
    assert [row_from_export(line) for line in exported] == rows
    assert verify_rows(row_from_export(line) for line in exported) == 20
    exported[4]["data"]["user_id"] = 999
    with pytest.raises(ChainBroken) as broken:
        verify_rows(row_from_export(line) for line in exported)
    assert broken.value.seq == 5


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE events SET actor = 'mallory' WHERE seq = 3",
        "UPDATE events SET data = x'00'",
        "DELETE FROM events WHERE seq = 30",
        "DELETE FROM events",
    ],
)
def test_update_or_delete_through_sql_fails(log_path: Path, sql: str) -> None:
    written = filled_log(log_path, 30)

    other = sqlite3.connect(log_path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"), other:
        other.execute(sql)
    other.close()

    log = EventLog(log_path)
    with pytest.raises(LogError, match="append-only"):
        log.execute_raw(sql)
    assert list(log.read()) == written
    assert log.verify() == 30
    log.close()


def tampered_copy(source: Path, dest: Path, sql: str, *args: object) -> Path:
    """A copy of the log where ``sql`` ran with the guarding triggers dropped."""
    log = EventLog(source)
    log.backup_to(dest)
    log.close()
    db = sqlite3.connect(dest)
    with db:
        db.execute("DROP TRIGGER events_no_update")
        db.execute("DROP TRIGGER events_no_delete")
        db.execute(sql, args)
    db.close()
    return dest


@pytest.mark.parametrize("seq", [1, 17, 30])
@pytest.mark.parametrize("column", ["data", "hash"])
def test_one_flipped_byte_is_found_with_its_seq(
    log_path: Path, tmp_path: Path, seq: int, column: str
) -> None:
    written = filled_log(log_path, 30)
    stored = bytearray(written[seq - 1].data if column == "data" else written[seq - 1].hash)
    stored[len(stored) // 2] ^= 0x01
    copy = tampered_copy(log_path, tmp_path / "copy.db",
                         f"UPDATE events SET {column} = ? WHERE seq = ?", bytes(stored), seq)

    with pytest.raises(ChainBroken) as broken:
        EventLog(copy, readonly=True).verify()
    assert broken.value.seq == seq
    assert EventLog(log_path, readonly=True).verify() == 30  # the original is untouched


def test_a_changed_envelope_field_is_found(log_path: Path, tmp_path: Path) -> None:
    filled_log(log_path, 30)
    copy = tampered_copy(log_path, tmp_path / "copy.db",
                         "UPDATE events SET at = at + 1 WHERE seq = ?", 12)
    with pytest.raises(ChainBroken) as broken:
        EventLog(copy, readonly=True).verify()
    assert broken.value.seq == 12


def test_a_deleted_event_is_found(log_path: Path, tmp_path: Path) -> None:
    filled_log(log_path, 30)
    copy = tampered_copy(log_path, tmp_path / "copy.db", "DELETE FROM events WHERE seq = ?", 9)
    with pytest.raises(ChainBroken) as broken:
        EventLog(copy, readonly=True).verify()
    assert broken.value.seq == 9


def test_an_unreadable_file_is_a_log_error(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LogError):
        EventLog(path)


WRITER = textwrap.dedent(
    """
    import random, sys
    from events.envelope import seal
    from events.log import EventLog
    from events.types import UserCreated

    log = EventLog(sys.argv[1])
    rng = random.Random(int(sys.argv[2]))
    print("ready", flush=True)
    while True:
        prev, seq, batch = log.last_hash, log.last_seq, []
        for _ in range(rng.randint(1, 8)):
            seq += 1
            event = UserCreated(user_id=seq, name="u" * rng.randint(1, 2000), level="viewer")
            record = seal(prev, seq, float(seq), "writer", None, None, event)
            prev = record.hash
            batch.append(record)
        log.append(batch)
        print(batch[-1].seq, flush=True)  # acknowledged: the append returned
    """
)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_writer_killed_mid_stream_loses_no_acknowledged_event(
    tmp_path: Path, seed: int
) -> None:
    path = tmp_path / "events.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    acknowledged: list[int] = []
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready", writer.stderr
        while len(acknowledged) < 40 + 20 * seed:
            line = writer.stdout.readline()
            assert line, f"the writer stopped: {writer.stderr.read() if writer.stderr else ''}"
            acknowledged.append(int(line))
        writer.send_signal(signal.SIGKILL)
        rest, _ = writer.communicate(timeout=30)
        acknowledged.extend(int(line) for line in rest.split())  # printed before the kill
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert acknowledged == sorted(acknowledged)

    log = EventLog(path)  # the first open after the crash recovers the WAL
    count = log.verify()
    assert count >= acknowledged[-1]
    present = {row[0] for row in log.rows()}
    assert set(acknowledged) <= present
    assert present == set(range(1, count + 1))
    # and the recovered log takes appends again
    log.append(sealed(log, sample_events(2)))
    assert log.verify() == count + 2
    log.close()


def test_an_append_is_acknowledged_only_once_it_is_on_disk(log_path: Path) -> None:
    """A SIGKILL leaves the OS page cache behind, so the test above passes even without
    fsync; what makes an acknowledged append survive a power cut is these two settings
    (WAL with synchronous=FULL syncs the WAL at every commit). A pragma is per
    connection, so it is read on the log's own."""
    log = EventLog(log_path)
    try:
        connection = log._db  # noqa: SLF001 - the writer's settings, nowhere else to read
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        log.close()


def test_a_copy_taken_while_in_use_verifies(log_path: Path, tmp_path: Path) -> None:
    written = filled_log(log_path, 25)
    log = EventLog(log_path)
    log.backup_to(tmp_path / "backup.db")
    copy = EventLog(tmp_path / "backup.db", readonly=True)
    assert copy.verify() == 25 and list(copy.read()) == written
    shutil.copy(tmp_path / "backup.db", tmp_path / "backup2.db")
    assert EventLog(tmp_path / "backup2.db", readonly=True).verify() == 25


def test_an_sqlite_file_of_something_else_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE invoices(id INTEGER PRIMARY KEY, total REAL)")
    other.commit()
    other.close()
    before = path.read_bytes()
    with pytest.raises(LogError, match=r"is an SQLite database but not a gpuyard event log "
                                       r"\(it holds the tables invoices\)"):
        EventLog(path)
    assert path.read_bytes() == before  # no events table, no WAL switch
    EventLog(tmp_path / "fresh.db").close()  # an empty file or none is a new log
