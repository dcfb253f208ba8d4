"""POST /api/queue/submit over HTTP: the seed's four statuses, dry runs, idempotency,
and every way a submission can be refused (never a 500, never an event)."""

from __future__ import annotations

import msgspec
import pytest

pytestmark = pytest.mark.anyio

SUBMIT_FIELDS = {"success", "job_id", "status", "allocated_gpus", "allocated_worker_id",
                 "queue_position", "requires_approval", "reason"}


def submitted_events(api) -> list:
    return [r for r in api.runtime.event_log.read() if r.type == "job.submitted"]


async def test_seed_running_then_queued(api) -> None:
    first = await api.submit("pair", no_wait=False, any_gpu=False)
    assert first.status_code == 201
    body = first.json()
    assert set(body) == SUBMIT_FIELDS
    assert body["success"] is True and body["status"] == "running"
    assert body["allocated_gpus"] == [0, 1] and body["queue_position"] is None
    assert len(body["job_id"]) == 12 and body["job_id"].isalnum() and body["job_id"].islower()

    second = await api.submit_ok("sleeper")
    assert second["status"] == "queued"
    assert second["queue_position"] == 1
    assert second["allocated_gpus"] is None
    assert "local_job_max_concurrent" in second["reason"]
    assert api.state.jobs[second["job_id"]].status == "pending"


async def test_seed_rejected_with_no_wait_queues_nothing(api) -> None:
    await api.submit_ok("sleeper")
    response = await api.submit("sleeper", no_wait=True)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "rejected" and body["job_id"] is None
    assert body["success"] is False and body["reason"]
    assert len(api.state.jobs) == 1
    assert len(submitted_events(api)) == 1


async def test_no_wait_that_can_start_runs(api) -> None:
    body = await api.submit_ok("sleeper", no_wait=True)
    assert body["status"] == "running" and body["allocated_gpus"] == [0]


async def test_seed_blocked_by_request_and_by_cost(api) -> None:
    await api.make_users("admin", "researcher")
    asked = await api.submit_ok("cpu", "researcher", requires_approval=True)
    assert asked["status"] == "blocked" and asked["requires_approval"] is True
    assert asked["reason"] == "approval was requested at submission"
    costly = await api.submit_ok("costly", "researcher")
    assert costly["status"] == "blocked"
    assert "approval_cost_threshold" in costly["reason"]
    # admins are exempt from the cost rule
    admin = await api.submit_ok("costly", "admin")
    assert admin["status"] in ("running", "queued")


async def test_dry_run_writes_nothing_and_says_what_would_happen(api) -> None:
    before = api.state.last_seq
    would_run = (await api.submit("pair", dry_run=True)).json()
    assert would_run["job_id"] is None and would_run["status"] == "running"
    assert would_run["allocated_gpus"] == [0, 1]
    assert api.state.last_seq == before  # nothing runs yet, so nothing else writes
    await api.submit_ok("sleeper")
    response = await api.submit("sleeper", dry_run=True)
    assert response.status_code == 200
    would_wait = response.json()
    assert would_wait["status"] == "queued" and would_wait["queue_position"] == 1
    blocked = (await api.submit("cpu", dry_run=True, requires_approval=True)).json()
    assert blocked["status"] == "blocked" and blocked["job_id"] is None
    assert blocked["requires_approval"] is True
    assert blocked["reason"] == "approval was requested at submission"  # the rule's own words
    # with no_wait, the answer that submission would get: refused, nothing queued
    refused = await api.submit("sleeper", dry_run=True, no_wait=True)
    assert refused.status_code == 200
    assert (refused.json()["status"], refused.json()["success"]) == ("rejected", False)
    assert refused.json()["reason"]
    assert len(submitted_events(api)) == 1


async def test_idempotent_submit_same_body_same_job_other_body_409(api) -> None:
    first = await api.submit_ok("cpu", idempotency_key="run-7", metadata={"run_name": "a"})
    again = await api.submit("cpu", idempotency_key="run-7", metadata={"run_name": "a"})
    assert again.status_code == 200
    assert again.json()["job_id"] == first["job_id"]
    assert again.json()["status"] == first["status"]
    other = await api.submit("cpu", idempotency_key="run-7", metadata={"run_name": "b"})
    assert other.status_code == 409
    assert "run-7" in other.json()["detail"]
    # defaults written out are the same request as defaults left out
    same = await api.submit("cpu", idempotency_key="run-7", metadata={"run_name": "a"},
                            target="auto", no_wait=False)
    assert same.status_code == 200 and same.json()["job_id"] == first["job_id"]
    assert len(submitted_events(api)) == 1


