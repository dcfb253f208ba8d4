"""The queue's read routes over HTTP: listing order, visibility, filters and paging,
stats and ``me`` in the seed's shapes, position, one entry, explain."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from datetime import datetime

import anyio
import pytest
from api_harness import open_api

from events.envelope import seal
from events.log import EventLog
from events.types import JobCompleted, JobDispatched, JobSpec, JobSubmitted

pytestmark = pytest.mark.anyio

ENTRY_FIELDS = {
    "job_id", "user_id", "team_id", "config_name", "priority", "priority_override", "status",
    "position", "queued_at", "started_at", "completed_at", "estimated_cost", "requires_approval",
    "attempt", "max_attempts", "error_message", "metadata", "allocated_gpus", "job_type",
    "num_processes", "effective_priority", "exit_code", "worker_id",
}


async def given_a_queue(api) -> dict[str, str]:
    """Researcher's job runs; admin, lead and two researcher jobs wait; one is blocked."""
    await api.make_users()
    jobs = {}
    jobs["running"] = (await api.submit_ok("cpu", "researcher"))["job_id"]
    jobs["r1"] = (await api.submit_ok("cpu", "researcher", metadata={"run_name": "r1"}))["job_id"]
    jobs["r2"] = (await api.submit_ok("cpu", "researcher"))["job_id"]
    jobs["lead"] = (await api.submit_ok("cpu", "lead"))["job_id"]
    jobs["admin"] = (await api.submit_ok("cpu", "admin"))["job_id"]
    jobs["blocked"] = (await api.submit_ok("cpu", "researcher", requires_approval=True))["job_id"]
    return jobs


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [entry["job_id"] for entry in response.json()["entries"]]


async def test_pending_in_position_order_then_the_rest_newest_first(api) -> None:
    jobs = await given_a_queue(api)
    response = await api.get("/api/queue", "admin")
    assert ids(response) == [jobs["admin"], jobs["lead"], jobs["r1"], jobs["r2"],
                             jobs["blocked"], jobs["running"]]
    body = response.json()
    assert [e["position"] for e in body["entries"]] == [1, 2, 3, 4, None, None]
    assert (body["total_pending"], body["total_running"], body["total_blocked"]) == (4, 1, 1)
    assert [e["effective_priority"] for e in body["entries"][:4]] == [30, 20, 10, 10]


async def test_entries_have_every_field_with_utc_iso_times(api) -> None:
    jobs = await given_a_queue(api)
    entries = {e["job_id"]: e for e in (await api.get("/api/queue", "admin")).json()["entries"]}
    for entry in entries.values():
        assert set(entry) == ENTRY_FIELDS
        assert entry["queued_at"].endswith("Z")
        assert datetime.fromisoformat(entry["queued_at"]).utcoffset().total_seconds() == 0
    running = entries[jobs["running"]]
    assert running["status"] == "running" and running["started_at"].endswith("Z")
    assert running["allocated_gpus"] == [] and running["job_type"] == "local"
    assert running["num_processes"] == 0 and running["attempt"] == 1
    assert running["estimated_cost"] == 0.0  # not given: the seed schema's default
    assert running["max_attempts"] == 3 and running["user_id"] == api.user_ids["researcher"]
    assert entries[jobs["r1"]]["metadata"] == {"run_name": "r1"}
    assert entries[jobs["r1"]]["allocated_gpus"] is None
    assert entries[jobs["blocked"]]["requires_approval"] is True


async def test_researchers_see_their_own_entries_with_global_positions(api) -> None:
    jobs = await given_a_queue(api)
    response = await api.get("/api/queue", "researcher")
    assert ids(response) == [jobs["r1"], jobs["r2"], jobs["blocked"], jobs["running"]]
    assert [e["position"] for e in response.json()["entries"]] == [3, 4, None, None]
    assert ids(await api.get("/api/queue", "viewer")) == []
    refused = await api.get("/api/queue", "researcher", user_id=api.user_ids["lead"])
    assert refused.status_code == 403
    mine = await api.get("/api/queue", "researcher", user_id=api.user_ids["researcher"])
    assert len(ids(mine)) == 4
    # leads and admins may filter by user
    lead_view = await api.get("/api/queue", "lead", user_id=api.user_ids["researcher"])
    assert ids(lead_view) == ids(mine)


