"""The gpuyard CLI as a subprocess against a real server on a free loopback port.

One server (4 fake A100s, the default limits: one local job at a time) is shared by
the module; every test leaves the queue empty for the next.
``test_queue_limits_process_cleanup`` runs a server of its own, with a seeded log and
the periodic pass set far out (see ``ServerWithoutTicks``).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from cli_runner import gpuyard, one_error_line
from serverproc import REPO_ROOT, ServerProcess, free_port

from events.envelope import seal
from events.log import EventLog
from events.types import JobCancelled, JobSpec, JobSubmitted
from service.audit import ChainBroken, verify_file, verify_partial

CONFIGS = {
    # prints three lines, then exits
    "quick": {"command": [sys.executable, "-c",
                          "import time\nfor i in range(3):\n print('step', i, flush=True)\n"
                          " time.sleep(0.2)"], "num_processes": 1},
    # holds its GPU until cancelled
    "hold": {"command": [sys.executable, "-c", "import time; time.sleep(300)"],
             "num_processes": 1},
}


def _toml(config: dict) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in config.items())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("cli") / "data"
    (data / "configs").mkdir(parents=True)
    for name, config in CONFIGS.items():
        (data / "configs" / f"{name}.toml").write_text(_toml(config))
    with ServerProcess(data, gpus="4xA100:40") as proc:
        yield proc


def wait_until(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _stats(server: ServerProcess) -> dict:
    return httpx.get(server.url + "/api/queue/stats").json()


@pytest.fixture
def cli(server: ServerProcess) -> Iterator:  # type: ignore[type-arg]
    """``cli(*args)`` runs gpuyard against the server; the queue is emptied afterwards."""

    def run(*args: str):  # type: ignore[no-untyped-def]
        return gpuyard("--server", server.url, *args)

    yield run
    httpx.post(server.url + "/api/queue/cancel", json={"all": True})
    wait_until(lambda: _stats(server)["running"] == 0 and _stats(server)["queue_depth"] == 0)


def _job_id(result) -> str:  # type: ignore[no-untyped-def]
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["job_id"]


def _status(server: ServerProcess, job_id: str) -> str:
    return httpx.get(f"{server.url}/api/queue/{job_id}").json()["status"]


# ---------------------------------------------------------------- jobs


def test_submit_then_list_as_table_and_json_with_a_nested_field(cli, server) -> None:
    submitted = cli("jobs", "submit", "quick", "--label", "run_name=lr-3e-4", "--label",
                    "sweep=a")
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.startswith("job ") and "running on GPU 0" in submitted.stdout
    job_id = submitted.stdout.split()[1].rstrip(":")

    listed = cli("jobs", "list", "--format", "json", "-o", "job_id,status,metadata.run_name")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    mine = [row for row in rows if row["job_id"] == job_id]
    assert list(mine[0]) == ["job_id", "status", "metadata.run_name"]
    assert mine[0]["metadata.run_name"] == "lr-3e-4"

    table = cli("jobs", "list", "-o", "job_id,config_name,metadata.sweep", "-l", "5")
    assert table.returncode == 0, table.stderr
    line = next(line for line in table.stdout.splitlines() if job_id in line)
    assert line.split() == [job_id, "quick", "a"]

    shown = cli("jobs", "show", job_id, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    entry = json.loads(shown.stdout)
    assert (entry["job_id"], entry["config_name"], entry["metadata"]["sweep"]) == (
        job_id, "quick", "a")
    as_table = cli("jobs", "show", job_id)
    assert as_table.returncode == 0, as_table.stderr
    assert f"job {job_id}" in as_table.stdout and "lr-3e-4" in as_table.stdout

    full = json.loads(cli("jobs", "list", "--format", "json").stdout)
    assert {"job_id", "status", "metadata", "allocated_gpus"} <= set(full[0])

    absent = json.loads(cli("jobs", "list", "--format", "json", "-o", "job_id,metadata.nope")
                        .stdout)  # a nested key a job lacks is only missing
    assert {row["metadata.nope"] for row in absent} == {None}
    for status in ([], ["--status", "rejected"]):  # entries listed, or none
        typo = one_error_line(cli("jobs", "list", "-o", "job_id,statsu", *status))
        assert "'statsu'" in typo and "status" in typo


def test_the_cli_knows_every_field_of_a_queue_entry() -> None:
    from service.api.models import QueueEntry
    from service.cli import ENTRY_FIELDS

    assert ENTRY_FIELDS == QueueEntry.__struct_fields__


def test_logs_follow_until_the_job_ends(cli, server) -> None:
    job_id = _job_id(cli("jobs", "submit", "quick", "--format", "json"))
    followed = cli("jobs", "logs", job_id, "-f", "--interval", "0.1")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "step 0\nstep 1\nstep 2\n"
    assert f"job {job_id} ended: completed" in followed.stderr
    tail = cli("jobs", "logs", job_id, "--tail", "1")
    assert tail.stdout == "step 2\n"


def test_logs_follow_rides_out_a_server_restart(tmp_path: Path) -> None:
    """Jobs outlive the server (SPEC section 8), so a follower waits for it to come back
    and goes on where it was: every line once, then the job's end."""
    data = tmp_path / "data"
    (data / "configs").mkdir(parents=True)
    (data / "configs" / "two.toml").write_text(_toml({
        "command": [sys.executable, "-c", "import time\nprint('first', flush=True)\n"
                    "time.sleep(4)\nprint('second', flush=True)"],
        "num_processes": 1}))
    with ServerProcess(data, gpus="1") as server:
        job_id = json.loads(gpuyard("--server", server.url, "jobs", "submit", "two",
                                    "--format", "json").stdout)["job_id"]
        log = data / "runs" / job_id / "output.log"
        wait_until(lambda: log.exists() and b"first" in log.read_bytes())
        follower = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--server", server.url, "jobs", "logs",
             job_id, "-f", "--interval", "0.1"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("GPUYARD_")})
        try:
            assert follower.stdout is not None
            first = follower.stdout.readline()  # it has printed 'first' and polls on
            server.kill()  # SIGKILL: the job lives on
            time.sleep(0.5)
            server.start()
            out, err = follower.communicate(timeout=60)
        finally:
            follower.kill()
    assert follower.returncode == 0, err
    assert first + out == "first\nsecond\n"
    assert "waiting up to" in err and "the server is back" in err, err
    assert f"job {job_id} ended: completed, exit code 0" in err


