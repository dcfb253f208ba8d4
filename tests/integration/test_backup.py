"""Backup while the server takes a stream of submits; the copy opens, verifies, replays, and
restores into a server that serves exactly what the copy holds."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
from cli_runner import gpuyard, one_error_line
from serverproc import ServerProcess

from events.envelope import seal
from events.log import EventLog
from events.types import JobSpec, JobSubmitted
from service.audit import read_records, source_rows, verify_file
from service.replay import check, replay_until

SUBMITTERS = 3
MAX_SUBMITS = 2000  # a bound, should the backup never return


def _submit_stream(url: str, stop: threading.Event, done: list[str],
                   errors: list[BaseException]) -> None:
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set() and len(done) < MAX_SUBMITS:
                answer = client.post("/api/queue/submit", json={"config_name": "wait"})
                answer.raise_for_status()
                done.append(answer.json()["job_id"])
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)


def _until(predicate, errors: list[BaseException]) -> None:  # type: ignore[no-untyped-def]
    while not predicate() and not errors:
        threading.Event().wait(0.02)


def test_a_backup_taken_under_load_verifies_replays_and_restores(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "configs").mkdir(parents=True)
    # CPU-only jobs that wait: one runs (local_job_max_concurrent is 1), the rest queue
    (data / "configs" / "wait.toml").write_text('command = ["sleep", "60"]\nnum_processes = 0\n')
    copy = tmp_path / "backup" / "events.db"
    copy.parent.mkdir()
    with ServerProcess(data, gpus="2") as server:
        submitted: list[str] = []
        errors: list[BaseException] = []
        stop = threading.Event()
        threads = [threading.Thread(target=_submit_stream,
                                    args=(server.url, stop, submitted, errors))
                   for _ in range(SUBMITTERS)]
        for thread in threads:
            thread.start()
        _until(lambda: len(submitted) >= 10, errors)  # the stream is under way
        taken = gpuyard("backup", "--data-dir", str(data), str(copy))
        after = len(submitted)
        _until(lambda: len(submitted) >= after + 10, errors)  # and goes on after the copy
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert taken.returncode == 0, taken.stderr
        assert "hash chain verified" in taken.stdout
        assert "exists" in one_error_line(gpuyard("backup", "--data-dir", str(data), str(copy)))

        # the copy is a prefix of the live log: same events, same hashes, up to its end
        backed = verify_file(copy)
        live = EventLog(data / "events.db", readonly=True)
        live_rows = {row[0]: row for row in live.rows(until_seq=backed.last_seq)}
        assert live.last_seq > backed.last_seq
        live.close()
        assert live_rows[backed.last_seq][7].hex() == backed.head_hash

        # it replays, and the scheduler agrees with every decision in it
        assert gpuyard("audit", "verify", "--db", str(copy)).returncode == 0
        replayed = gpuyard("replay", "--db", str(copy), "--check")
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        report = check(read_records(source_rows(copy)))
        assert report.differences == [] and report.dispatches >= 1
        state = replay_until(read_records(source_rows(copy))).state
        in_copy = set(state.jobs)
        assert in_copy and in_copy < set(submitted)

    # restore: the copy becomes the log of a fresh data directory
    restored = tmp_path / "restored"
    (restored / "configs").mkdir(parents=True)
    shutil.copy(data / "configs" / "wait.toml", restored / "configs")
    shutil.copy(copy, restored / "events.db")
    with ServerProcess(restored, gpus="2") as server:
        # every job of the copy, and no other (a fast machine puts more than a page of
        # 500 in it, and the restored server may start one while pages are read)
        by_status = httpx.get(server.url + "/api/queue/stats").json()["by_status"]
        assert sum(by_status.values()) == len(in_copy)
        with httpx.Client(base_url=server.url) as client:
            for job_id in in_copy:
                assert client.get(f"/api/queue/{job_id}").status_code == 200, job_id
        export = tmp_path / "restored.jsonl"
        exported = gpuyard("--server", server.url, "audit", "export", "-o", str(export))
        assert exported.returncode == 0, exported.stderr
        assert verify_file(export).count >= backed.count


def test_a_backup_that_fails_for_space_leaves_nothing_and_the_old_copy_as_it_was(
    tmp_path: Path,
) -> None:
    """RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG, as a full disk would:
    the backup fails in one line, writes nothing, and `--force` keeps the earlier copy."""
    source = tmp_path / "events.db"
    log = EventLog(source)
    spec = JobSpec(config_name="c", command=("true",), num_processes=0)
    records = []
    for n in range(1, 2001):
        records.append(seal(records[-1].hash if records else log.last_hash, n, float(n), "x",
                            None, None, JobSubmitted(job_id=f"j{n}", user_id=0, spec=spec,
                                                     priority=30)))
    log.append(records)
    log.close()
    dest = tmp_path / "out" / "backup.db"
    dest.parent.mkdir()
    dest.write_bytes(b"the earlier backup")

    failed = gpuyard("backup", "--db", str(source), "--force", str(dest),
                     file_size_limit=64 * 1024)
    assert failed.returncode != 0
    line = one_error_line(failed)
    assert line == (f"gpuyard: error: backup to {dest} failed: a write failed (is the disk "
                    "full, or the file larger than allowed?)")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["backup.db"]
    assert dest.read_bytes() == b"the earlier backup"
    taken = gpuyard("backup", "--db", str(source), "--force", str(dest))
    assert taken.returncode == 0, taken.stderr
    assert sorted(p.name for p in dest.parent.iterdir()) == ["backup.db"]
    assert verify_file(dest).count == 2000


def test_a_backup_through_a_symlink_replaces_the_file_it_names(tmp_path: Path) -> None:
    """`latest.db -> monday.db`: --force writes monday.db and keeps the link."""
    source = tmp_path / "events.db"
    log = EventLog(source)
    log.append([seal(log.last_hash, 1, 1.0, "x", None, None, JobSubmitted(
        job_id="j1", user_id=0, priority=30,
        spec=JobSpec(config_name="c", command=("true",), num_processes=0)))])
    log.close()
    (tmp_path / "monday.db").write_bytes(b"old")
    link = tmp_path / "latest.db"
    link.symlink_to("monday.db")
    taken = gpuyard("backup", "--db", str(source), "--force", str(link))
    assert taken.returncode == 0, taken.stderr
    assert link.is_symlink() and os.readlink(link) == "monday.db"
    assert verify_file(tmp_path / "monday.db").count == 1