async def test_only_a_keyed_submit_keeps_a_request_hash(api) -> None:
    keyed = await api.submit_ok("cpu", idempotency_key="run-8")
    plain = await api.submit_ok("cpu")
    hashes = {r.event.job_id: r.event.request_hash for r in submitted_events(api)}
    assert len(hashes[keyed["job_id"]]) == 64  # sha256, hex
    assert hashes[plain["job_id"]] is None  # no key: nothing to compare a replay with


async def test_idempotency_keys_are_per_user(api) -> None:
    await api.make_users("admin", "researcher")
    mine = await api.submit_ok("cpu", "admin", idempotency_key="k")
    theirs = await api.submit_ok("cpu", "researcher", idempotency_key="k")
    assert mine["job_id"] != theirs["job_id"]


async def test_the_event_carries_resolved_spec_actor_and_request_id(api) -> None:
    await api.make_users("admin", "researcher")
    response = await api.client.post(
        "/api/queue/submit", json={"config_name": "pair", "metadata": {"run_name": "x"}},
        headers={**api.auth("researcher"), "X-Request-ID": "req-abc-123"},
    )
    assert response.status_code == 201
    assert response.headers["x-request-id"] == "req-abc-123"
    [event] = submitted_events(api)
    assert event.correlation_id == "req-abc-123"
    assert event.actor == f"user:{api.user_ids['researcher']}:researcher"
    assert event.event.spec.command == ("sleep", "60")
    assert event.event.spec.device_ids == (0, 1)
    assert event.event.metadata == {"run_name": "x"}
    # the dispatch the submission caused carries the same correlation id
    dispatched = [r for r in api.runtime.event_log.read() if r.type == "job.dispatched"]
    assert dispatched and dispatched[0].correlation_id == "req-abc-123"


