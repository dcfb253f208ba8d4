"""Local execution through a real ``gpuyard serve`` process over HTTP (tests/serverproc.py):
system status and job logs, and a server SIGKILLed while its jobs run."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverproc import ServerProcess, kill_job_processes
from test_local_support import SETTLE, Jobs, gpu_holding_violations

from service.executors.run_files import RunFiles


def eventually(probe: Callable[[], Any], what: str, timeout: float = SETTLE) -> Any:
    """Poll ``probe`` until it returns something truthy (a safety net, not a timing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.05)


def write_config(data_dir: Path, name: str, command: list[str], **fields: Any) -> None:
    lines = [f"command = {json.dumps(command)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    (data_dir / "configs").mkdir(parents=True, exist_ok=True)
    (data_dir / "configs" / f"{name}.toml").write_text("\n".join(lines) + "\n")


class Api:
    def __init__(self, url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url, headers=headers, timeout=30.0)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        assert response.status_code == status, (method, path, response.status_code,
                                                response.text)
        return response

    def submit(self, config: str, **body: Any) -> str:
        answer = self.ok("POST", "/api/queue/submit", 201,
                         json={"config_name": config, "target": "local", **body}).json()
        return str(answer["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return self.ok("GET", f"/api/queue/{job_id}").json()  # type: ignore[no-any-return]

    def status_of(self, job_id: str, *statuses: str) -> dict[str, Any] | None:
        job = self.job(job_id)
        return job if job["status"] in statuses else None


@pytest.fixture
def jobs(tmp_path: Path) -> Jobs:
    return Jobs(tmp_path / "jobs")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    data = tmp_path / "data"
    server = ServerProcess(data, gpus="4xA100:40")
    try:
        yield server
    finally:
        server.kill()
        kill_job_processes(data)


def test_system_status_and_logs(server: ServerProcess, jobs: Jobs) -> None:
    data = server.data_dir
    write_config(data, "talker", jobs.command("--wait"), num_processes=2)
    server.start()
    admin = Api(server.url)
    job_id = admin.submit("talker")
    seen = eventually(lambda: jobs.seen(job_id), "the job ran")

    status = admin.ok("GET", "/api/system/status", params={"include_allocation": "true"}).json()
    assert set(status) == {"timestamp", "load_avg_5min", "memory_percent", "gpus",
                           "gpu_inventory", "gpu_allocation"}
    assert 0 < status["memory_percent"] < 100 and status["load_avg_5min"] >= 0
    assert status["gpu_inventory"]["backend"] == "spec"
    assert status["gpu_inventory"]["count"] == 4
    assert [gpu["index"] for gpu in status["gpus"]] == [0, 1, 2, 3]
    assert status["gpus"][0]["utilization_percent"] is None  # no NVML for a declared inventory
    allocation = status["gpu_allocation"]
    held = [int(i) for i in seen["CUDA_VISIBLE_DEVICES"].split(",")]
    assert allocation["allocated_gpus"] == held == admin.job(job_id)["allocated_gpus"]
    assert allocation["available_gpus"] == [i for i in range(4) if i not in held]
    assert allocation["running_local_jobs"] == 1
    assert allocation["devices"][held[0]] == {
        "index": held[0], "name": "A100", "memory_gb": 40.0, "allocated": True, "job_id": job_id}
    plain = admin.ok("GET", "/api/system/status").json()
    assert "gpu_allocation" not in plain

    logs = admin.ok("GET", f"/api/queue/{job_id}/logs")
    assert logs.headers["content-type"] == "text/plain; charset=utf-8"
    assert logs.text == f"job {job_id} running on {seen['CUDA_VISIBLE_DEVICES']}\n"
    jobs.release(job_id)
    eventually(lambda: admin.status_of(job_id, "completed"), "the job completed")
    full = admin.ok("GET", f"/api/queue/{job_id}/logs").text
    assert full.splitlines() == [f"job {job_id} running on {seen['CUDA_VISIBLE_DEVICES']}",
                                 f"job {job_id} exits with 0"]
    assert admin.ok("GET", f"/api/queue/{job_id}/logs", params={"tail": 1}).text == (
        f"job {job_id} exits with 0\n")
    assert admin.ok("GET", f"/api/queue/{job_id}/logs", params={"tail": 50}).text == full

    for bad in ("0", "-1", "x"):
        answer = admin.ok("GET", f"/api/queue/{job_id}/logs", 422, params={"tail": bad})
        assert "tail" in answer.json()["detail"]
    size = len(full.encode())
    assert admin.ok("GET", f"/api/queue/{job_id}/logs", params={"offset": size - 5}).content == (
        full.encode()[-5:])
    for past_the_end in (size, 2**62):  # a follower at the end, or far beyond it: nothing
        assert admin.ok("GET", f"/api/queue/{job_id}/logs",
                        params={"offset": past_the_end}).content == b""
    for bad in ("-1", str(2**63)):
        answer = admin.ok("GET", f"/api/queue/{job_id}/logs", 422, params={"offset": bad})
        assert "offset" in answer.json()["detail"]
    assert "no job" in admin.ok("GET", "/api/queue/nosuchjob/logs", 404).json()["detail"]
    after = admin.ok("GET", "/api/system/status", params={"include_allocation": "true"}).json()
    assert after["gpu_allocation"]["allocated_gpus"] == []

    # once users exist: own jobs, or any job for leads and admins
    root = admin.ok("POST", "/api/users", 201, json={"name": "root", "level": "admin"}).json()
    admin = Api(server.url, root["token"])
    tokens = {
        level: admin.ok("POST", "/api/users", 201, json={"name": level, "level": level}).json()
        ["token"] for level in ("researcher", "lead")
    }
    researcher, lead = Api(server.url, tokens["researcher"]), Api(server.url, tokens["lead"])
    assert researcher.ok("GET", f"/api/queue/{job_id}/logs", 403).json()["detail"]
    assert lead.ok("GET", f"/api/queue/{job_id}/logs").text == full
    own = researcher.submit("talker")
    assert researcher.ok("GET", f"/api/queue/{own}/logs").status_code == 200
    assert Api(server.url).ok("GET", f"/api/queue/{job_id}/logs", 401).json()["detail"]
    assert Api(server.url).ok("GET", "/api/system/status", 401).json()["detail"]
    jobs.release(own)
    eventually(lambda: admin.status_of(own, "completed"), "the researcher's job completed")


def test_sigkilled_server_recovers_its_jobs_over_http(server: ServerProcess, jobs: Jobs) -> None:
    data = server.data_dir
    write_config(data, "early", jobs.command("--wait", "--exit", "7"), num_processes=2)
    write_config(data, "late", jobs.command("--wait"), num_processes=2)
    write_config(data, "quick", jobs.command(), num_processes=2)
    server.start()
    api = Api(server.url)
    api.ok("POST", "/api/queue/concurrency", json={"local_job_max_concurrent": 2,
                                                   "user_max_concurrent": 5})
    early, late, queued = api.submit("early"), api.submit("late"), api.submit("quick")
    eventually(lambda: jobs.seen(early) and jobs.seen(late), "both jobs run")
    before = {job_id: api.job(job_id) for job_id in (early, late, queued)}
    assert before[queued]["status"] == "pending"
    late_seen = jobs.seen(late)

    server.kill()
    jobs.release(early)  # it ends while the server is down: only its wrapper sees it
    record = eventually(lambda: RunFiles(data / "runs", early).exit_record(1),
                        "early's exit code")

    server.start()
    api = Api(server.url)
    finished = eventually(lambda: api.status_of(early, "failed"), "early recorded")
    assert finished["exit_code"] == 7 and finished["attempt"] == 1
    # when it ended, not when the restarted server learned it
    completed_at = datetime.fromisoformat(finished["completed_at"].replace("Z", "+00:00"))
    assert abs(completed_at.timestamp() - record.ended_at) < 1e-3
    ran = eventually(lambda: api.status_of(queued, "completed"), "the queued job ran")
    assert ran["allocated_gpus"] == before[early]["allocated_gpus"]
    adopted = api.job(late)
    assert (adopted["status"], adopted["attempt"]) == ("running", 1)
    assert jobs.seen(late) == late_seen  # the same process: not started again

    jobs.release(late)
    done = eventually(lambda: api.status_of(late, "completed"), "the adopted job completed")
    assert done["exit_code"] == 0
    server.stop()
    assert jobs.conflicts() == ""
    assert gpu_holding_violations(data / "events.db") == []
