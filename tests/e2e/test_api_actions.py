"""The queue's write routes over HTTP: cancel (one, many, running), approve and reject,
priority overrides, limits, a scheduling pass, cleanup."""

from __future__ import annotations

import json
import time
from datetime import datetime

import anyio
import pytest
from api_harness import open_api

from events.envelope import seal
from events.log import EventLog
from events.types import JobCancelled, JobSpec, JobSubmitted

pytestmark = pytest.mark.anyio

DEFAULT_SETTINGS = {
    "max_concurrent": 5, "user_max_concurrent": 2, "team_max_concurrent": 10,
    "enable_fair_share": False, "local_gpu_max_concurrent": None, "local_job_max_concurrent": 1,
    "starvation_threshold_minutes": 60.0, "starvation_boost": 10,
    "approval_cost_threshold": 50.0, "approval_timeout_hours": 24.0, "cancel_grace_seconds": 10.0,
}


def events_of(api, type_: str) -> list:
    return [r for r in api.runtime.event_log.read() if r.type == type_]


async def test_cancel_pending_running_and_finished(api) -> None:
    running = await api.submit_ok("sleeper")
    pending = await api.submit_ok("sleeper")
    response = await api.post(f"/api/queue/{pending['job_id']}/cancel")
    assert response.status_code == 200
    assert response.json() == {"success": True, "job_id": pending["job_id"], "status": "cancelled"}
    # a running job: the process group is stopped, then the answer comes
    stopped = await api.post(f"/api/queue/{running['job_id']}/cancel")
    assert stopped.json()["status"] == "cancelled"
    assert api.state.jobs[running["job_id"]].status == "cancelled"
    again = await api.post(f"/api/queue/{running['job_id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert (await api.post("/api/queue/nosuchjob/cancel")).status_code == 404


async def test_cancelling_a_job_that_ignores_sigterm_answers_running_before_its_sigkill(
    api,
) -> None:
    """The answer does not wait out the grace period: the job is still running (its
    SIGKILL is due after cancel_grace_seconds) and says so; it is cancelled later."""
    await api.post("/api/queue/concurrency", {"cancel_grace_seconds": 600.0})
    job_id = (await api.submit_ok("stubborn"))["job_id"]
    ready = api.runtime.runs_dir / job_id / "ready"
    deadline = time.monotonic() + 30.0
    while not ready.exists():  # its trap is set: SIGTERM no longer stops it
        assert time.monotonic() < deadline, "the stubborn job never got ready"
        await anyio.sleep(0.02)
    response = await api.post(f"/api/queue/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json() == {"success": True, "job_id": job_id, "status": "running"}
    job = api.state.jobs[job_id]
    assert (job.status, job.cancel_requested) == ("running", True)


async def test_cancelling_starts_the_next_job(api) -> None:
    running = await api.submit_ok("sleeper")
    waiting = await api.submit_ok("sleeper")
    await api.post(f"/api/queue/{running['job_id']}/cancel")
    started = await api.runtime.engine.wait_for(
        lambda state: state.jobs[waiting["job_id"]].status == "running", 10.0)
    assert started


async def test_bulk_cancel_ids_is_all_or_nothing(api) -> None:
    await api.submit_ok("cpu")
    a = (await api.submit_ok("cpu"))["job_id"]
    b = (await api.submit_ok("cpu"))["job_id"]
    c = (await api.submit_ok("cpu"))["job_id"]
    done = await api.post("/api/queue/cancel", {"job_ids": [a]})
    assert done.json() == {"success": True, "cancelled": [a]}
    refused = await api.post("/api/queue/cancel", {"job_ids": [b, a]})
    assert refused.status_code == 409
    unknown = await api.post("/api/queue/cancel", {"job_ids": [b, "nosuchjob"]})
    assert unknown.status_code == 404
    assert api.state.jobs[b].status == "pending"  # nothing of the refused requests happened
    both = await api.post("/api/queue/cancel", {"job_ids": [b, c]})
    assert sorted(both.json()["cancelled"]) == sorted([b, c])


async def test_bulk_cancel_all_is_own_jobs_for_researchers_every_job_for_leads(api) -> None:
    await api.make_users("admin", "lead", "researcher")
    await api.submit_ok("cpu", "admin")
    mine = [(await api.submit_ok("cpu", "researcher"))["job_id"] for _ in range(2)]
    theirs = (await api.submit_ok("cpu", "lead"))["job_id"]
    response = await api.post("/api/queue/cancel", {"all": True}, "researcher")
    assert sorted(response.json()["cancelled"]) == sorted(mine)
    assert api.state.jobs[theirs].status == "pending"
    everything = await api.post("/api/queue/cancel", {"all": True}, "lead")
    assert theirs in everything.json()["cancelled"]
    assert api.state.status_counts["pending"] == 0 and api.state.status_counts["running"] == 0


@pytest.mark.parametrize(("body", "status"), [
    ({}, 422), ({"job_ids": []}, 422), ({"all": True, "job_ids": ["x"]}, 422),
    ({"job_ids": "abc"}, 422), ({"everything": True}, 422),
])
async def test_bad_bulk_cancel_bodies(api, body, status) -> None:
    response = await api.post("/api/queue/cancel", body)
    assert response.status_code == status and response.json()["detail"]


async def test_approve_and_reject_blocked_jobs_only(api) -> None:
    await api.submit_ok("cpu")
    first = (await api.submit_ok("cpu", requires_approval=True))["job_id"]
    second = (await api.submit_ok("cpu", requires_approval=True))["job_id"]
    approved = await api.post(f"/api/queue/{first}/approve")
    assert approved.json() == {"success": True, "job_id": first, "status": "pending"}
    again = await api.post(f"/api/queue/{first}/approve")
    assert again.status_code == 409 and "only blocked jobs" in again.json()["detail"]
    assert (await api.post(f"/api/queue/{first}/reject")).status_code == 409
    rejected = await api.post(f"/api/queue/{second}/reject", reason="too expensive")
    assert rejected.json()["status"] == "rejected"
    entry = (await api.get(f"/api/queue/{second}", include_completed="true")).json()
    assert entry["error_message"] == "too expensive"
    assert (await api.post("/api/queue/nosuchjob/approve")).status_code == 404


async def test_priority_override_moves_a_job_and_can_be_removed(api) -> None:
    await api.make_users("admin", "lead", "researcher")
    await api.submit_ok("cpu", "admin")
    lead_job = (await api.submit_ok("cpu", "lead"))["job_id"]
    job = (await api.submit_ok("cpu", "researcher"))["job_id"]
    raised = await api.post(f"/api/queue/{job}/priority", {"priority": 50}, "lead")
    assert raised.status_code == 200
    assert raised.json() == {"success": True, "job_id": job, "status": "pending", "priority": 10,
                             "priority_override": 50, "effective_priority": 50, "position": 1}
    cleared = (await api.post(f"/api/queue/{job}/priority", {"priority": None}, "admin")).json()
    assert cleared["priority_override"] is None and cleared["position"] == 2
    assert (await api.get(f"/api/queue/{lead_job}", "admin")).json()["position"] == 1


@pytest.mark.parametrize("body", [{"priority": 101}, {"priority": -1}, {"priority": "high"},
                                  {}, {"priority": 5, "reason": "x"}])
async def test_bad_priorities_are_422(api, body) -> None:
    await api.submit_ok("cpu")
    job = (await api.submit_ok("cpu"))["job_id"]
    response = await api.post(f"/api/queue/{job}/priority", body)
    assert response.status_code == 422, response.text


async def test_priority_of_a_running_job_is_409(api) -> None:
    job = (await api.submit_ok("cpu"))["job_id"]
    response = await api.post(f"/api/queue/{job}/priority", {"priority": 5})
    assert response.status_code == 409


async def test_concurrency_get_and_seed_post(api) -> None:
    assert (await api.get("/api/queue/concurrency")).json() == DEFAULT_SETTINGS
    response = await api.post("/api/queue/concurrency",
                              {"max_concurrent": 10, "user_max_concurrent": 3})
    assert response.status_code == 200
    assert response.json() == {**DEFAULT_SETTINGS, "max_concurrent": 10, "user_max_concurrent": 3}
    assert (await api.get("/api/queue/stats")).json()["max_concurrent"] == 10
    [changed] = events_of(api, "queue.settings_changed")
    assert changed.event.settings.user_max_concurrent == 3


async def test_local_gpu_limit_null_means_unlimited_and_omitted_means_unchanged(api) -> None:
    set_six = await api.post("/api/queue/concurrency",
                             {"local_gpu_max_concurrent": 6, "local_job_max_concurrent": 2})
    assert set_six.json()["local_gpu_max_concurrent"] == 6
    other = await api.post("/api/queue/concurrency", {"enable_fair_share": True})
    assert other.json()["local_gpu_max_concurrent"] == 6
    assert other.json()["local_job_max_concurrent"] == 2
    unlimited = await api.post("/api/queue/concurrency", {"local_gpu_max_concurrent": None})
    assert unlimited.json()["local_gpu_max_concurrent"] is None
    assert unlimited.json()["enable_fair_share"] is True


@pytest.mark.parametrize("body", [
    {"max_concurrent": 0}, {"user_max_concurrent": -2}, {"local_gpu_max_concurrent": 0},
    {"enable_fair_share": "yes"}, {"max_concurrent": 1.5}, {"starvation_threshold_minutes": 0},
    {"approval_cost_threshold": -1}, {"max_concurent": 3}, {"max_concurrent": None},
    {"starvation_threshold_minutes": 1e-310},
])
async def test_bad_limits_are_422_and_change_nothing(api, body) -> None:
    response = await api.post("/api/queue/concurrency", body)
    assert response.status_code == 422, response.text
    assert list(body)[0] in response.json()["detail"]
    assert events_of(api, "queue.settings_changed") == []


async def test_raising_a_limit_starts_waiting_jobs(api) -> None:
    await api.submit_ok("cpu")
    waiting = (await api.submit_ok("cpu"))["job_id"]
    await api.post("/api/queue/concurrency", {"local_job_max_concurrent": 2})
    assert api.state.jobs[waiting].status == "running"


async def wait_until_first(api, job_id: str) -> None:
    """Read the job's position until aging has put it first (a read runs no pass)."""
    deadline = time.monotonic() + 30.0
    while (await api.get(f"/api/queue/position/{job_id}", "admin")).json()["position"] != 1:
        assert time.monotonic() < deadline, "aging never put the job first"
        await anyio.sleep(0.05)


async def test_process_runs_a_pass_and_names_what_it_started(data_dir) -> None:
    """Time alone can make a job startable: aging lifts a researcher's 1-GPU job above the
    lead's 3-GPU job whose reservation held it back. No change runs a pass then; POST
    /api/queue/process does, and names the job it started. (The periodic pass, which
    would do the same, is set far out so that the answer is the test's to see.)"""
    async with open_api(data_dir, tick_seconds=3600.0) as api:
        await api.make_users("admin", "lead", "researcher")
        # aging off while the queue is built: how fast the build goes decides nothing
        await api.post("/api/queue/concurrency",
                       {"local_job_max_concurrent": 4, "starvation_boost": 0}, "admin")
        await api.submit_ok("pair", "admin")  # GPUs 0 and 1
        freed = (await api.submit_ok("sleeper", "admin", num_processes=2))["job_id"]  # 2, 3
        low = (await api.submit_ok("sleeper", "researcher"))["job_id"]  # priority 10
        high = (await api.submit_ok("sleeper", "lead", num_processes=3))["job_id"]  # 20
        stopped = await api.post(f"/api/queue/{freed}/cancel", who="admin")
        assert stopped.json()["status"] == "cancelled"
        # GPUs 2 and 3 are free: the lead's job, first, needs 3 and reserves them
        why = (await api.get(f"/api/queue/{low}/explain", "admin")).json()
        assert why["position"] == 2
        assert why["reasons"][0]["code"] == "reserved_for_higher_priority"
        idle = await api.post("/api/queue/process", who="admin")
        assert idle.status_code == 200
        assert idle.json() == {"success": True, "dispatched": 0, "job_ids": []}

        # Aging on: with a boost of 20 each job reaches 30 one threshold after it was
        # queued, and then the researcher's job, queued first, leads. The threshold ends
        # three seconds after this change (a margin for a slow machine), so the change's
        # own pass still sees the old order.
        queued_at = datetime.fromisoformat(
            (await api.get(f"/api/queue/{low}", "admin")).json()["queued_at"]).timestamp()
        threshold = time.time() - queued_at + 3.0
        aging = await api.post("/api/queue/concurrency", {
            "starvation_boost": 20, "starvation_threshold_minutes": threshold / 60}, "admin")
        assert aging.status_code == 200, aging.text
        assert api.state.jobs[low].status == "pending"
        await wait_until_first(api, low)
        assert api.state.jobs[low].status == "pending"  # startable now, not started yet

        response = await api.post("/api/queue/process", who="admin")
        assert response.status_code == 200
        assert response.json() == {"success": True, "dispatched": 1, "job_ids": [low]}
        entry = (await api.get(f"/api/queue/{low}", "admin")).json()
        assert entry["status"] == "running" and entry["allocated_gpus"] == [2]
        assert api.state.jobs[high].status == "pending"
        again = (await api.post("/api/queue/process", who="admin")).json()
        assert again == {"success": True, "dispatched": 0, "job_ids": []}


def backdated_log(data_dir, *jobs: tuple[str, float]) -> None:
    """A log holding jobs submitted and cancelled ``age`` seconds ago."""
    log = EventLog(data_dir / "events.db")
    spec = JobSpec(config_name="cpu", command=("true",), num_processes=0)
    now = time.time()
    for job_id, age in jobs:
        for event, at in ((JobSubmitted(job_id=job_id, user_id=0, spec=spec, priority=30),
                           now - age), (JobCancelled(job_id=job_id), now - age + 1)):
            log.append([seal(log.last_hash, log.last_seq + 1, at, "user:0:local-admin", None,
                             None, event)])
    log.close()


async def test_seed_cleanup_removes_old_finished_entries_only(data_dir) -> None:
    day = 86400.0
    backdated_log(data_dir, ("oldjob000001", 40 * day), ("newjob000001", 5 * day))
    async with open_api(data_dir) as api:
        active = (await api.submit_ok("cpu"))["job_id"]
        response = await api.post("/api/queue/cleanup", days=30)
        assert response.status_code == 200
        assert response.json() == {"success": True, "deleted": 1, "days": 30}
        assert (await api.get("/api/queue/oldjob000001")).status_code == 404
        listed = (await api.get("/api/queue", include_completed="true")).json()["entries"]
        assert {e["job_id"] for e in listed} == {active, "newjob000001"}
        again = (await api.post("/api/queue/cleanup", days=30)).json()
        assert again == {"success": True, "deleted": 0, "days": 30}
        week = (await api.post("/api/queue/cleanup", days=1)).json()
        assert week["deleted"] == 1 and api.state.jobs[active].status == "running"
        # the log keeps every event: the audit export still has the purged jobs
        export = await api.client.get("/api/audit/export", params={"job_id": "oldjob000001"})
        assert export.status_code == 200
        lines = [json.loads(line) for line in export.text.splitlines() if line]
        assert [line["type"] for line in lines] == [
            "job.submitted", "job.cancelled", "queue.entries_purged"]
        assert [line["data"].get("job_id") for line in lines] == ["oldjob000001"] * 2 + [None]
        assert lines[-1]["data"]["job_ids"] == ["oldjob000001"]
        assert (await api.post("/api/queue/cleanup")).json()["days"] == 30


@pytest.mark.parametrize("days", ["0", "366", "-3", "week"])
async def test_cleanup_days_out_of_range_is_422(api, days) -> None:
    response = await api.post("/api/queue/cleanup", days=days)
    assert response.status_code == 422 and "days" in response.json()["detail"]