async def test_a_generated_request_id_is_echoed_on_answers_and_errors(api) -> None:
    response = await api.get("/api/queue/stats")
    assert len(response.headers["x-request-id"]) == 16
    missing = await api.get("/api/queue/nosuchjob123")
    assert missing.status_code == 404 and len(missing.headers["x-request-id"]) == 16
    assert missing.headers["x-request-id"] != response.headers["x-request-id"]
    odd = await api.client.get("/api/queue/stats", headers={"X-Request-ID": "no spaces, please"})
    assert odd.headers["x-request-id"] != "no spaces, please"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"config_name": "nope"}, 404, "no config named 'nope'"),
        ({"config_name": "sleeper", "num_processes": 5}, 422, "never start"),
        ({"config_name": "sleeper", "device_ids": [7]}, 422, "not in the GPU inventory"),
        ({"config_name": "sleeper", "num_processes": 1, "device_ids": [0, 1]}, 422,
         "num_processes is 1"),
        ({"config_name": "sleeper", "target": "worker"}, 422, "no remote worker"),
        ({"config_name": "sleeper", "target": "cloud"}, 422, "cloud provider"),
        ({"config_name": "sleeper", "target": "mars"}, 422, "target"),
        ({"config_name": "sleeper", "num_processes": -1}, 422, "num_processes"),
        ({"config_name": "sleeper", "num_processes": "two"}, 422, "num_processes"),
        ({"config_name": "sleeper", "no_wiat": True}, 422, "unknown field `no_wiat`"),
        ({"config_name": "sleeper", "max_attempts": 0}, 422, "max_attempts"),
        ({"config_name": "sleeper", "estimated_cost": -1}, 422, "estimated_cost"),
        ({"config_name": "sleeper", "metadata": [1, 2]}, 422, "metadata"),
        ({"num_processes": 1}, 422, "config_name"),
        ({"config_name": ""}, 422, "config_name"),
        ([1, 2, 3], 422, "object"),
    ],
)
async def test_bad_submissions_are_clear_4xx_and_write_nothing(api, body, status, words) -> None:
    before = api.state.last_seq  # nothing runs, so nothing else writes
    response = await api.client.post("/api/queue/submit", json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert api.state.last_seq == before


async def test_metadata_over_64_kib_is_422(api) -> None:
    response = await api.submit("cpu", metadata={"blob": "x" * (64 * 1024)})
    assert response.status_code == 422
    assert "64 KiB" in response.json()["detail"]
    assert submitted_events(api) == []


async def test_body_over_1_mib_is_413(api) -> None:
    body = msgspec.json.encode({"config_name": "cpu", "metadata": {"blob": "x" * (1024 * 1024)}})
    response = await api.client.post("/api/queue/submit", content=body,
                                     headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "1 MiB" in response.json()["detail"]


@pytest.mark.parametrize("raw", [b"{bad", b'{"config_name": "cpu",}', b"\xff\xfe", b"nul"])
async def test_malformed_json_is_400(api, raw) -> None:
    response = await api.client.post("/api/queue/submit", content=raw,
                                     headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize(("method", "path", "raw"), [
    ("post", "/api/queue/submit", b'{"config_name": "cpu", "metadata": {"a": "\xff"}}'),
    ("post", "/api/queue/submit", b'{"config_name": "cpu", "metadata": {"\xff": 1}}'),
    ("post", "/api/queue/submit", b'{"config_name": "cpu", "idempotency_key": "k\xc3"}'),
    ("post", "/api/queue/concurrency", b'{"max_concurrent": 3, "\xff": 1}'),
    ("post", "/api/queue/cancel", b'{"job_ids": ["\xff"]}'),
    ("post", "/api/users", b'{"name": "\xff", "level": "viewer"}'),
    ("put", "/api/configs/odd", b'{"command": ["\xff"]}'),
    # a wrong type before the bad string: still the 400, not a 422 or a 500
    ("post", "/api/queue/concurrency", b'{"max_concurrent": "3", "x": "\xff"}'),
    ("post", "/api/queue/submit", b'{"config_name": 5, "metadata": {"a": "\xff"}}'),
    ("post", "/api/queue/submit", b'{"config_name": "cpu", "nope": 1, "k": "\xff"}'),
    ("post", "/api/queue/abcdefghijkl/priority", b'{"priority": "\xff"}'),
])
async def test_a_string_that_is_not_utf8_is_400(api, method, path, raw) -> None:
    before = api.state.last_seq
    response = await api.client.request(method.upper(), path, content=raw,
                                        headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == (
        "malformed JSON body: a string in it is not valid UTF-8")
    assert api.state.last_seq == before


@pytest.mark.parametrize(("path", "raw"), [
    ("/api/queue/submit", b'{"config_name": "cpu", "metadata": {"a": 1e400}}'),
    ("/api/queue/submit", b'{"config_name": "cpu", "estimated_cost": 1e400}'),
    ("/api/queue/concurrency", b'{"max_concurrent": ' + b"9" * 5000 + b"}"),
])
async def test_a_number_too_large_for_any_value_is_422(api, path, raw) -> None:
    """Well-formed JSON, so not a 400: an invalid value (SPEC section 7), and nothing
    is written."""
    before = api.state.last_seq
    response = await api.client.post(path, content=raw,
                                     headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "out of range" in response.json()["detail"]
    assert api.state.last_seq == before


@pytest.mark.parametrize("path", ["/api/queue/submit", "/api/queue/concurrency"])
async def test_json_nested_too_deeply_is_400(api, path) -> None:
    depth = 100_000  # well under 1 MiB, far deeper than any decoder recurses
    raw = b'{"config_name": "cpu", "metadata": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    response = await api.client.post(path, content=raw,
                                     headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "nested too deeply" in response.json()["detail"]
    assert submitted_events(api) == []


async def test_missing_body_is_400(api) -> None:
    response = await api.client.post("/api/queue/submit")
    assert response.status_code == 400
    assert "JSON body" in response.json()["detail"]


async def test_a_config_changed_later_does_not_change_the_job(api) -> None:
    job = await api.submit_ok("cpu")
    changed = await api.client.put("/api/configs/cpu", json={"command": ["true"],
                                                             "num_processes": 0})
    assert changed.status_code == 200
    assert api.state.jobs[job["job_id"]].spec.command == ("sleep", "60")
    later = await api.submit_ok("cpu")
    assert api.state.jobs[later["job_id"]].spec.command == ("true",)


async def test_an_invalid_config_file_is_422_naming_the_file(api, data_dir) -> None:
    (data_dir / "configs" / "broken.toml").write_text("command = [\n")
    response = await api.submit("broken")
    assert response.status_code == 422
    assert "broken.toml" in response.json()["detail"]
    (data_dir / "configs" / "typo.toml").write_text('comand = ["x"]\n')
    response = await api.submit("typo")
    assert response.status_code == 422
    assert "comand" in response.json()["detail"]


async def test_the_body_may_override_either_gpu_field_of_the_config(api) -> None:
    """The ``pair`` config runs on GPUs 0 and 1; a body may ask for one GPU, or for others."""
    await api.post("/api/queue/concurrency", {"local_job_max_concurrent": 4})
    one = await api.submit_ok("pair", num_processes=1)
    assert (one["status"], one["allocated_gpus"]) == ("running", [0])
    elsewhere = await api.submit_ok("pair", device_ids=[3])
    assert (elsewhere["status"], elsewhere["allocated_gpus"]) == ("running", [3])
    entry = (await api.get(f"/api/queue/{elsewhere['job_id']}")).json()
    assert entry["num_processes"] == 1
