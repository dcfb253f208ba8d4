"""Audit: a real log written by the engine, exported, verified, and tampered with."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import apsw
import pytest
import httpx
from cli_runner import gpuyard, one_error_line
from serverproc import ServerProcess
from recorded_day import record_busy_day

from events.codec import encode_event
from events.envelope import seal
from events.log import EventLog
from events.types import JobCompleted, JobSpec, JobSubmitted
from service.audit import (
    AuditError,
    ChainBroken,
    backup_log,
    source_rows,
    verify_file,
    verify_partial,
    write_export,
)


@pytest.fixture(scope="module")
def day_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_busy_day(tmp_path_factory.mktemp("audit") / "events.db", jobs=20)


def _export(db: Path, dest: Path, fmt: str = "jsonl") -> Path:
    with open(dest, "wb") as out:
        write_export(source_rows(db), out, fmt)
    return dest


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_lines(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _submitted_seq(lines: list[dict]) -> int:
    return next(line["seq"] for line in lines if line["type"] == "job.submitted")


def test_a_log_the_engine_wrote_verifies(day_db: Path) -> None:
    log = EventLog(day_db, readonly=True)
    last = log.last_seq
    log.close()
    result = verify_file(day_db)
    assert result.count == last > 50
    assert (result.first_seq, result.last_seq) == (1, last)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_export_verifies_to_the_same_head_hash(day_db: Path, tmp_path: Path, fmt: str) -> None:
    export = _export(day_db, tmp_path / f"audit.{fmt}", fmt)
    assert verify_file(export) == verify_file(day_db)


def test_changing_one_events_data_names_that_seq(day_db: Path, tmp_path: Path) -> None:
    lines = _lines(_export(day_db, tmp_path / "audit.jsonl"))
    seq = _submitted_seq(lines[10:])
    lines[seq - 1]["data"]["metadata"]["run_name"] = "not what was submitted"
    tampered = _write_lines(tmp_path / "tampered.jsonl", lines)
    with pytest.raises(ChainBroken) as broken:
        verify_file(tampered)
    assert broken.value.seq == seq


def test_a_changed_csv_cell_names_that_seq(day_db: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(_export(day_db, tmp_path / "a.csv", "csv").read_text())))
    target = rows[20]
    target["actor"] = "user:1:root"  # blame someone else
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (tmp_path / "b.csv").write_text(out.getvalue())
    with pytest.raises(ChainBroken) as broken:
        verify_file(tmp_path / "b.csv")
    assert broken.value.seq == int(target["seq"])


def test_a_deleted_line_names_the_missing_seq(day_db: Path, tmp_path: Path) -> None:
    lines = _lines(_export(day_db, tmp_path / "audit.jsonl"))
    del lines[30]
    with pytest.raises(ChainBroken) as broken:
        verify_file(_write_lines(tmp_path / "short.jsonl", lines))
    assert broken.value.seq == 31
    assert "missing" in str(broken.value)


def test_an_edit_behind_the_triggers_back_is_found_in_the_database(
    day_db: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "events.db"
    backup_log(day_db, copy)
    db = apsw.Connection(str(copy))  # an attacker with the file: drop the guard, edit a row
    db.execute("DROP TRIGGER events_no_update")
    db.execute("UPDATE events SET at = at + 3600 WHERE seq = 42")
    db.close()
    with pytest.raises(ChainBroken) as broken:
        verify_file(copy)
    assert broken.value.seq == 42


def test_a_filtered_export_checks_the_links_it_holds(day_db: Path, tmp_path: Path) -> None:
    lines = _lines(_export(day_db, tmp_path / "audit.jsonl"))
    later = _write_lines(tmp_path / "later.jsonl", lines[40:])
    result = verify_partial(later)
    assert (result.count, result.trusted) == (len(lines) - 40, 1)
    with pytest.raises(ChainBroken):
        verify_file(later)  # as a whole chain it lacks its start
    line = one_error_line(gpuyard("audit", "verify", str(later)))
    assert "seq 1 is missing" in line and "--partial" in line  # the way to check it
    assert gpuyard("audit", "verify", "--partial", str(later)).returncode == 0
    lines[50]["data"]["job_id"] = "job999"
    with pytest.raises(ChainBroken) as broken:
        verify_partial(_write_lines(tmp_path / "bad.jsonl", lines[40:]))
    assert broken.value.seq == 51


# one-byte (or few-byte) edits that leave line 4 (seq 4) unreadable as an export line
UNREADABLE_EDITS = [
    pytest.param(lambda line: line[:-2], "JSON is malformed", id="cut-short"),
    pytest.param(lambda line: line.replace('"at":', '"at" ', 1), "JSON is malformed",
                 id="colon-lost"),
    pytest.param(lambda line: line.replace('"data":', '"dat4":', 1), "lacks 'data'",
                 id="key-renamed"),
    pytest.param(lambda line: line.replace('"hash":"', '"hash":"q', 1), "not hexadecimal",
                 id="hash-not-hex"),
    pytest.param(lambda line: line[:line.index('"hash":')] + '"hash":null}', "lacks 'hash'",
                 id="hash-null"),
    pytest.param(lambda line: line.replace('"at":', '"at":"soon","x":', 1), "'soon'",
                 id="at-not-a-number"),
]


def _edit_line(export: Path, dest: Path, index: int, edit: object) -> Path:
    text = export.read_text().splitlines()
    text[index] = edit(text[index])  # type: ignore[operator]
    dest.write_text("\n".join(text) + "\n")
    return dest


@pytest.mark.parametrize(("edit", "why"), UNREADABLE_EDITS)
def test_an_unreadable_line_is_named_by_its_line_and_seq(
    tmp_path: Path, day_db: Path, edit: object, why: str
) -> None:
    """SPEC section 10: verify names the first bad seq, also when the damage leaves the
    line unreadable rather than merely mis-hashed."""
    broken = _edit_line(_export(day_db, tmp_path / "audit.jsonl"), tmp_path / "b.jsonl", 3, edit)
    with pytest.raises(ChainBroken) as whole:
        verify_file(broken)
    assert whole.value.seq == 4
    assert "line 4 cannot be read back" in str(whole.value) and why in str(whole.value)
    line = one_error_line(gpuyard("audit", "verify", str(broken)))
    assert "the first bad event is seq 4" in line and why in line


@pytest.mark.parametrize(("edit", "why"), UNREADABLE_EDITS)
def test_a_filtered_export_names_an_unreadable_line_by_the_seq_it_holds(
    tmp_path: Path, day_db: Path, edit: object, why: str
) -> None:
    """A filtered export has gaps, so the seq is the one the line itself still names."""
    lines = _export(day_db, tmp_path / "audit.jsonl").read_text().splitlines()
    later = tmp_path / "later.jsonl"
    later.write_text("\n".join(lines[20:]) + "\n")  # seq 21 on; line 4 holds seq 24
    broken = _edit_line(later, tmp_path / "b.jsonl", 3, edit)
    with pytest.raises(ChainBroken) as partial:
        verify_partial(broken)
    assert partial.value.seq == 24 and why in str(partial.value)


def test_a_line_whose_seq_cannot_be_read_is_placed_after_the_last_good_one(
    tmp_path: Path, day_db: Path
) -> None:
    lines = _export(day_db, tmp_path / "audit.jsonl").read_text().splitlines()
    later = tmp_path / "later.jsonl"
    later.write_text("\n".join(lines[20:]) + "\n")
    broken = _edit_line(later, tmp_path / "b.jsonl", 3, lambda line: "{" + line[20:])
    with pytest.raises(AuditError, match=r"line 4: .*\(the line after seq 23\)"):
        verify_partial(broken)
    with pytest.raises(ChainBroken) as whole:  # as a whole chain it lacks seq 1 first
        verify_file(broken)
    assert whole.value.seq == 1


def test_a_seq_inside_data_is_not_taken_for_the_lines_own(tmp_path: Path, day_db: Path) -> None:
    lines = _export(day_db, tmp_path / "audit.jsonl").read_text().splitlines()
    later = tmp_path / "later.jsonl"
    later.write_text("\n".join(lines[20:]) + "\n")
    # line 4 (seq 24) loses its own seq; its data still holds a "seq" of 1
    broken = _edit_line(later, tmp_path / "b.jsonl", 3, lambda line: '{"seq" 24, "data": '
                        '{"seq": 1}' + line[line.index(","):])
    with pytest.raises(AuditError, match=r"\(the line after seq 23\)"):
        verify_partial(broken)


@pytest.mark.parametrize(("cells", "why"), [
    (lambda row: ["³", *row[1:]], "'³'"),  # a digit to str.isdigit, not to int()
    (lambda row: row[:5], "lacks 'data', 'hash'"),  # a short row: its cells are missing
])
def test_odd_csv_cells_are_named_in_words(tmp_path: Path, day_db: Path, cells: object,
                                          why: str) -> None:
    export = _export(day_db, tmp_path / "audit.csv", "csv")
    rows = list(csv.reader(io.StringIO(export.read_text())))
    rows[5] = cells(rows[5])  # type: ignore[operator]
    broken = tmp_path / "b.csv"
    with open(broken, "w", newline="") as out:
        csv.writer(out).writerows(rows)
    line = one_error_line(gpuyard("audit", "verify", str(broken)))
    assert "the first bad event is seq 5" in line and why in line
    assert "unexpected" not in line


def test_a_database_that_lacks_its_first_event_is_not_sent_to_partial(
    day_db: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "events.db"
    backup_log(day_db, copy)
    db = apsw.Connection(str(copy))
    db.execute("DROP TRIGGER events_no_delete")
    db.execute("DELETE FROM events WHERE seq = 1")
    db.close()
    for args in (["--db", str(copy)], [str(copy)]):
        line = one_error_line(gpuyard("audit", "verify", *args))
        assert "seq 1 is missing" in line and "--partial" not in line


def test_a_csv_line_that_cannot_be_read_is_named_by_its_seq(
    tmp_path: Path, day_db: Path
) -> None:
    export = _export(day_db, tmp_path / "audit.csv", "csv")
    rows = list(csv.reader(io.StringIO(export.read_text())))
    rows[5][7] = "zz" + rows[5][7][2:]  # seq 5's hash (the header is row 0)
    broken = tmp_path / "b.csv"
    with open(broken, "w", newline="") as out:
        csv.writer(out).writerows(rows)
    with pytest.raises(ChainBroken) as whole:
        verify_file(broken)
    assert whole.value.seq == 5 and "not hexadecimal" in str(whole.value)
    with pytest.raises(ChainBroken) as partial:
        verify_partial(broken)
    assert partial.value.seq == 5


# ---------------------------------------------------------------- the CLI


def test_cli_verify_says_ok_for_a_database_and_an_export(day_db: Path, tmp_path: Path) -> None:
    export = _export(day_db, tmp_path / "audit.jsonl")
    for args in (["--db", str(day_db)], [str(export)]):
        result = gpuyard("audit", "verify", *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok: ")
        assert verify_file(day_db).head_hash in result.stdout


def test_cli_verify_fails_with_one_line_naming_the_seq(day_db: Path, tmp_path: Path) -> None:
    lines = _lines(_export(day_db, tmp_path / "audit.jsonl"))
    seq = _submitted_seq(lines[5:])
    lines[seq - 1]["data"]["priority"] = 30
    tampered = _write_lines(tmp_path / "tampered.jsonl", lines)
    line = one_error_line(gpuyard("audit", "verify", str(tampered)))
    assert f"seq {seq}" in line


def test_a_row_rewritten_as_text_is_named_not_a_traceback(day_db: Path, tmp_path: Path) -> None:
    """SQLite keeps the type an UPDATE writes: replace() turns a row's data into TEXT."""
    copy = tmp_path / "events.db"
    backup_log(day_db, copy)
    db = apsw.Connection(str(copy))
    db.execute("DROP TRIGGER events_no_update")
    db.execute("UPDATE events SET data = replace(data, 'job', 'jab') WHERE seq = 6")
    assert db.execute("SELECT typeof(data) FROM events WHERE seq = 6").fetchone() == ("text",)
    db.close()
    for command in (["audit", "verify", "--db", str(copy)], ["replay", "--db", str(copy)],
                    ["replay", "--db", str(copy), "--no-verify", "--what-if",
                     "max_concurrent=9"]):
        line = one_error_line(gpuyard(*command))
        assert "seq 6" in line and "unexpected" not in line, command


