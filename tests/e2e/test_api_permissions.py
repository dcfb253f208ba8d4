"""SPEC section 6's permission table, row by row, for every level: allowed and refused.

| action                                                         | viewer | researcher | lead | admin |
| submit, view/cancel own jobs, me, position, stats              |  yes   |    yes     | yes  |  yes  |
| view and cancel every job                                      |        |            | yes  |  yes  |
| priority override                                              |        |            | yes  |  yes  |
| approve, reject, concurrency, process, cleanup, users,         |        |            |      |  yes  |
| configs, audit export                                          |        |            |      |       |
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio

LEVELS = ("viewer", "researcher", "lead", "admin")


async def given_a_team(api) -> dict[str, str]:
    """Four users; the admin's job runs; each user has one pending job."""
    await api.make_users()
    await api.submit_ok("cpu", "admin")
    return {level: (await api.submit_ok("cpu", level))["job_id"] for level in LEVELS}


def refused(response) -> None:
    assert response.status_code == 403, response.text
    assert "you are" in response.json()["detail"] or "another user" in response.json()["detail"]


async def test_row_1_everyone_submits_views_and_cancels_own_jobs(api) -> None:
    jobs = await given_a_team(api)
    for level in LEVELS:
        own = jobs[level]
        assert (await api.get(f"/api/queue/{own}", level)).status_code == 200, level
        assert (await api.get(f"/api/queue/position/{own}", level)).json()["position"] >= 1
        assert (await api.get(f"/api/queue/{own}/explain", level)).status_code == 200
        me = (await api.get("/api/queue/me", level)).json()
        assert [job["job_id"] for job in me["pending_jobs"]] == [own], level
        assert (await api.get("/api/queue/stats", level)).status_code == 200
        assert own in [e["job_id"] for e in (await api.get("/api/queue", level)).json()["entries"]]
        cancelled = await api.post(f"/api/queue/{own}/cancel", who=level)
        assert cancelled.json()["status"] == "cancelled", level
        more = [(await api.submit_ok("cpu", level))["job_id"] for _ in range(2)]
        bulk = await api.post("/api/queue/cancel", {"job_ids": more}, level)
        assert sorted(bulk.json()["cancelled"]) == sorted(more)


async def test_row_2_only_leads_and_admins_view_and_cancel_every_job(api) -> None:
    jobs = await given_a_team(api)
    for level in LEVELS:
        other = jobs["researcher"] if level != "researcher" else jobs["viewer"]
        view = await api.get(f"/api/queue/{other}", level)
        position = await api.get(f"/api/queue/position/{other}", level)
        explain = await api.get(f"/api/queue/{other}/explain", level)
        listed = [e["job_id"] for e in (await api.get("/api/queue", level)).json()["entries"]]
        if level in ("lead", "admin"):
            assert view.status_code == position.status_code == explain.status_code == 200
            assert other in listed and len(listed) == 5
        else:
            for response in (view, position, explain):
                refused(response)
            assert listed == [jobs[level]]
    for level in ("viewer", "researcher"):
        other = jobs["researcher"] if level == "viewer" else jobs["viewer"]
        refused(await api.post(f"/api/queue/{other}/cancel", who=level))
        refused(await api.post("/api/queue/cancel", {"job_ids": [jobs[level], other]}, level))
        assert api.state.jobs[other].status == "pending"
        assert api.state.jobs[jobs[level]].status == "pending"  # all or nothing
    lead = await api.post(f"/api/queue/{jobs['researcher']}/cancel", who="lead")
    assert lead.json()["status"] == "cancelled"
    admin = await api.post("/api/queue/cancel", {"job_ids": [jobs["viewer"]]}, "admin")
    assert admin.json()["cancelled"] == [jobs["viewer"]]
    assert api.state.jobs[jobs["viewer"]].status == "cancelled"


async def test_row_3_only_leads_and_admins_override_priorities(api) -> None:
    jobs = await given_a_team(api)
    for level in LEVELS:
        response = await api.post(f"/api/queue/{jobs[level]}/priority", {"priority": 25}, level)
        if level in ("lead", "admin"):
            assert response.status_code == 200 and response.json()["priority_override"] == 25
        else:
            refused(response)
            assert api.state.jobs[jobs[level]].priority_override is None


async def admin_only_calls(api, level: str) -> dict[str, object]:
    """Every admin-only action once, as ``level``; the responses by name."""
    blocked = [(await api.submit_ok("cpu", "viewer", requires_approval=True))["job_id"]
               for _ in range(2)]
    researcher = api.user_ids["researcher"]
    token_id = (await api.post(f"/api/users/{researcher}/tokens", who="admin")).json()["token_id"]
    headers = api.auth(level)
    calls = {
        "approve": await api.post(f"/api/queue/{blocked[0]}/approve", who=level),
        "reject": await api.post(f"/api/queue/{blocked[1]}/reject", who=level, reason="no"),
        "read limits": await api.get("/api/queue/concurrency", level),
        "concurrency": await api.post("/api/queue/concurrency", {"max_concurrent": 7}, level),
        "process": await api.post("/api/queue/process", who=level),
        "cleanup": await api.post("/api/queue/cleanup", who=level, days=30),
        "list users": await api.get("/api/users", level),
        "create user": await api.post("/api/users", {"name": f"new-{level}", "level": "viewer"},
                                      level),
        "change user": await api.client.patch(f"/api/users/{researcher}",
                                              json={"team_id": f"t-{level}"}, headers=headers),
        "issue token": await api.post(f"/api/users/{researcher}/tokens", who=level),
        "revoke token": await api.client.delete(f"/api/users/{researcher}/tokens/{token_id}",
                                                headers=headers),
        "write config": await api.client.put("/api/configs/extra", json={"command": ["true"]},
                                             headers=headers),
        "audit export": await api.get("/api/audit/export", level),
    }
    return calls


@pytest.mark.parametrize("level", LEVELS)
async def test_row_4_only_admins_approve_reject_set_limits_process_clean_up_manage_users_configs_and_export(  # noqa: E501
    api, data_dir, level
) -> None:
    await given_a_team(api)
    before_users = len(api.state.users)
    calls = await admin_only_calls(api, level)
    if level == "admin":
        for name, response in calls.items():
            assert response.status_code in (200, 201), (name, response.text)
        assert api.state.settings.max_concurrent == 7
        assert (data_dir / "configs" / "extra.toml").exists()
        assert len(api.state.users) == before_users + 1
    else:
        for name, response in calls.items():
            assert response.status_code == 403, (name, response.text)
            assert f"you are {level}" in response.json()["detail"], name
        assert api.state.settings.max_concurrent == 5
        assert not (data_dir / "configs" / "extra.toml").exists()
        assert len(api.state.users) == before_users
        assert api.state.status_counts["blocked"] == 2


async def test_everyone_reads_configs_and_the_limits_in_stats(api) -> None:
    await given_a_team(api)
    for level in LEVELS:
        stats = (await api.get("/api/queue/stats", level)).json()
        assert (stats["max_concurrent"], stats["user_max_concurrent"]) == (5, 2)
        assert (await api.get("/api/configs", level)).status_code == 200
        assert (await api.get("/api/configs/cpu", level)).status_code == 200
