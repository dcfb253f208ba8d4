"""SPEC section 1 as a client or an operator meets it: where ``gpuyard serve`` keeps its
data (``--data-dir``, else ``GPUYARD_DATA_DIR``, else ``~/.gpuyard``), the start-up line
the seed's troubleshooting looks for, and one stderr line for a log it cannot replay.
Real ``gpuyard serve`` processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serverproc import REPO_ROOT, ServerProcess, free_port

from events.envelope import seal
from events.log import EventLog
from events.types import JobDispatched, JobSpec, JobSubmitted

pytestmark = pytest.mark.slow

STARTED = "Queue scheduler started with 5s processing interval"


def serve_once(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``gpuyard serve --port 0 ARGS...`` run to its end (these tests expect it to refuse)."""
    return subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", "serve", "--port", "0",
         *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
        env=env,
    )


class ServeWithoutDataDir(ServerProcess):
    """``gpuyard serve`` given no ``--data-dir``; its own log goes to ``log_dir``."""

    def argv(self) -> list[str]:
        argv = super().argv()
        at = argv.index("--data-dir")
        return argv[:at] + argv[at + 2:]


def serve_without_data_dir(log_dir: Path, env: dict[str, str]) -> None:
    """Start a server with ``env`` and no ``--data-dir``, check it answers, stop it."""
    server = ServeWithoutDataDir(log_dir, gpus="2xA100:40", env=env)
    server.start()
    try:
        stats = httpx.get(server.url + "/api/queue/stats", timeout=30.0).json()
        assert stats["local"]["total_gpus"] == 2
    finally:
        server.stop(kill_jobs=True)
    assert STARTED in server.log_path.read_text()


def test_gpuyard_data_dir_is_used_when_no_flag_is_given(tmp_path: Path) -> None:
    chosen = tmp_path / "from-env"
    serve_without_data_dir(tmp_path / "logs", {"GPUYARD_DATA_DIR": str(chosen),
                                        "HOME": str(tmp_path / "home")})
    assert (chosen / "events.db").is_file()
    assert (chosen / "configs").is_dir() and (chosen / "runs").is_dir()
    assert not (tmp_path / "home" / ".gpuyard").exists()


def test_the_default_data_dir_is_dot_gpuyard_in_home(tmp_path: Path) -> None:
    serve_without_data_dir(tmp_path / "logs",
                           {"GPUYARD_DATA_DIR": "", "HOME": str(tmp_path / "home")})
    assert (tmp_path / "home" / ".gpuyard" / "events.db").is_file()


def test_the_flag_wins_over_gpuyard_data_dir(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "flag", gpus="none",
                           env={"GPUYARD_DATA_DIR": str(tmp_path / "from-env")})
    server.start()
    server.stop(kill_jobs=True)
    assert (tmp_path / "flag" / "events.db").is_file()
    assert not (tmp_path / "from-env").exists()
    assert STARTED in server.log_path.read_text()