def test_cli_export_from_a_database_file_then_verify(day_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "offline.csv"
    result = gpuyard("audit", "export", "--db", str(day_db), "--format", "csv", "-o", str(out))
    assert result.returncode == 0, result.stderr
    source = verify_file(day_db)
    assert result.stderr.strip() == f"exported {source.count} events to {out}"
    # the whole chain: as many events, the same first and last seq, the same head hash
    assert verify_file(out) == source
    verified = gpuyard("audit", "verify", str(out))
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(
        f"ok: {source.count} events, seq 1..{source.last_seq}, hash chain intact")
    assert verified.stdout.strip().endswith(f"head hash {source.head_hash}")


@pytest.mark.parametrize(
    "args",
    [
        ["audit", "verify"],  # neither a file nor --db
        ["audit", "verify", "/nonexistent/audit.jsonl"],
        ["audit", "verify", "--db", "/nonexistent/events.db"],
        ["audit", "verify", "pyproject.toml"],  # not an export
        ["audit", "export", "--db", "/nonexistent/events.db"],
    ],
)
def test_cli_audit_errors_are_one_line(args: list[str]) -> None:
    one_error_line(gpuyard(*args))


FIXTURE_LOGS = sorted((Path(__file__).resolve().parents[2] / "fixtures").glob("*.jsonl"))


@pytest.mark.parametrize("log", FIXTURE_LOGS, ids=[p.name for p in FIXTURE_LOGS])
def test_every_recorded_fixture_verifies_and_a_changed_copy_does_not(
    log: Path, tmp_path: Path
) -> None:
    whole = verify_file(log)
    assert whole.first_seq == 1 and whole.count == whole.last_seq
    as_csv = _export(log, tmp_path / "copy.csv", "csv")  # the same rows, the other format
    assert verify_file(as_csv) == whole
    lines = _lines(log)
    middle = lines[len(lines) // 2]
    middle["at"] += 0.001
    with pytest.raises(ChainBroken) as broken:
        verify_file(_write_lines(tmp_path / "changed.jsonl", lines))
    assert broken.value.seq == middle["seq"]


def test_an_export_over_http_that_meets_a_damaged_row_breaks_off(tmp_path: Path) -> None:
    """A row the export cannot write must end the stream with an error: Litestar took a
    ValueError for the end of the stream, so a CSV export ended 200, header only, and
    the CLI said 'exported 0 events'."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    log = EventLog(data_dir / "events.db")
    data = encode_event(JobSubmitted(
        job_id="j1", user_id=0, priority=30,
        spec=JobSpec(config_name="c", command=("true",), num_processes=0)))
    log.execute_raw("INSERT INTO events VALUES (1, 'abc', 'job.submitted', 'x', NULL, NULL, "
                    f"X'{data.hex()}', X'00')")  # `at` is not a number
    log.close()
    with ServerProcess(data_dir, gpus="none") as server:
        with httpx.stream("GET", server.url + "/api/audit/export", params={"format": "csv"},
                          timeout=30.0) as response:
            assert response.status_code == 200  # the head was sent before the bad row
            with pytest.raises(httpx.RemoteProtocolError):
                response.read()
        result = gpuyard("--server", server.url, "audit", "export", "--format", "csv",
                         "-o", str(tmp_path / "out.csv"))
    assert result.returncode != 0
    line = one_error_line(result)
    assert "broke off" in line or "incomplete" in line, line


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(
    tmp_path: Path, fmt: str
) -> None:
    day_db = tmp_path / "events.db"  # about 200 KiB of export
    log = EventLog(day_db)
    records: list = []
    for n in range(1, 1501):
        records.append(seal(records[-1].hash if records else log.last_hash, n, float(n), "x",
                            None, None, JobCompleted(job_id=f"job-{n:06d}")))
    log.append(records)
    log.close()
    full = one_error_line(gpuyard("audit", "export", "--db", str(day_db), "--format", fmt,
                                  "-o", "/dev/full"))
    assert full == "gpuyard: error: cannot write /dev/full: No space left on device"
    dest = tmp_path / "out" / f"export.{fmt}"
    dest.parent.mkdir()
    too_big = gpuyard("audit", "export", "--db", str(day_db), "--format", fmt, "-o",
                      str(dest), file_size_limit=64 * 1024)
    assert one_error_line(too_big) == f"gpuyard: error: cannot write {dest}: File too large"
    assert list(dest.parent.iterdir()) == []
