"""``gpuyard users add --data-dir``: an admin created in a stopped server's log, for when
no admin can sign in (here: the first user created was a researcher)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from cli_runner import gpuyard, one_error_line
from serverproc import ServerProcess

from events.envelope import seal
from events.log import EventLog
from events.types import UserCreated
from service.commands import LOCAL_ADMIN


def test_an_admin_added_offline_can_sign_in_once_the_server_is_back(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with ServerProcess(data, gpus="none") as server:
        first = httpx.post(f"{server.url}/api/users", json={"name": "rita", "level": "researcher"})
        assert first.status_code == 201, first.text
        researcher = {"Authorization": f"Bearer {first.json()['token']}"}
        assert httpx.get(f"{server.url}/api/users", headers=researcher).status_code == 403
        # while the server runs, the log is its alone
        busy = one_error_line(gpuyard("users", "add", "boss", "--level", "admin",
                                      "--data-dir", str(data)))
        assert "another gpuyard server is using" in busy

        server.stop()
        added = gpuyard("users", "add", "boss", "--level", "admin", "--data-dir", str(data))
        assert added.returncode == 0, added.stderr
        token = re.search(r"token \(shown once, keep it\): (\S+)", added.stdout)
        assert token is not None, added.stdout
        assert "created user 2: boss (admin)" in added.stdout

        server.start()
        admin = {"Authorization": f"Bearer {token.group(1)}"}
        listed = httpx.get(f"{server.url}/api/users", headers=admin)
        assert listed.status_code == 200, listed.text
        assert [(u["name"], u["level"]) for u in listed.json()["users"]] == [
            ("rita", "researcher"), ("boss", "admin")]
    log = EventLog(data / "events.db")
    try:
        assert log.verify() == log.last_seq  # appended to the chain, not beside it
        assert [r.actor for r in log.read() if r.type == "user.created"] == [
            LOCAL_ADMIN.label, LOCAL_ADMIN.label]
    finally:
        log.close()


def test_offline_add_refuses_a_directory_without_a_log(tmp_path: Path) -> None:
    line = one_error_line(gpuyard("users", "add", "boss", "--level", "admin",
                                  "--data-dir", str(tmp_path / "nowhere")))
    assert "there is no event log at" in line
    assert not (tmp_path / "nowhere").exists()


def test_offline_add_refuses_to_extend_an_altered_log(tmp_path: Path) -> None:
    """A user appended to an altered log would vouch for it: the chain is checked first."""
    log = EventLog(tmp_path / "events.db")
    for n in (1, 2, 3):
        log.append([seal(log.last_hash, n, float(n), "x", None, None,
                         UserCreated(user_id=n, name=f"u{n}", level="researcher"))])
    log.execute_raw("DROP TRIGGER events_no_update")
    log.execute_raw("UPDATE events SET actor = 'y' WHERE seq = 2")
    log.close()
    line = one_error_line(gpuyard("users", "add", "boss", "--level", "admin",
                                  "--data-dir", str(tmp_path)))
    assert line.startswith("gpuyard: error: hash chain broken at seq 2: stored hash does not")
    assert "nothing was added" in line
    log = EventLog(tmp_path / "events.db")
    assert log.last_seq == 3
    log.close()