async def test_status_filter_limit_and_offset(api) -> None:
    jobs = await given_a_queue(api)
    assert ids(await api.get("/api/queue", "admin", status="running")) == [jobs["running"]]
    assert ids(await api.get("/api/queue", "admin", status="blocked")) == [jobs["blocked"]]
    pending = ids(await api.get("/api/queue", "admin", status="pending"))
    assert pending == ids(await api.get("/api/queue", "admin", status="queued"))
    assert len(pending) == 4
    page = await api.get("/api/queue", "admin", limit=2, offset=3)
    assert ids(page) == [jobs["r2"], jobs["blocked"]]
    assert page.json()["entries"][0]["position"] == 4
    assert ids(await api.get("/api/queue", "admin", limit=2, offset=5)) == [jobs["running"]]
    assert ids(await api.get("/api/queue", "admin", offset=50)) == []
    mine_page = await api.get("/api/queue", "researcher", limit=1, offset=1)
    assert ids(mine_page) == [jobs["r2"]] and mine_page.json()["entries"][0]["position"] == 4


@pytest.mark.parametrize("params", [
    {"status": "finished"}, {"limit": 0}, {"limit": 501}, {"offset": -1}, {"limit": "many"},
    {"include_completed": "perhaps"}, {"user_id": "alice"},
])
async def test_bad_listing_parameters_are_422(api, params) -> None:
    response = await api.get("/api/queue", **params)
    assert response.status_code == 422, response.text
    assert list(params)[0] in response.json()["detail"]


async def test_finished_jobs_are_hidden_unless_asked_for(api) -> None:
    jobs = await given_a_queue(api)
    cancelled = await api.post(f"/api/queue/{jobs['r2']}/cancel", who="admin")
    assert cancelled.json()["status"] == "cancelled"
    assert jobs["r2"] not in ids(await api.get("/api/queue", "admin"))
    everything = ids(await api.get("/api/queue", "admin", include_completed="true"))
    assert everything[:3] == [jobs["admin"], jobs["lead"], jobs["r1"]]
    assert everything[3:] == [jobs["blocked"], jobs["r2"], jobs["running"]]  # newest first
    assert ids(await api.get("/api/queue", "admin", status="cancelled")) == [jobs["r2"]]
    entry = (await api.get(f"/api/queue/{jobs['r2']}", "admin")).json()
    assert entry["status"] == "cancelled" and entry["completed_at"].endswith("Z")


async def test_seed_stats_shape(api) -> None:
    empty = (await api.get("/api/queue/stats")).json()
    assert empty["avg_wait_seconds"] is None
    assert empty["by_status"] == {"pending": 0, "running": 0}  # the seed's two, always there
    await given_a_queue(api)
    stats = (await api.get("/api/queue/stats", "viewer")).json()
    for key in ("queue_depth", "running", "max_concurrent", "user_max_concurrent",
                "team_max_concurrent", "enable_fair_share", "avg_wait_seconds", "by_status",
                "by_user", "local_gpu_max_concurrent", "local_job_max_concurrent", "local"):
        assert key in stats
    assert stats["queue_depth"] == 4 and stats["running"] == 1
    assert stats["by_status"] == {"pending": 4, "running": 1, "blocked": 1}
    assert stats["by_user"] == {str(api.user_ids["admin"]): 1, str(api.user_ids["lead"]): 1,
                                str(api.user_ids["researcher"]): 3}
    assert stats["max_concurrent"] == 5 and stats["user_max_concurrent"] == 2
    # the running job was dispatched in the very commit that queued it: it waited 0 s
    assert stats["avg_wait_seconds"] == 0.0
    assert stats["local"] == {
        "running_jobs": 1, "pending_jobs": 4, "allocated_gpus": [], "available_gpus": [0, 1, 2, 3],
        "total_gpus": 4, "max_concurrent_gpus": None, "max_concurrent_jobs": 1,
    }