def test_status_as_json(cli) -> None:
    result = cli("jobs", "status", "--format", "json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["local"]["total_gpus"] == 4
    assert {"queue_depth", "running", "max_concurrent", "by_status"} <= set(stats)
    table = cli("jobs", "status")
    assert "max_concurrent" in table.stdout and "local total GPUs" in table.stdout


def test_a_waiting_job_explain_dry_run_cancel(cli, server) -> None:
    holder = _job_id(cli("jobs", "submit", "hold", "--format", "json"))
    waiting = cli("jobs", "submit", "quick")
    assert waiting.returncode == 0, waiting.stderr
    assert "queued at position 1" in waiting.stdout
    waiting_id = waiting.stdout.split()[1].rstrip(":")

    explained = cli("jobs", "explain", waiting_id)
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.splitlines()[0] == f"job {waiting_id} is pending at position 1"
    assert "local_job_limit:" in explained.stdout
    reasons = json.loads(cli("jobs", "explain", waiting_id, "--format", "json").stdout)
    assert reasons["reasons"][0]["code"] == "local_job_limit"

    before = _stats(server)["by_status"]
    dry = cli("jobs", "submit", "quick", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would not start now" in dry.stdout and "nothing was submitted" in dry.stdout
    assert _stats(server)["by_status"] == before

    queued = json.loads(cli("jobs", "list", "--status", "queued", "--format", "json").stdout)
    assert [row["job_id"] for row in queued] == [waiting_id]
    cancelled = cli("jobs", "cancel", waiting_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"job {waiting_id}: cancelled"
    assert _status(server, waiting_id) == "cancelled"
    assert _status(server, holder) == "running"


def test_dry_run_that_would_start_names_the_gpus(cli, server) -> None:
    dry = cli("jobs", "submit", "quick", "--dry-run", "--device-ids", "2")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == ["dry run: quick would start now on GPU 2",
                                       "nothing was submitted"]
    cpu = cli("jobs", "submit", "quick", "--dry-run", "--num-processes", "0")
    assert cpu.returncode == 0, cpu.stderr
    assert cpu.stdout.splitlines()[0] == "dry run: quick would start now on no GPU (CPU only)"


def test_cancel_several_and_cancel_all(cli, server) -> None:
    holder = _job_id(cli("jobs", "submit", "hold", "--format", "json"))
    first = _job_id(cli("jobs", "submit", "quick", "--format", "json"))
    second = _job_id(cli("jobs", "submit", "quick", "--format", "json"))
    third = _job_id(cli("jobs", "submit", "quick", "--format", "json"))
    several = cli("jobs", "cancel", first, second)
    assert several.returncode == 0, several.stderr
    assert several.stdout.strip() == f"cancelled 2 jobs: {first}, {second}"
    assert {_status(server, first), _status(server, second)} == {"cancelled"}
    everything = cli("jobs", "cancel", "--all")
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.startswith("cancelled 2 jobs")
    assert holder in everything.stdout and third in everything.stdout
    wait_until(lambda: _status(server, holder) == "cancelled")
    assert _status(server, third) == "cancelled"


def test_no_wait_when_busy_is_one_error_line(cli) -> None:
    _job_id(cli("jobs", "submit", "hold", "--format", "json"))
    line = one_error_line(cli("jobs", "submit", "quick", "--no-wait"))
    assert "not submitted" in line


def test_approve_reject_and_priority(cli, server) -> None:
    blocked = cli("jobs", "submit", "quick", "--requires-approval")
    assert "blocked until an admin approves it" in blocked.stdout
    blocked_id = blocked.stdout.split()[1].rstrip(":")
    rejected_id = _job_id(cli("jobs", "submit", "quick", "--estimated-cost", "1",
                              "--requires-approval", "--format", "json"))
    assert cli("jobs", "reject", rejected_id, "--reason", "too big").returncode == 0
    entry = httpx.get(f"{server.url}/api/queue/{rejected_id}").json()
    assert (entry["status"], entry["error_message"]) == ("rejected", "too big")
    _job_id(cli("jobs", "submit", "hold", "--format", "json"))
    approved = cli("jobs", "approve", blocked_id)
    assert approved.returncode == 0, approved.stderr
    assert _status(server, blocked_id) == "pending"
    bumped = cli("jobs", "priority", blocked_id, "55")
    assert bumped.returncode == 0, bumped.stderr
    assert "priority 55 (override 55)" in bumped.stdout
    assert httpx.get(f"{server.url}/api/queue/{blocked_id}").json()["priority_override"] == 55
    cleared = cli("jobs", "priority", blocked_id, "none")
    assert cleared.returncode == 0, cleared.stderr
    assert "(no override)" in cleared.stdout
    for out_of_range in ("500", "-5"):  # -5 is a value, not an unknown option
        assert f"'{out_of_range}' is not 0-100" in one_error_line(
            cli("jobs", "priority", blocked_id, out_of_range))
    assert "conflict (409)" in one_error_line(cli("jobs", "approve", blocked_id))


# A real server like ``gpuyard serve`` (the app over uvicorn, the local executor, the
# log), with its periodic pass set an hour out: only changes and ``queue process`` run a
# pass, so a job that time alone made startable waits for the command under test.
_SERVE_WITHOUT_TICKS = """
import sys
import uvicorn
from service.api import create_app
from service.logging import configure_logging
from service.runtime import Runtime

configure_logging()
runtime = Runtime(sys.argv[1], sys.argv[2])
runtime.engine.tick_seconds = 3600.0
try:
    uvicorn.run(create_app(runtime), host="127.0.0.1", port=int(sys.argv[3]),
                log_config=None, access_log=False, lifespan="on")
finally:
    runtime.close()
"""


class ServerWithoutTicks(ServerProcess):
    """A :class:`ServerProcess` whose server runs no periodic pass (one an hour)."""

    def argv(self) -> list[str]:
        return [sys.executable, "-c", _SERVE_WITHOUT_TICKS, str(self.data_dir),
                self.gpus or "none", str(self.port)]


def _log_with_an_old_cancelled_job(data_dir: Path, job_id: str, age_days: float) -> None:
    """A log holding one job, submitted and cancelled ``age_days`` ago."""
    log = EventLog(data_dir / "events.db")
    at = time.time() - age_days * 86400.0
    spec = JobSpec(config_name="hold", command=("true",), num_processes=0)
    for event in (JobSubmitted(job_id=job_id, user_id=0, spec=spec, priority=30),
                  JobCancelled(job_id=job_id)):
        log.append([seal(log.last_hash, log.last_seq + 1, at, "user:0:local-admin", None,
                         None, event)])
    log.close()


def test_queue_limits_process_cleanup(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "configs").mkdir(parents=True)
    (data / "configs" / "hold.toml").write_text(_toml(CONFIGS["hold"]))
    _log_with_an_old_cancelled_job(data, "oldjob000001", age_days=40)
    with ServerWithoutTicks(data, gpus="4xA100:40") as server:
        url = server.url

        def cli(*args: str):  # type: ignore[no-untyped-def]
            return gpuyard("--server", url, *args)

        def submit(**fields: object) -> str:
            answer = httpx.post(url + "/api/queue/submit", json={"config_name": "hold", **fields})
            assert answer.status_code == 201, answer.text
            return answer.json()["job_id"]  # type: ignore[no-any-return]

        changed = cli("queue", "limits", "--max-concurrent", "7", "--local-gpu-max-concurrent",
                      "3", "--format", "json")
        assert changed.returncode == 0, changed.stderr
        settings = json.loads(changed.stdout)
        assert (settings["max_concurrent"], settings["local_gpu_max_concurrent"]) == (7, 3)
        reset = json.loads(cli("queue", "limits", "--max-concurrent", "5",
                               "--local-gpu-max-concurrent", "none", "--format", "json").stdout)
        assert (reset["max_concurrent"], reset["local_gpu_max_concurrent"]) == (5, None)
        # each setting's flag is also spelled as its field is named
        fair = json.loads(cli("queue", "limits", "--enable-fair-share", "--format", "json").stdout)
        assert fair["enable_fair_share"] is True
        unfair = json.loads(cli("queue", "limits", "--no-fair-share", "--format", "json").stdout)
        assert unfair["enable_fair_share"] is False
        shown = cli("queue", "limits")
        assert "user_max_concurrent" in shown.stdout
        # aging off while the queue is built: how fast the build goes decides nothing
        built = httpx.post(url + "/api/queue/concurrency",
                           json={"local_job_max_concurrent": 4, "starvation_boost": 0})
        assert built.status_code == 200, built.text

        # GPUs 0-3 busy; a 1-GPU job queued first (priority 10), a 3-GPU job after it (20)
        submit(num_processes=2, device_ids=[0, 1])
        freed = submit(num_processes=2)
        low = submit()
        high = submit(num_processes=3)
        for job_id, priority in ((low, 10), (high, 20)):
            overridden = httpx.post(f"{url}/api/queue/{job_id}/priority",
                                    json={"priority": priority})
            assert overridden.status_code == 200, overridden.text
        stopped = httpx.post(f"{url}/api/queue/{freed}/cancel", timeout=30.0)
        assert stopped.json()["status"] == "cancelled", stopped.text
        # GPUs 2 and 3 are free and reserved for the 3-GPU job: the pass starts nothing
        why = httpx.get(f"{url}/api/queue/{low}/explain").json()
        assert why["reasons"][0]["code"] == "reserved_for_higher_priority"
        idle = cli("queue", "process")
        assert idle.returncode == 0, idle.stderr
        assert idle.stdout.strip() == "dispatched 0 jobs"

        # aging on: one threshold after it was queued, the 1-GPU job leads the queue (both
        # jobs reach 30, it was queued first); the threshold ends 3 s after this change,
        # a margin for a slow machine
        entry = httpx.get(f"{url}/api/queue/{low}").json()
        queued_at = datetime.fromisoformat(entry["queued_at"]).timestamp()
        aging = httpx.post(url + "/api/queue/concurrency", json={
            "starvation_boost": 20,
            "starvation_threshold_minutes": (time.time() - queued_at + 3.0) / 60})
        assert aging.status_code == 200, aging.text
        wait_until(lambda: httpx.get(f"{url}/api/queue/position/{low}").json()["position"] == 1)
        assert _status(server, low) == "pending"  # startable, and nothing has run a pass
        dispatched = cli("queue", "process")
        assert dispatched.returncode == 0, dispatched.stderr
        assert dispatched.stdout.strip() == f"dispatched 1 job: {low}"
        assert _status(server, low) == "running" and _status(server, high) == "pending"

        cleaned = cli("queue", "cleanup", "--days", "30")
        assert cleaned.returncode == 0, cleaned.stderr
        assert cleaned.stdout.startswith("removed 1 finished entry older than 30 days")
        assert httpx.get(f"{url}/api/queue/oldjob000001").status_code == 404
        listed = httpx.get(url + "/api/queue", params={"include_completed": "true"}).json()
        assert "oldjob000001" not in {e["job_id"] for e in listed["entries"]}
        assert freed in {e["job_id"] for e in listed["entries"]}  # finished today: kept


# ---------------------------------------------------------------- audit


def test_export_then_verify_and_a_changed_event_fails(cli, server, tmp_path: Path) -> None:
    _job_id(cli("jobs", "submit", "quick", "--label", "run_name=audited", "--format", "json"))
    export = tmp_path / "audit.jsonl"
    exported = cli("audit", "export", "-o", str(export))
    assert exported.returncode == 0, exported.stderr
    lines = export.read_text().splitlines()
    assert f"exported {len(lines)} events" in exported.stderr
    verified = cli("audit", "verify", str(export))
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"ok: {len(lines)} events")

    events = [json.loads(line) for line in lines]
    target = next(e for e in events if e["type"] == "job.submitted"
                  and e["data"]["metadata"].get("run_name") == "audited")
    target["data"]["metadata"]["run_name"] = "something else"
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("".join(json.dumps(e) + "\n" for e in events))
    line = one_error_line(cli("audit", "verify", str(tampered)))
    assert f"seq {target['seq']}" in line
    with pytest.raises(ChainBroken) as broken:
        verify_file(tampered)
    assert broken.value.seq == target["seq"]


def test_export_csv_and_a_filtered_export(cli, server, tmp_path: Path) -> None:
    wanted = _job_id(cli("jobs", "submit", "quick", "--format", "json"))
    # its events are all written before the exports compare (it ends in about 0.6 s)
    wait_until(lambda: _status(server, wanted) == "completed")
    as_csv = tmp_path / "audit.csv"
    assert cli("audit", "export", "--format", "csv", "-o", str(as_csv)).returncode == 0
    assert verify_file(as_csv).count > 0
    typed = tmp_path / "submitted.jsonl"
    result = cli("audit", "export", "--type", "job.submitted", "--since", "2000-01-01",
                 "-o", str(typed))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in typed.read_text().splitlines()]
    assert rows and {row["type"] for row in rows} == {"job.submitted"}
    assert verify_partial(typed).count == len(rows)
    assert cli("audit", "verify", "--partial", str(typed)).returncode == 0
    everything = cli("audit", "export")
    assert everything.returncode == 0, everything.stderr
    to_stdout = cli("audit", "export", "--job", wanted)
    assert to_stdout.returncode == 0, to_stdout.stderr
    mine = [json.loads(line) for line in to_stdout.stdout.splitlines()]
    assert mine and all(line["data"].get("job_id") == wanted for line in mine)
    assert {"job.submitted", "job.dispatched"} <= {line["type"] for line in mine}
    assert len(mine) < len(everything.stdout.splitlines())
    by_field_name = cli("audit", "export", "--job-id", wanted)
    assert by_field_name.stdout == to_stdout.stdout


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["jobs", "cancel", "nosuchjob"], "not found (404)"),
        (["jobs", "explain", "nosuchjob"], "not found (404)"),
        (["jobs", "logs", "nosuchjob"], "not found (404)"),
        (["jobs", "logs", "nosuchjob", "-f"], "not found (404)"),
        (["jobs", "approve", "nosuchjob"], "not found (404)"),
        (["jobs", "submit", "nosuchconfig"], "not found (404)"),
        (["jobs", "submit", "quick", "--device-ids", "9"], "invalid (422)"),
        (["jobs", "submit", "quick", "--device-ids", "a,b"], "--device-ids"),
        (["jobs", "submit", "quick", "--label", "novalue"], "--label"),
        (["jobs", "submit", "quick", "--target", "worker"], "invalid (422)"),
        (["jobs", "cancel"], "--all"),
        (["jobs", "list", "--status", "sleeping"], "--status"),
        (["jobs", "priority", "x", "high"], "PRIORITY"),
        (["jobs", "priority", "x", "-5", "--bogus"], "No such option '--bogus'"),
        (["queue", "limits", "--cancel-grace-seconds", "3601"], "3601"),
        (["audit", "export", "--since", "last tuesday"], "--since"),
        (["audit", "export", "--until", "nan"], "must be a finite time"),
        (["audit", "export", "--until", "99999999999999999999"], "between the years 1 and 9999"),
        (["audit", "export", "-o", "/tmp"], "it is a directory"),
        (["jobs", "submit", "quick", "--estimated-cost", "nan"], "not a finite number"),
        (["queue", "limits", "--approval-cost-threshold", "inf"], "not a finite number"),
        (["--timeout", "inf", "jobs", "list"], "--timeout"),
        # bytes that are not UTF-8 text, as a shell passes them (Python keeps surrogates)
        (["jobs", "explain", "\udcff"], "not valid UTF-8"),
        (["jobs", "submit", "quick", "--label", "k=\udcff"], "not valid UTF-8"),
        (["audit", "export", "--job-id", "\udcff"], "not valid UTF-8"),
        # an id is one path segment: `?` or `/` in it reaches no other route
        (["jobs", "logs", "?tail=1"], "not found (404)"),
        (["jobs", "cancel", "a/b"], "no job with id 'a/b'"),
        (["jobs", "approve", ".."], "no job with id '..'"),
        # a word that names a route of its own under /api/queue/ is no job's
        (["jobs", "show", "stats"], "no job with id 'stats'"),
        (["jobs", "show", "me", "--format", "json"], "no job with id 'me'"),
        (["jobs", "logs", "concurrency", "-f"], "no job with id 'concurrency'"),
        (["jobs", "cancel", "position"], "no job with id 'position'"),
        (["jobs", "explain", "position"], "no job with id 'position'"),
        (["users", "token", "1", "--revoke", ".."], "'..' cannot be an id"),
        (["jobs", "cancel", ""], "cannot be empty"),
        (["queue", "cleanup", "--days", "0"], "--days"),
        # an unset variable in a script: not the current directory
        (["users", "add", "x", "--level", "admin", "--data-dir", ""], "is empty"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_error_paths_are_one_line(cli, args: list[str], says: str) -> None:
    assert says in one_error_line(cli(*args))


def test_an_answer_that_is_not_json_is_one_line(server) -> None:
    # a query in --server swallows the path: the server answers its HTML panel
    line = one_error_line(gpuyard("--server", server.url + "?x=1", "jobs", "list"))
    assert "not JSON" in line and "gpuyard server" in line


def test_export_into_a_pipe_or_through_a_symlink_keeps_them(cli, tmp_path: Path) -> None:
    """-o into a FIFO writes into it (never replaces it with a file); a symlink stays a
    link and the file it names gets the export."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    piped = cli("audit", "export", "-o", str(fifo))
    reader.join(timeout=30)
    if reader.is_alive():  # nothing wrote into the pipe: open it once so the reader ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert piped.returncode == 0, piped.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert received and received[0].startswith(b'{"seq":1,')
    target, link = tmp_path / "export.jsonl", tmp_path / "latest.jsonl"
    target.write_text("old")
    link.symlink_to(target)
    linked = cli("audit", "export", "-o", str(link))
    assert linked.returncode == 0, linked.stderr
    assert link.is_symlink() and target.read_bytes().startswith(b'{"seq":1,')


@pytest.mark.parametrize("group", [[], ["jobs"], ["queue"], ["users"], ["audit"]])
def test_a_group_alone_shows_its_help_as_help_does(group: list[str]) -> None:
    """`gpuyard jobs` with no command is a request for help, not an error squeezed into
    one line."""
    alone, asked = gpuyard(*group), gpuyard(*group, "--help")
    assert alone.returncode == 0 and alone.stderr == "", alone.stderr
    assert alone.stdout == asked.stdout and alone.stdout.startswith("Usage: gpuyard")
    assert "Commands:" in alone.stdout


def test_server_down_is_one_line() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    for args in (["jobs", "list"], ["audit", "export", "-o", "/tmp/never.jsonl"]):
        line = one_error_line(gpuyard("--server", down, *args))
        assert "cannot reach the gpuyard server" in line
    assert not Path("/tmp/never.jsonl").exists()


@pytest.mark.parametrize(("url", "says"), [
    ("", "the server URL is empty; set --server or GPUYARD_URL"),
    ("http://127.0.0.1:99999", "port 99999 is not 1-65535"),
    ("http://127.0.0.1:8000/api", "without /api (the CLI adds it)"),
    ("ftp://127.0.0.1", "use http:// or https://"),
    ("http://", "it names no host"),
])
def test_a_server_url_that_cannot_be_one_is_named(url: str, says: str) -> None:
    assert says in one_error_line(gpuyard("--server", url, "jobs", "list"))


def test_https_against_a_plain_http_server_says_so(server) -> None:
    line = one_error_line(gpuyard("--server", server.url.replace("http://", "https://"),
                                  "jobs", "list"))
    assert "TLS handshake" in line and "plain http needs an http:// URL" in line


def test_a_change_that_got_no_answer_may_have_been_made() -> None:
    """A server that takes the request and never answers: a read only says it did not
    answer; a submit also says the job may exist, and how to retry safely."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        read = one_error_line(gpuyard("--server", url, "--timeout", "0.5", "jobs", "list"))
        sent = one_error_line(gpuyard("--server", url, "--timeout", "0.5", "jobs", "submit",
                                      "train"))
    assert read == f"gpuyard: error: the gpuyard server at {url} did not answer in time"
    assert sent == (f"gpuyard: error: the gpuyard server at {url} did not answer in time; "
                    "it may have been carried out all the same: look (e.g. `gpuyard jobs "
                    "list`) before trying again (a submit with --idempotency-key is safe to "
                    "repeat)")


# ---------------------------------------------------------------- the server's own log


def test_replay_check_agrees_with_the_live_servers_log(server) -> None:
    """Everything the tests above did (submits, cancels, approvals, priority and limit
    changes, jobs that ran) is in the server's log: the scheduler re-decides it all alike."""
    db = server.data_dir / "events.db"
    result = gpuyard("replay", "--db", str(db), "--check", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["differences"] == []
    assert report["events"] > 0
