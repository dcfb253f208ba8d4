"""Users and tokens over HTTP: single-user mode and its end, bearer tokens shown once and
stored as hashes, revocation, changing users."""

from __future__ import annotations

import hashlib

import pytest

pytestmark = pytest.mark.anyio


async def test_single_user_mode_until_the_first_user_then_tokens(api) -> None:
    listing = (await api.get("/api/users")).json()
    assert listing == {"users": [], "single_user_mode": True}
    job = await api.submit_ok("cpu")  # acting as the local admin
    assert api.state.jobs[job["job_id"]].user_id == 0

    created = await api.post("/api/users", {"name": "alice", "level": "admin", "team_id": "ml"})
    assert created.status_code == 201
    body = created.json()
    assert set(body) == {"user_id", "name", "level", "team_id", "token", "token_id"}
    assert (body["name"], body["level"], body["team_id"]) == ("alice", "admin", "ml")

    # single-user mode is over: no token, no access
    missing = await api.get("/api/queue/stats")
    assert missing.status_code == 401
    assert "Bearer" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert (await api.get("/api/queue/stats", "not-a-token")).status_code == 401
    basic = await api.client.get("/api/queue", headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert basic.status_code == 401
    assert (await api.post("/api/queue/submit", {"config_name": "cpu"})).status_code == 401
    ok = await api.get("/api/queue/stats", body["token"])
    assert ok.status_code == 200
    lower = await api.client.get("/api/queue/me",
                                 headers={"Authorization": f"bearer {body['token']}"})
    assert lower.status_code == 200
    # the schema stays readable without a token
    assert (await api.client.get("/schema/openapi.json")).status_code == 200


async def test_the_first_user_may_have_any_level_and_ends_single_user_mode(api) -> None:
    response = await api.post("/api/users", {"name": "bob", "level": "researcher"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["user_id"], body["level"]) == (1, "researcher")
    assert (await api.get("/api/queue/stats")).status_code == 401  # single-user mode is over
    assert (await api.get("/api/queue/stats", body["token"])).status_code == 200
    refused = await api.post("/api/users", {"name": "x", "level": "admin"}, body["token"])
    assert refused.status_code == 403  # a researcher manages no users


async def test_tokens_are_random_shown_once_and_stored_only_as_hashes(api, data_dir) -> None:
    await api.make_users()
    tokens = set(api.tokens.values())
    assert len(tokens) == 4 and all(len(token) > 30 for token in tokens)
    stored = (data_dir / "events.db").read_bytes()
    wal = data_dir / "events.db-wal"
    if wal.exists():
        stored += wal.read_bytes()
    for token in tokens:
        assert token.encode() not in stored
        assert hashlib.sha256(token.encode()).hexdigest().encode() in stored
    listing = (await api.get("/api/users", "admin")).json()
    assert listing["single_user_mode"] is False
    assert [u["name"] for u in listing["users"]] == ["admin", "lead", "researcher", "viewer"]
    assert all(set(u) == {"user_id", "name", "level", "team_id", "tokens"}
               for u in listing["users"])
    assert all(token not in str(listing) for token in tokens)


async def test_issue_and_revoke_tokens(api) -> None:
    await api.make_users("admin", "researcher")
    user_id = api.user_ids["researcher"]
    issued = await api.post(f"/api/users/{user_id}/tokens", who="admin")
    assert issued.status_code == 201
    second = issued.json()
    assert set(second) == {"user_id", "token_id", "token"} and second["user_id"] == user_id
    assert (await api.get("/api/queue/me", second["token"])).status_code == 200
    assert (await api.get("/api/queue/me", "researcher")).status_code == 200  # first still works
    first_id = next(u for u in (await api.get("/api/users", "admin")).json()["users"]
                    if u["user_id"] == user_id)["tokens"]
    assert len(first_id) == 2
    revoked = await api.client.delete(f"/api/users/{user_id}/tokens/{second['token_id']}",
                                      headers=api.auth("admin"))
    assert revoked.status_code == 200
    assert revoked.json() == {"success": True, "user_id": user_id,
                              "token_id": second["token_id"]}
    assert (await api.get("/api/queue/me", second["token"])).status_code == 401
    gone = await api.client.delete(f"/api/users/{user_id}/tokens/{second['token_id']}",
                                   headers=api.auth("admin"))
    assert gone.status_code == 404
    assert (await api.post("/api/users/999/tokens", who="admin")).status_code == 404


async def test_changing_a_user(api) -> None:
    await api.make_users("admin", "researcher")
    user_id = api.user_ids["researcher"]
    promoted = await api.client.patch(f"/api/users/{user_id}",
                                      json={"level": "lead", "team_id": "vision"},
                                      headers=api.auth("admin"))
    assert promoted.status_code == 200
    assert promoted.json()["level"] == "lead" and promoted.json()["team_id"] == "vision"
    job = await api.submit_ok("cpu", "researcher")  # the token now acts as a lead
    entry = api.state.jobs[job["job_id"]]
    assert entry.priority == 20 and entry.team_id == "vision"
    left_team = await api.client.patch(f"/api/users/{user_id}", json={"team_id": None},
                                       headers=api.auth("admin"))
    assert left_team.json()["team_id"] is None and left_team.json()["level"] == "lead"


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/api/users/999", {"level": "lead"}, 404),
    ("/api/users/1", {"level": "boss"}, 422),
    ("/api/users/1", {"colour": "red"}, 422),
    ("/api/users/1", {"level": "viewer"}, 409),  # the last admin
    ("/api/users/2", {"name": "admin"}, 409),  # the name is taken
])
async def test_bad_user_changes(api, path, body, status) -> None:
    await api.make_users("admin", "researcher")
    response = await api.client.patch(path, json=body, headers=api.auth("admin"))
    assert response.status_code == status, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize(("body", "status"), [
    ({"name": "admin", "level": "lead"}, 409),
    ({"name": "x", "level": "owner"}, 422),
    ({"name": "", "level": "lead"}, 422),
    ({"level": "lead"}, 422),
    ({"name": "x", "level": "lead", "password": "p"}, 422),
])
async def test_bad_new_users(api, body, status) -> None:
    await api.make_users("admin")
    response = await api.post("/api/users", body, "admin")
    assert response.status_code == status, response.text