async def test_seed_me_shape(api) -> None:
    jobs = await given_a_queue(api)
    me = (await api.get("/api/queue/me", "researcher")).json()
    assert set(me) == {"pending_count", "running_count", "blocked_count", "best_position",
                       "pending_jobs", "running_jobs"}
    assert (me["pending_count"], me["running_count"], me["blocked_count"]) == (2, 1, 1)
    assert me["best_position"] == 3
    assert [j["job_id"] for j in me["pending_jobs"]] == [jobs["r1"], jobs["r2"]]
    assert [j["position"] for j in me["pending_jobs"]] == [3, 4]
    assert [j["job_id"] for j in me["running_jobs"]] == [jobs["running"]]
    viewer = (await api.get("/api/queue/me", "viewer")).json()
    assert viewer["best_position"] is None and viewer["pending_jobs"] == []


async def test_my_jobs_follow_the_queue_order_when_an_override_reorders_them(api) -> None:
    jobs = await given_a_queue(api)
    raised = await api.post(f"/api/queue/{jobs['r2']}/priority", {"priority": 25}, "lead")
    assert raised.json()["position"] == 2  # behind the admin's job (30), ahead of the lead's
    me = (await api.get("/api/queue/me", "researcher")).json()
    assert [(j["job_id"], j["position"]) for j in me["pending_jobs"]] == [
        (jobs["r2"], 2), (jobs["r1"], 4)]
    assert me["best_position"] == 2
    mine = (await api.get("/api/queue", "researcher")).json()["entries"]
    assert [(e["job_id"], e["position"]) for e in mine][:2] == [(jobs["r2"], 2), (jobs["r1"], 4)]
    second = (await api.get("/api/queue", "researcher", limit=1, offset=1)).json()["entries"]
    assert [(e["job_id"], e["position"]) for e in second] == [(jobs["r1"], 4)]


async def test_position_of_a_job(api) -> None:
    jobs = await given_a_queue(api)
    position = (await api.get(f"/api/queue/position/{jobs['r2']}", "researcher")).json()
    assert set(position) == {"job_id", "position", "status", "priority", "effective_priority",
                             "queued_at", "estimated_wait_seconds"}
    assert position["position"] == 4 and position["status"] == "pending"
    assert position["priority"] == 10 and position["effective_priority"] == 10
    assert position["estimated_wait_seconds"] is None  # nothing has finished yet
    running = (await api.get(f"/api/queue/position/{jobs['running']}", "researcher")).json()
    assert running["position"] is None and running["estimated_wait_seconds"] == 0.0
    missing = await api.get("/api/queue/position/nosuchjob123", "admin")
    assert missing.status_code == 404 and "nosuchjob123" in missing.json()["detail"]


def log_with_one_finished_run(data_dir, seconds: float) -> None:
    """A log holding one job that ran for exactly ``seconds`` and ended a minute ago."""
    log = EventLog(data_dir / "events.db")
    started = float(int(time.time()) - 60 - int(seconds))  # whole seconds: an exact length
    spec = JobSpec(config_name="cpu", command=("true",), num_processes=0)
    for event, at in (
        (JobSubmitted(job_id="finished0001", user_id=0, spec=spec, priority=30), started),
        (JobDispatched(job_id="finished0001"), started),
        (JobCompleted(job_id="finished0001", exit_code=0), started + seconds),
    ):
        log.append([seal(log.last_hash, log.last_seq + 1, at, "user:0:local-admin", None,
                         None, event)])
    log.close()


async def test_estimated_wait_grows_by_one_mean_run_per_place_in_the_queue(data_dir) -> None:
    """The runs of the last day averaged 600 s and one local job runs at a time, so the
    job at position N waits (N - 1) * 600 s. Nothing runs while the four jobs wait (each
    needs 2 GPUs and local GPUs were capped at 1 after they were submitted, blocked, and
    before they were approved), so no running job's remaining time enters the estimate."""
    log_with_one_finished_run(data_dir, 600.0)
    async with open_api(data_dir) as api:
        jobs = [(await api.submit_ok("pair", requires_approval=True))["job_id"]
                for _ in range(4)]
        capped = await api.post("/api/queue/concurrency", {"local_gpu_max_concurrent": 1})
        assert capped.status_code == 200, capped.text
        for job_id in jobs:
            approved = await api.post(f"/api/queue/{job_id}/approve")
            assert approved.json()["status"] == "pending", approved.text
        assert api.state.status_counts["running"] == 0
        bodies = [(await api.get(f"/api/queue/position/{job_id}")).json() for job_id in jobs]
        assert [body["position"] for body in bodies] == [1, 2, 3, 4]
        waits = [body["estimated_wait_seconds"] for body in bodies]
        assert waits == pytest.approx([0.0, 600.0, 1200.0, 1800.0], abs=0.1)


