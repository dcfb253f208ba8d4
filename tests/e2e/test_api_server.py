"""Against a real ``gpuyard serve`` process on loopback (uvicorn in a subprocess):
concurrent submissions from many users, a SIGKILL and a restart, bad start-up flags."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import anyio
import httpx
import pytest
from api_harness import write_configs
from serverproc import REPO_ROOT, ServerProcess

from events.log import EventLog
from service.commands import LOCAL_ADMIN

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def server(data_dir):
    process = ServerProcess(data_dir, gpus="4xA100:40")
    process.start()
    try:
        yield process
    finally:
        process.stop(kill_jobs=True)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create_users(client: httpx.AsyncClient, count: int) -> list[tuple[int, str]]:
    """``count`` users (the first an admin); their ids and tokens."""
    first = await client.post("/api/users", json={"name": "user-0", "level": "admin"})
    assert first.status_code == 201, first.text
    admin = first.json()["token"]
    users = [(first.json()["user_id"], admin)]
    levels = ("researcher", "lead", "viewer", "admin")
    for n in range(1, count):
        response = await client.post("/api/users", headers=auth(admin),
                                     json={"name": f"user-{n}", "level": levels[n % 4],
                                           "team_id": f"team-{n % 5}"})
        assert response.status_code == 201, response.text
        users.append((response.json()["user_id"], response.json()["token"]))
    return users


async def test_200_concurrent_submits_from_50_users_make_200_jobs_and_200_events(
    server, data_dir
) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0, limits=limits) as client:
        users = await create_users(client, 50)
        answers: list[httpx.Response] = []

        async def submit(token: str, n: int) -> None:
            answers.append(await client.post(
                "/api/queue/submit", headers=auth(token),
                json={"config_name": "cpu", "metadata": {"n": n}}))

        async with anyio.create_task_group() as group:
            for n in range(200):
                group.start_soon(submit, users[n % 50][1], n)

        assert [r.status_code for r in answers] == [201] * 200, [r.text for r in answers][:3]
        job_ids = {r.json()["job_id"] for r in answers}
        assert len(job_ids) == 200
        listing = (await client.get("/api/queue", headers=auth(users[0][1]),
                                    params={"limit": 500})).json()
        assert {e["job_id"] for e in listing["entries"]} == job_ids
        assert sorted(e["metadata"]["n"] for e in listing["entries"]) == list(range(200))
        positions = sorted(e["position"] for e in listing["entries"] if e["position"])
        assert positions == list(range(1, len(positions) + 1))

    log = EventLog(data_dir / "events.db", readonly=True)
    try:
        submitted = [r for r in log.read() if r.type == "job.submitted"]
        assert len(submitted) == 200
        assert {r.event.job_id for r in submitted} == job_ids
        per_user: dict[int, int] = {}
        for recorded in submitted:
            per_user[recorded.event.user_id] = per_user.get(recorded.event.user_id, 0) + 1
        assert sorted(per_user) == sorted(user_id for user_id, _ in users)
        assert set(per_user.values()) == {4}
        assert log.verify() == log.last_seq
    finally:
        log.close()


async def snapshot(client: httpx.AsyncClient, admin: str, tokens: list[str]) -> dict:
    """What the API says about the queue: listing, stats, positions, each user's view."""
    headers = auth(admin)
    listing = (await client.get("/api/queue", headers=headers,
                                params={"include_completed": "true", "limit": 500})).json()
    pending = [e["job_id"] for e in listing["entries"] if e["status"] == "pending"]
    positions = {}
    for job_id in pending:
        body = (await client.get(f"/api/queue/position/{job_id}", headers=headers)).json()
        positions[job_id] = (body["position"], body["effective_priority"], body["queued_at"])
    return {
        "listing": listing,
        "stats": (await client.get("/api/queue/stats", headers=headers)).json(),
        "positions": positions,
        "me": [(await client.get("/api/queue/me", headers=auth(t))).json() for t in tokens],
        "settings": (await client.get("/api/queue/concurrency", headers=headers)).json(),
    }


