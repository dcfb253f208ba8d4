"""``EventLog.batches``: the replay's fast path reads what ``read`` reads, or falls back to it."""

from __future__ import annotations

import threading
from pathlib import Path

import apsw
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import events.log
from events import codec
from events.envelope import Recorded, seal
from events.log import EventLog
from events.types import AnyEvent, JobCompleted, JobStarted
from tests.integration.test_log import filled_log, sealed


def triples(records: list[Recorded]) -> list[tuple[int, float, AnyEvent]]:
    return [(r.seq, r.at, r.event) for r in records]


def flat(
    log: EventLog, after: int = 0, until: int | None = None
) -> list[tuple[int, float, AnyEvent]]:
    return [item for batch in log.batches(after, until) for item in batch]


def fast_only(
    log: EventLog, after: int = 0, until: int | None = None
) -> list[tuple[int, float, AnyEvent]]:
    """:func:`flat`, failing if any batch is read again row by row."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EventLog, "read", lambda *a: pytest.fail("batches() fell back to read()"))
        return flat(log, after, until)


@pytest.mark.parametrize("readonly", [False, True])
def test_batches_read_what_read_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readonly: bool
) -> None:
    monkeypatch.setattr(events.log, "BATCH_EVENTS", 7)  # several batches, one partial
    path = tmp_path / "events.db"
    written = filled_log(path, 30)
    log = EventLog(path, readonly=readonly)
    expected = triples(list(log.read()))
    assert expected == triples(written)
    assert [len(batch) for batch in log.batches()] == [7, 7, 7, 7, 2]
    assert fast_only(log) == expected
    assert fast_only(log, 10, 12) == expected[10:12]
    assert fast_only(log, 30) == []
    assert fast_only(EventLog(tmp_path / "empty.db")) == []


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(times=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=20))
@example(times=[-0.0, 0.0, 5e-324, -1.5])
def test_every_time_comes_back_exactly(
    tmp_path_factory: pytest.TempPathFactory, times: list[float]
) -> None:
    """SQLite writes ``at`` as text in the fast path: 17 digits must round-trip any double."""
    log = EventLog(tmp_path_factory.mktemp("times") / "events.db")
    prev, records = log.last_hash, []
    for seq, at in enumerate(times, start=1):
        records.append(seal(prev, seq, at, "system", None, None, JobCompleted(job_id=f"j{seq}")))
        prev = records[-1].hash
    log.append(records)
    got = fast_only(log)
    assert [at for _, at, _ in got] == times
    assert [repr(at) for _, at, _ in got] == [repr(r.at) for r in records]  # -0.0 as 0.0
    assert got == triples(records)
    assert log.verify() == len(times)  # the hash covers the time as stored


def test_a_row_that_does_not_decode_as_its_type_is_read_again(tmp_path: Path) -> None:
    """Bytes stored under another type's tag: the batch falls back, and `read` decides."""
    path = tmp_path / "events.db"
    filled_log(path, 10)
    log = EventLog(path)
    mismatched = sealed(log, [JobCompleted(job_id="x")])[0]
    log.execute_raw(
        "INSERT INTO events VALUES (11, 1011.0, 'job.started', 'system', NULL, NULL, "
        f"x'{mismatched.data.hex()}', x'{mismatched.hash.hex()}')"
    )
    log.refresh()
    got = flat(log)
    assert got == triples(list(log.read()))
    assert isinstance(got[-1][2], JobCompleted)  # the union read the bytes for what they are


def test_with_an_upcaster_every_row_goes_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.db"
    log = EventLog(path)
    log.append(sealed(log, [JobStarted(job_id="a", pid=1, process_start_time=2)]))
    monkeypatch.setitem(
        codec.UPCASTERS, "job.started", lambda raw: {**raw, "pid": raw["pid"] + 100}
    )
    assert flat(log) == [(1, 1001.0, JobStarted(job_id="a", pid=101, process_start_time=2))]


def test_leaving_half_way_stops_the_read_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events.log, "BATCH_EVENTS", 2)
    path = tmp_path / "events.db"
    filled_log(path, 30)
    log = EventLog(path)
    before = threading.active_count()
    batches = log.batches()
    assert len(next(batches)) == 2
    assert threading.active_count() == before + 1
    batches.close()
    assert threading.active_count() == before


def test_batches_the_thread_cannot_build_are_read_row_by_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too long for the read-ahead's limit, or no reader connection: same events."""
    monkeypatch.setattr(events.log, "BATCH_EVENTS", 7)
    path = tmp_path / "events.db"
    written = filled_log(path, 30)
    log = EventLog(path)
    reads: list[tuple[int, int | None]] = []
    real_read = EventLog.read

    def counted_read(self: EventLog, after_seq: int = 0, until_seq: int | None = None):  # type: ignore[no-untyped-def]
        reads.append((after_seq, until_seq))
        return real_read(self, after_seq, until_seq)

    monkeypatch.setattr(EventLog, "read", counted_read)
    monkeypatch.setattr(events.log, "BATCH_MAX_BYTES", 1000)  # a 7-event batch is longer
    assert flat(log) == triples(written)
    assert reads == [(0, 7), (7, 14), (14, 21), (21, 28)]  # the last two events fit

    def no_connection(self: EventLog) -> None:
        raise apsw.CantOpenError("cannot open")

    reads.clear()
    monkeypatch.setattr(events.log, "BATCH_MAX_BYTES", 64 << 20)
    monkeypatch.setattr(EventLog, "_connect_reader", no_connection)
    assert flat(log) == triples(written)
    assert len(reads) == 5