async def test_one_entry_and_unknown_job(api) -> None:
    jobs = await given_a_queue(api)
    entry = (await api.get(f"/api/queue/{jobs['lead']}", "lead")).json()
    assert set(entry) == ENTRY_FIELDS and entry["position"] == 2
    assert (await api.get("/api/queue/abcdefghijkl", "admin")).status_code == 404


async def test_explain_says_why_a_job_waits(api) -> None:
    jobs = await given_a_queue(api)
    why = (await api.get(f"/api/queue/{jobs['r1']}/explain", "researcher")).json()
    assert why["job_id"] == jobs["r1"] and why["status"] == "pending" and why["position"] == 3
    codes = [reason["code"] for reason in why["reasons"]]
    assert codes[0] == "local_job_limit" and "jobs_ahead" in codes
    details = {reason["code"]: reason["detail"] for reason in why["reasons"]}
    assert details["local_job_limit"] == (
        "1 local job is running, local_job_max_concurrent is 1")
    assert details["jobs_ahead"] == "2 pending jobs are ahead of it"
    blocked = (await api.get(f"/api/queue/{jobs['blocked']}/explain", "admin")).json()
    assert [r["code"] for r in blocked["reasons"]] == ["awaiting_approval"]
    running = (await api.get(f"/api/queue/{jobs['running']}/explain", "admin")).json()
    assert running["position"] is None and running["reasons"][0]["code"] == "running"


async def test_gpu_jobs_wait_for_gpus(api) -> None:
    await api.post("/api/queue/concurrency", {"local_job_max_concurrent": 4})
    first = await api.submit_ok("pair")
    second = await api.submit_ok("pair")
    assert first["status"] == "running" and second["status"] == "queued"
    why = (await api.get(f"/api/queue/{second['job_id']}/explain")).json()
    assert why["reasons"][0]["code"] == "gpus_busy"
    other = await api.submit_ok("sleeper", num_processes=2)
    assert other["status"] == "running" and other["allocated_gpus"] == [2, 3]


def _write_end_comes_and_goes(fifo) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(OSError):  # ENXIO: nobody reads it, as it should be
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("replacement", ["directory", "fifo", "symlink", "run-dir-symlink",
                                         "run-dir-file"])
async def test_logs_of_a_job_whose_output_file_was_replaced_are_a_409(
    api, tmp_path, replacement
) -> None:
    """A job could put anything in place of its output log, or of its run directory: a
    directory broke the stream half-way (or gave a 500 with ``tail``), a FIFO never
    answered, a symlink (of the log or of the directory) served a file not the job's."""
    job_id = (await api.submit_ok("cpu"))["job_id"]
    await api.wait_started(job_id)
    run_dir = api.runtime.runs_dir / job_id
    output = run_dir / "output.log"
    assert (await api.get(f"/api/queue/{job_id}/logs")).status_code == 200
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "output.log").write_text("not the job's output\n")
    if replacement.startswith("run-dir"):
        shutil.rmtree(run_dir)
        if replacement == "run-dir-symlink":
            run_dir.symlink_to(elsewhere)
        else:
            run_dir.write_text("a file")
        named = run_dir
    else:
        output.unlink()
        if replacement == "directory":
            output.mkdir()
        elif replacement == "fifo":
            os.mkfifo(output)
            # should a read block on the FIFO after all, a writer that comes and goes ends
            # it: the test then fails on its status instead of hanging the run
            unblock = threading.Timer(5.0, _write_end_comes_and_goes, (output,))
            unblock.daemon = True
            unblock.start()
        else:
            output.symlink_to(elsewhere / "output.log")
        named = output
    for params in ({}, {"tail": 5}):
        response = await api.get(f"/api/queue/{job_id}/logs", **params)
        assert response.status_code == 409, response.text
        detail = response.json()["detail"]
        assert str(named) in detail and "replaced it" in detail, detail