async def test_after_sigkill_and_restart_the_api_returns_the_same_queue(server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
        users = await create_users(client, 4)  # admin, researcher, lead, viewer
        admin = users[0][1]
        tokens = [token for _, token in users]
        await client.post("/api/queue/concurrency", headers=auth(admin),
                          json={"local_job_max_concurrent": 2, "user_max_concurrent": 1})
        for n in range(12):
            token = tokens[n % 4]
            body = {"config_name": "sleeper" if n % 3 else "cpu", "metadata": {"n": n}}
            if n == 5:
                body["requires_approval"] = True
            response = await client.post("/api/queue/submit", headers=auth(token), json=body)
            assert response.status_code == 201, response.text
        listing = (await client.get("/api/queue", headers=auth(admin))).json()["entries"]
        pending = [e["job_id"] for e in listing if e["status"] == "pending"]
        await client.post(f"/api/queue/{pending[-1]}/cancel", headers=auth(admin))
        await client.post(f"/api/queue/{pending[-2]}/priority", headers=auth(admin),
                          json={"priority": 40})
        before = await snapshot(client, admin, tokens)

    assert before["stats"]["running"] == 2 and before["stats"]["queue_depth"] >= 5
    assert before["stats"]["by_status"]["blocked"] == 1
    server.kill()
    server.start()

    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
        after = await snapshot(client, admin, tokens)
    assert after["listing"] == before["listing"]
    assert after["positions"] == before["positions"]
    assert after["stats"] == before["stats"]
    assert after["me"] == before["me"]
    assert after["settings"] == before["settings"]


async def test_log_lines_of_a_request_carry_its_request_id_as_json(server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
        response = await client.post("/api/queue/concurrency", json={"max_concurrent": 0},
                                     headers={"X-Request-ID": "trace-me-123"})
        assert response.status_code == 422
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines()
             if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "trace-me-123"]
    assert mine and mine[0]["event"] == "request_refused"
    assert mine[0]["actor"] == LOCAL_ADMIN.label and mine[0]["status"] == 422
    assert "max_concurrent" in mine[0]["detail"]


def test_a_malformed_gpu_spec_is_one_line_and_exit_2(tmp_path) -> None:
    write_configs(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "data"), "--gpus", "4xA100"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpuyard: error: --gpus:") and "4xA100" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path) -> None:
    data_dir = tmp_path / "data"
    write_configs(data_dir)
    with ServerProcess(data_dir) as first:
        # the directory itself is locked too: deleting server.lock does not get round it
        (data_dir / "server.lock").unlink()
        result = subprocess.run(
            [sys.executable, "-c", "from service.cli import main; main()", "serve", "--port", "0",
             "--data-dir", str(data_dir), "--gpus", "4xA100:40"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "another gpuyard server is using" in lines[0]
        # the first one is untouched, and a SIGKILLed server leaves no lock behind
        assert httpx.get(f"{first.url}/api/queue/stats").status_code == 200
        first.kill()
        first.start()
        assert httpx.get(f"{first.url}/api/queue/stats").status_code == 200


def test_a_port_in_use_is_one_line_and_exit_2_before_the_log_is_touched(tmp_path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    data_dir = tmp_path / "data"
    try:
        result = subprocess.run(
            [sys.executable, "-c", "from service.cli import main; main()", "serve",
             "--port", str(taken.getsockname()[1]), "--data-dir", str(data_dir),
             "--gpus", "4xA100:40"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )
    finally:
        taken.close()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpuyard: error: cannot listen on 127.0.0.1:")
    assert not (data_dir / "events.db").exists()  # no replay, no start-up, no job launched


def test_sigterm_closes_the_log_so_events_db_alone_holds_every_event(tmp_path) -> None:
    """Stopped by SIGTERM, the server closes its log before the signal ends the process:
    SQLite folds the write-ahead file back, so a copy of ``events.db`` alone is whole."""
    data_dir = tmp_path / "data"
    write_configs(data_dir)
    server = ServerProcess(data_dir).start()
    try:
        for _ in range(3):
            response = httpx.post(f"{server.url}/api/queue/submit",
                                  json={"config_name": "cpu"}, timeout=10)
            assert response.status_code == 201, response.text
        server.stop()
        assert server.process is not None
        assert server.process.returncode == -signal.SIGTERM  # the signal, re-raised
    finally:
        server.stop(kill_jobs=True)
    assert not (data_dir / "events.db-wal").exists()
    copy = tmp_path / "copy.db"
    copy.write_bytes((data_dir / "events.db").read_bytes())
    log = EventLog(copy)
    try:
        submitted = [r for r in log.read() if r.type == "job.submitted"]
        assert len(submitted) == 3
        assert log.verify() == log.last_seq
    finally:
        log.close()


def test_a_chunked_body_over_1_mib_is_413_too(server) -> None:
    """Without a Content-Length, the limit is found while the body streams in: still 413
    (it was a 400 "malformed JSON"), and nothing is written."""
    body = json.dumps({"config_name": "cpu", "metadata": {"blob": "x" * (1024 * 1024)}}).encode()

    def chunks():  # an iterator: httpx sends it chunked, announcing no length
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    response = httpx.post(f"{server.url}/api/queue/submit", content=chunks(),
                          headers={"content-type": "application/json"}, timeout=30)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    assert "1 MiB" in response.json()["detail"]
    assert httpx.get(f"{server.url}/api/queue/stats").json()["queue_depth"] == 0


def test_a_client_that_leaves_mid_body_is_no_server_error(server) -> None:
    """A body cut short by a client that hangs up is the client's doing: logged as a
    disconnect, never as a server error, and nothing is written."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"POST /api/queue/submit HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"config_name":"cpu"}')
        conn.shutdown(socket.SHUT_WR)  # the promised 100 bytes never come
        conn.recv(1024)  # whatever the server says before it closes
    deadline = time.monotonic() + 10
    while "client_disconnected" not in server.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    log = server.log_path.read_text(errors="replace")
    assert "request_failed" not in log and "http_error" not in log, server.log_tail()
    assert httpx.get(f"{server.url}/api/queue/stats").json()["queue_depth"] == 0