def test_a_relative_data_dir_runs_jobs(tmp_path: Path) -> None:
    """``make run`` passes ``--data-dir data``: jobs run in their own directories, so the
    server must not hand them paths relative to where it was started."""
    (tmp_path / "data" / "configs").mkdir(parents=True)
    (tmp_path / "data" / "configs" / "hello.toml").write_text(
        'command = ["sh", "-c", "echo hello from $PWD"]\nnum_processes = 0\n')
    server = ServerProcess(Path("data"), gpus="none", cwd=tmp_path)
    server.start()
    try:
        submitted = httpx.post(server.url + "/api/queue/submit",
                               json={"config_name": "hello"}, timeout=30.0)
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["job_id"]
        deadline = time.monotonic() + 30
        while (entry := httpx.get(f"{server.url}/api/queue/{job_id}", timeout=30.0).json())[
                "status"] in ("pending", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
        logs = httpx.get(f"{server.url}/api/queue/{job_id}/logs", timeout=30.0).text
    finally:
        server.stop(kill_jobs=True)
    assert (entry["status"], entry["exit_code"], entry["attempt"]) == ("completed", 0, 1), entry
    assert f"hello from {tmp_path / 'data' / 'runs' / job_id}" in logs


def test_a_log_event_that_cannot_be_read_is_one_line_not_blamed_on_gpus(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.db")  # seq 1 claims to be job.approved, holds {}
    log.execute_raw("INSERT INTO events VALUES (1, 1.0, 'job.approved', 'x', NULL, NULL, "
                    "X'7B7D', X'00')")
    log.close()
    done = serve_once("--data-dir", str(tmp_path), "--gpus", "none")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "cannot replay the event log" in lines[0] and "--gpus" not in lines[0]


def test_an_empty_data_dir_is_refused_not_taken_for_the_default(tmp_path: Path) -> None:
    done = serve_once("--data-dir", "", "--gpus", "none",
                      env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--data-dir" in done.stderr, done.stderr
    assert "is empty" in done.stderr
    assert not (tmp_path / ".gpuyard").exists()


def test_an_empty_gpus_is_refused_not_taken_for_no_gpus(tmp_path: Path) -> None:
    """``--gpus "$GPUS"`` with the variable unset: a mistake, not a machine without GPUs
    (an empty GPUYARD_GPUS is ignored, as click ignores every empty variable)."""
    done = serve_once("--data-dir", str(tmp_path / "data"), "--gpus", " ")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--gpus" in done.stderr, done.stderr
    assert "is empty" in done.stderr and "NVML" in done.stderr
    assert not (tmp_path / "data").exists()


def test_a_log_that_cannot_be_written_at_start_is_one_line(tmp_path: Path) -> None:
    """The first write of a start-up (the GPU inventory) happens before the server
    listens: a log that refuses it stops the start with one line, not uvicorn's traceback."""
    log = EventLog(tmp_path / "events.db")
    log.execute_raw("CREATE TRIGGER refuse BEFORE INSERT ON events "
                    "BEGIN SELECT RAISE(ABORT, 'the disk is full, say'); END")
    log.close()
    done = serve_once("--data-dir", str(tmp_path), "--gpus", "2")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and STARTED not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "gpuyard: error: cannot write the event log: append refused: the disk is full, say")


def test_a_server_whose_stderr_goes_away_keeps_recording(tmp_path: Path) -> None:
    """``gpuyard serve 2>&1 | tee log`` and the tee dies: log lines are lost, events not
    (a failed log write used to fail the request, and the executor's reports, that logged)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quick.toml").write_text('command = ["true"]\nnum_processes = 0\n')
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from service.cli import main; main()", "serve", "--port",
         str(port), "--data-dir", str(tmp_path), "--gpus", "none"],
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    watchdog = threading.Timer(60.0, server.kill)  # a server that never says it serves
    watchdog.start()
    try:
        assert server.stderr is not None
        for line in server.stderr:  # until uvicorn serves
            if "Uvicorn running" in line or "startup complete" in line.lower():
                break
        watchdog.cancel()
        assert server.poll() is None, "the server never started"
        server.stderr.close()  # the reader goes away
        answers = [httpx.post(url + "/api/queue/submit", json={"config_name": "quick"},
                              timeout=30.0) for _ in range(3)]
        assert [a.status_code for a in answers] == [201] * 3, [a.text for a in answers]
        ids = [a.json()["job_id"] for a in answers]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            statuses = [httpx.get(f"{url}/api/queue/{job_id}", timeout=30.0).json()["status"]
                        for job_id in ids]
            if statuses == ["completed"] * 3:
                break
            time.sleep(0.1)
        assert statuses == ["completed"] * 3
        missing = httpx.post(url + "/api/queue/nosuch/cancel", timeout=30.0)
        assert missing.status_code == 404  # an error's log line, lost too, is no 500
    finally:
        watchdog.cancel()
        server.terminate()
        server.wait(timeout=30)


def test_a_log_missing_an_event_is_named_in_one_line(tmp_path: Path) -> None:
    """seq 2 (the job's submission) deleted behind the triggers' back: the dispatch after
    it names a job the log never submitted."""
    log = EventLog(tmp_path / "events.db")
    spec = JobSpec(config_name="c", command=("true",), num_processes=0)
    for event in (JobSubmitted(job_id="j1", user_id=0, spec=spec, priority=30),
                  JobDispatched(job_id="j1")):
        log.append([seal(log.last_hash, log.last_seq + 1, 1.0, "x", None, None, event)])
    log.execute_raw("DROP TRIGGER events_no_delete")
    log.execute_raw("DELETE FROM events WHERE seq = 1")
    log.close()
    done = serve_once("--data-dir", str(tmp_path), "--gpus", "none")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        "gpuyard: error: cannot replay the event log: seq 2 (job.dispatched) does not follow "
        "from the events before it")
    assert "audit verify" in done.stderr and "unexpected" not in done.stderr


def test_a_server_checks_the_chain_it_started_from(tmp_path: Path) -> None:
    """Start-up replays without hashing; a thread beside the server verifies the chain and
    says so in the server's log, loudly when it was altered. The server still serves."""
    for name, alter in (("intact", False), ("altered", True)):
        data_dir = tmp_path / name
        data_dir.mkdir()
        log = EventLog(data_dir / "events.db")
        for n in (1, 2, 3):
            log.append([seal(log.last_hash, n, float(n), "x", None, None,
                             JobSubmitted(job_id=f"j{n}", user_id=0, priority=30,
                                          spec=JobSpec(config_name="c", command=("true",),
                                                       num_processes=0)))])
        if alter:
            log.execute_raw("DROP TRIGGER events_no_update")
            log.execute_raw("UPDATE events SET actor = 'someone else' WHERE seq = 2")
        log.close()
        with ServerProcess(data_dir, gpus="none") as server:
            deadline = time.monotonic() + 30
            while "event_log_" not in server.log_path.read_text():
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.05)
            assert httpx.get(server.url + "/api/queue/stats", timeout=30.0).status_code == 200
        lines = [json.loads(line) for line in server.log_path.read_text().splitlines()
                 if line.startswith("{") and '"event_log_' in line]
        assert len(lines) == 1, lines
        if alter:
            assert (lines[0]["event"], lines[0]["level"], lines[0]["seq"]) == (
                "event_log_chain_broken", "critical", 2)
        else:
            assert (lines[0]["event"], lines[0]["events"]) == ("event_log_verified", 3)


@pytest.mark.parametrize("source", ["--gpus", "GPUYARD_GPUS"])
def test_a_malformed_gpu_spec_is_blamed_on_where_it_came_from(tmp_path: Path,
                                                               source: str) -> None:
    args = ["--data-dir", str(tmp_path / "data")]
    env = {k: v for k, v in os.environ.items() if k != "GPUYARD_GPUS"}
    if source == "--gpus":
        args += ["--gpus", "4xA100"]
    else:
        env["GPUYARD_GPUS"] = "4xA100"
    done = serve_once(*args, env=env)
    assert done.returncode == 2
    assert done.stderr == (f"gpuyard: error: {source}: malformed GPU spec '4xA100': bad group "
                           "'4xA100'; expected none, N, NxMODEL:GB or a comma-separated list "
                           "such as 2xH100:80,2xL4:24\n")
    assert not (tmp_path / "data").exists()
