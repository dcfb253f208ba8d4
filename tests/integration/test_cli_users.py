"""Users, tokens and auth through the CLI, against a real server that leaves single-user mode."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest
from cli_runner import gpuyard, one_error_line
from serverproc import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("users") / "data"
    (data / "configs").mkdir(parents=True)
    (data / "configs" / "noop.toml").write_text(
        f'command = [{json.dumps(sys.executable)}, "-c", "pass"]\nnum_processes = 0\n')
    with ServerProcess(data, gpus="2") as proc:
        yield proc


def test_users_tokens_and_auth(server: ServerProcess) -> None:
    def cli(*args: str, token: str | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        prefix = ["--server", server.url] + (["--token", token] if token else [])
        return gpuyard(*prefix, *args, env=env)

    assert "single-user mode" in cli("users", "list").stdout

    created = cli("users", "add", "root", "--level", "admin")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created user 1: root (admin)")
    root = created.stdout.strip().splitlines()[-1].split(": ", 1)[1]

    # single-user mode is over: no token, a wrong token
    assert "not authenticated (401)" in one_error_line(cli("jobs", "list"))
    assert "--token" in one_error_line(cli("jobs", "list", token="not-a-token"))

    alice = json.loads(cli("users", "add", "alice", "--level", "researcher", "--team", "alpha",
                           "--format", "json", token=root).stdout)
    assert (alice["user_id"], alice["team_id"]) == (2, "alpha")
    assert "conflict (409)" in one_error_line(
        cli("users", "add", "alice", "--level", "viewer", token=root))
    bob = json.loads(cli("users", "add", "bob", "--level", "viewer", "--team-id", "beta",
                         "--format", "json", token=root).stdout)
    assert (bob["user_id"], bob["team_id"]) == (3, "beta")

    listed = cli("users", "list", token=root)
    assert listed.returncode == 0, listed.stderr
    assert "alice" in listed.stdout and "alpha" in listed.stdout
    assert alice["token"] not in listed.stdout  # tokens are never listed

    # the token from the environment, as a researcher
    as_alice = {"GPUYARD_TOKEN": alice["token"]}
    submitted = cli("jobs", "submit", "noop", "--format", "json", env=as_alice)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    for flag in ("--user", "--user-id"):
        alices = json.loads(cli("jobs", "list", flag, "2", "--format", "json", token=root).stdout)
        assert [job["job_id"] for job in alices] == [job_id]
        nobody = cli("jobs", "list", flag, "3", "--format", "json", token=root)
        assert json.loads(nobody.stdout) == []
    assert "not allowed (403)" in one_error_line(cli("users", "list", env=as_alice))
    assert "not allowed (403)" in one_error_line(cli("jobs", "approve", job_id, env=as_alice))
    assert "not allowed (403)" in one_error_line(cli("audit", "export", env=as_alice))

    # a second token for alice, then revoke the first
    issued = cli("users", "token", "2", token=root)
    assert issued.returncode == 0, issued.stderr
    second = issued.stdout.strip().splitlines()[-1]
    assert cli("jobs", "list", token=second).returncode == 0
    first_id = alice["token_id"]
    revoked = cli("users", "token", "2", "--revoke", first_id, token=root)
    assert revoked.returncode == 0, revoked.stderr
    assert "not authenticated (401)" in one_error_line(cli("jobs", "list", env=as_alice))
    assert cli("jobs", "list", token=second).returncode == 0
    assert "not found (404)" in one_error_line(cli("users", "token", "99", token=root))
