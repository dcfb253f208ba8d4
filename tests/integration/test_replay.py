"""The replay debugger over real logs: one the engine wrote, small ones built event by event,
and the recorded fixtures in ``fixtures/``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cli_runner import gpuyard, one_error_line
from recorded_day import record_busy_day
from scenario import ALICE, BOB, DAVE, SCHEDULER, VIEWER, World

from events.log import EventLog
from events.types import JobCompleted, JobDispatched
from service.audit import read_records, source_rows
from service.replay import (
    ReplayError,
    check,
    explain_at,
    moment_view,
    parse_overrides,
    replay_until,
    what_if,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FIXTURE_LOGS = sorted(FIXTURES.glob("*.jsonl"))


def records(path: Path) -> list:
    return list(read_records(source_rows(path)))


def write_log(world: World, path: Path) -> Path:
    log = EventLog(path)
    log.append(world.records)
    log.close()
    return path


@pytest.fixture(scope="module")
def day_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_busy_day(tmp_path_factory.mktemp("replay") / "events.db")


# ---------------------------------------------------------------- a point in time


@pytest.fixture
def small_log(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """Two GPUs: alice's 2-GPU job runs, bob's 1-GPU job waits, then runs when hers ends."""
    world = World(gpu_count=2, local_job_max_concurrent=2)
    world.submit(ALICE, "a", now=100.0, num_processes=2)
    world.schedule(100.0)
    world.submit(BOB, "b", now=200.0, num_processes=1)
    world.schedule(200.0)
    marks = {"b_waiting": len(world.records)}
    world.record([JobCompleted(job_id="a")], "system:executor", 900.0)
    world.schedule(900.0)
    marks["b_running"] = len(world.records)
    return write_log(world, tmp_path / "small.db"), marks


def test_until_seq_shows_the_queue_stats_and_gpus_then(small_log) -> None:
    path, marks = small_log
    view = moment_view(replay_until(records(path), until_seq=marks["b_waiting"]))
    assert [(p["position"], p["job_id"]) for p in view["queue"]["pending"]] == [(1, "b")]
    assert [(r["job_id"], r["gpus"]) for r in view["queue"]["running"]] == [("a", [0, 1])]
    assert view["stats"]["queue_depth"] == 1 and view["stats"]["running"] == 1
    assert view["gpu_allocation"]["allocated_gpus"] == [0, 1]
    assert view["gpu_allocation"]["available_gpus"] == []
    later = moment_view(replay_until(records(path)))
    assert later["queue"]["pending"] == []
    assert [(r["job_id"], r["gpus"]) for r in later["queue"]["running"]] == [("b", [0])]


def test_until_time_and_explain_at_that_point(small_log) -> None:
    path, _ = small_log
    moment = replay_until(records(path), until_at=500.0)
    assert moment.now == 500.0
    explanation = explain_at(moment, "b")
    assert (explanation.status, explanation.position) == ("pending", 1)
    assert explanation.reasons[0].code == "gpus_busy"
    assert explain_at(replay_until(records(path)), "b").reasons[0].code == "running"
    with pytest.raises(ReplayError):
        explain_at(moment, "nope")


def test_cli_until_seq_json_and_tables(small_log) -> None:
    path, marks = small_log
    result = gpuyard("replay", "--db", str(path), "--until-seq", str(marks["b_waiting"]),
                     "--format", "json")
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["seq"] == marks["b_waiting"]
    assert view["queue"]["pending"][0]["job_id"] == "b"
    table = gpuyard("replay", "--db", str(path), "--until-seq", str(marks["b_waiting"]))
    assert table.returncode == 0, table.stderr
    for heading in ("pending (1)", "running (1)", "blocked (0)", "stats", "GPU allocation"):
        assert heading in table.stdout
    explained = gpuyard("replay", "--db", str(path), "--until", "1970-01-01T00:08:20Z",
                        "--explain", "b")
    assert explained.returncode == 0, explained.stderr
    assert "gpus_busy" in explained.stdout


# ---------------------------------------------------------------- --check


def test_check_finds_no_difference_in_a_log_the_engine_wrote(day_db: Path) -> None:
    report = check(records(day_db))
    assert report.differences == []
    dispatches = [r for r in records(day_db) if isinstance(r.event, JobDispatched)]
    assert report.dispatches == len(dispatches) > 20
    assert report.passes >= 10


def test_check_reports_a_dispatch_the_scheduler_would_not_make(tmp_path: Path) -> None:
    world = World(gpu_count=2, local_job_max_concurrent=2)
    world.submit(ALICE, "first", now=10.0, num_processes=1)
    world.submit(BOB, "second", now=11.0, num_processes=1)
    # a pass that started the second job on GPU 1 and skipped the first one
    world.record([JobDispatched(job_id="second", gpus=(1,))], SCHEDULER, 12.0)
    report = check(records(write_log(world, tmp_path / "bad.db")))
    differs = [d for d in report.differences if d.kind == "differs"]
    assert len(differs) == 1
    assert differs[0].seq == len(world.records)
    assert [(d.job_id, d.gpus) for d in differs[0].recorded] == [("second", (1,))]
    assert [(d.job_id, d.gpus) for d in differs[0].decided] == [("first", (0,)), ("second", (1,))]


def test_check_reports_a_commit_after_which_a_pass_would_start_a_job(tmp_path: Path) -> None:
    world = World(gpu_count=1)
    world.submit(ALICE, "never", now=10.0, num_processes=1)  # and no pass ran
    report = check(records(write_log(world, tmp_path / "missed.db")))
    assert [(d.kind, [x.job_id for x in d.decided]) for d in report.differences] == [
        ("missed", ["never"])
    ]


def test_cli_check_exit_status(day_db: Path, tmp_path: Path) -> None:
    good = gpuyard("replay", "--db", str(day_db), "--check")
    assert good.returncode == 0, good.stderr
    assert "no differences" in good.stdout
    world = World(gpu_count=2, local_job_max_concurrent=2)
    world.submit(ALICE, "first", now=10.0, num_processes=1)
    world.submit(BOB, "second", now=11.0, num_processes=1)
    world.record([JobDispatched(job_id="second", gpus=(1,))], SCHEDULER, 12.0)
    bad = gpuyard("replay", "--db", str(write_log(world, tmp_path / "bad.db")), "--check")
    assert bad.returncode == 1
    assert "second[1]" in bad.stdout and "first[0]" in bad.stdout
    assert "1970-01-01 00:00:12 UTC" in bad.stdout  # times read as times, as elsewhere
    assert len(bad.stderr.strip().splitlines()) == 1
    once = World(gpu_count=1)
    once.submit(ALICE, "never", now=10.0, num_processes=1)  # and no pass ran
    missed = gpuyard("replay", "--db", str(write_log(once, tmp_path / "missed.db")), "--check")
    assert missed.returncode == 1
    assert re.search(r"^ *1 difference *$", missed.stdout, re.MULTILINE), missed.stdout
    assert missed.stderr == "gpuyard: 1 scheduling decision differs from what was recorded\n"


@pytest.mark.parametrize("log", FIXTURE_LOGS, ids=[p.name for p in FIXTURE_LOGS])
def test_check_finds_no_difference_in_the_recorded_fixtures(log: Path) -> None:
    report = check(records(log))
    assert report.events > 0
    assert report.differences == [], report.differences[:5]


# ---------------------------------------------------------------- --what-if


def _all(report) -> tuple[float, float]:
    row = report.rows[0]
    assert row.group == "all"
    return row.recorded.mean_seconds, row.what_if.mean_seconds


def test_what_if_with_no_change_reproduces_what_happened(day_db: Path) -> None:
    report = what_if(records(day_db), {})
    for row in report.rows:
        assert row.what_if == row.recorded, row.name
    assert report.what_if_utilisation == report.recorded_utilisation
    assert report.refused == {}


def test_what_if_more_concurrency_shortens_the_waits(day_db: Path) -> None:
    report = what_if(records(day_db), parse_overrides(["max_concurrent=4"]))
    recorded, replayed = _all(report)
    assert replayed < recorded
    assert report.settings["max_concurrent"] == 4
    assert report.what_if_utilisation.utilisation > report.recorded_utilisation.utilisation
    assert {row.group for row in report.rows} == {"all", "user", "team"}
    assert {row.name for row in report.rows if row.group == "team"} == {"alpha", "beta"}


def test_what_if_less_concurrency_lengthens_the_waits(day_db: Path) -> None:
    recorded, replayed = _all(what_if(records(day_db), {"max_concurrent": 1}))
    assert replayed > recorded


def test_what_if_counts_requests_the_new_settings_refuse(day_db: Path) -> None:
    report = what_if(records(day_db), {"local_gpu_max_concurrent": 1})
    assert report.refused.get("Submit", 0) > 0  # 2- and 4-GPU jobs could never start


def test_what_if_keeps_an_approval_the_submitter_asked_for(tmp_path: Path) -> None:
    """Alice asked for approval of a job that also costs more than the threshold; nobody
    approved it. A higher threshold lifts the cost rule, not her request: it still waits.
    Bob's job was blocked by its cost alone: under the higher threshold it starts."""
    world = World(gpu_count=1, local_job_max_concurrent=2)
    world.submit(ALICE, "asked", now=0.0, estimated_cost=75.0, requires_approval=True)
    world.submit(BOB, "costly", now=0.0, estimated_cost=75.0)
    world.schedule(0.0)
    assert [world.state.jobs[j].approval_reason for j in ("asked", "costly")] == [
        "approval was requested at submission",
        "estimated_cost 75 exceeds approval_cost_threshold 50",
    ]
    log = records(write_log(world, tmp_path / "asked.db"))
    report = what_if(log, {"approval_cost_threshold": 1000.0})
    started = {row.name: row.what_if.started for row in report.rows if row.group == "user"}
    assert started == {str(ALICE.user_id): 0, str(BOB.user_id): 1}


@pytest.mark.parametrize("bad", [["max_concurrent"], ["max_concurrent=0"], ["nope=1"],
                                 ["max_concurrent=ten"], ["enable_fair_share=2"]])
def test_what_if_settings_are_checked(bad: list[str]) -> None:
    with pytest.raises(ReplayError):
        parse_overrides(bad)


def test_cli_what_if_side_by_side(day_db: Path) -> None:
    result = gpuyard("replay", "--db", str(day_db), "--what-if", "max_concurrent=4",
                     "user_max_concurrent=3", "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["overrides"] == {"max_concurrent": 4, "user_max_concurrent": 3}
    everyone = report["rows"][0]
    assert everyone["what_if"]["mean_seconds"] < everyone["recorded"]["mean_seconds"]
    table = gpuyard("replay", "--db", str(day_db), "--what-if", "max_concurrent=4")
    assert "mean wait (recorded)" in table.stdout and "GPU utilisation" in table.stdout


def test_what_if_replays_aging_the_way_the_engine_ticks(tmp_path: Path) -> None:
    """Vera's viewer job is held behind Alice's 2-GPU job until aging lifts it level with
    hers (60 s steps); a tick pass then starts it on the free GPU. Without aging it waits
    until Alice's job has run."""
    world = World(gpu_count=2, local_job_max_concurrent=3, starvation_threshold_minutes=1.0)
    world.submit(BOB, "r1", now=0.0, num_processes=1)
    world.schedule(0.0)
    world.submit(DAVE, "r2", now=0.0, num_processes=1)
    world.schedule(0.0)
    world.submit(VIEWER, "low", now=0.5, num_processes=1)
    world.schedule(0.5)
    world.submit(ALICE, "wide", now=1.0, num_processes=2)
    world.schedule(1.0)
    for at, job_id in ((2.0, "r2"), (60.5, None), (5000.0, "r1"), (6000.0, "low"),
                       (7000.0, "wide")):
        if job_id is not None:
            world.record([JobCompleted(job_id=job_id)], "system:executor", at)
        world.schedule(at)
    assert world.state.jobs["low"].started_at == 60.5
    log = records(write_log(world, tmp_path / "aging.db"))
    assert check(log).differences == []

    def wait_of(report, actor) -> float:  # type: ignore[no-untyped-def]
        row = next(r for r in report.rows if r.name == str(actor.user_id))  # no user events
        return row.what_if.mean_seconds

    as_recorded = what_if(log, {})
    assert wait_of(as_recorded, VIEWER) == pytest.approx(60.0)
    assert wait_of(as_recorded, ALICE) == pytest.approx(5999.0)
    no_aging = what_if(log, {"starvation_boost": 0})
    assert wait_of(no_aging, ALICE) == pytest.approx(4999.0)  # starts when r1 ends
    assert wait_of(no_aging, VIEWER) == pytest.approx(5999.5)  # after alice's 1000 s run


@pytest.mark.parametrize("log", FIXTURE_LOGS, ids=[p.name for p in FIXTURE_LOGS])
def test_what_if_with_no_change_reproduces_every_recorded_fixture(log: Path) -> None:
    report = what_if(records(log), {})
    assert report.rows[0].recorded.started > 0
    for row in report.rows:
        assert row.what_if == row.recorded, row.name
    assert report.what_if_utilisation == report.recorded_utilisation
    assert report.refused == {}


def _busy_fixture() -> Path | None:
    return next((p for p in FIXTURE_LOGS if "busy" in p.name), None)


@pytest.mark.skipif(_busy_fixture() is None, reason="the busy-day fixture is not recorded yet")
def test_what_if_higher_max_concurrent_on_the_busy_day_fixture() -> None:
    log = _busy_fixture()
    assert log is not None
    recorded = records(log)
    settings = replay_until(recorded).state.settings
    # that day max_concurrent is the limit that binds (local_job_max_concurrent is above it)
    assert settings.local_job_max_concurrent > settings.max_concurrent
    report = what_if(recorded, {"max_concurrent": settings.max_concurrent * 2})
    before, after = _all(report)
    assert after < before
    assert report.what_if_utilisation.utilisation > report.recorded_utilisation.utilisation


# ---------------------------------------------------------------- a broken log


def test_replay_refuses_a_broken_chain_unless_told(day_db: Path, tmp_path: Path) -> None:
    from service.audit import write_export

    export = tmp_path / "day.jsonl"
    with open(export, "wb") as out:
        write_export(source_rows(day_db), out)
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    lines[7]["at"] += 1.0
    export.write_text("".join(json.dumps(line) + "\n" for line in lines))
    line = one_error_line(gpuyard("replay", "--db", str(export), "--check"))
    assert "seq 8" in line
    forced = gpuyard("replay", "--db", str(export), "--until-seq", "20", "--no-verify")
    assert forced.returncode == 0, forced.stderr


@pytest.mark.parametrize("mode", [[], ["--check"], ["--what-if", "max_concurrent=9"]])
def test_an_unverified_log_whose_events_disagree_is_named_in_one_line(
    day_db: Path, tmp_path: Path, mode: list[str]
) -> None:
    """--no-verify replays an altered log as far as its events agree; where they stop
    agreeing (a job dispatched that was never submitted) is one line naming the seq."""
    from service.audit import write_export

    export = tmp_path / "day.jsonl"
    with open(export, "wb") as out:
        write_export(source_rows(day_db), out)
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    dispatched = next(line for line in lines if line["type"] == "job.dispatched")
    dispatched["data"]["job_id"] = "nosuchjob"
    export.write_text("".join(json.dumps(line) + "\n" for line in lines))
    line = one_error_line(gpuyard("replay", "--db", str(export), "--no-verify", *mode))
    assert f"seq {dispatched['seq']} (job.dispatched) does not follow" in line
    assert "altered" in line and "audit verify" in line


@pytest.mark.parametrize(
    "args",
    [
        ["replay"],  # no --db
        ["replay", "--db", "/nonexistent.db"],
        ["replay", "--db", "README.md"],
        ["replay", "--db", "{db}", "--check", "--what-if", "max_concurrent=2"],
        ["replay", "--db", "{db}", "max_concurrent=2"],
        ["replay", "--db", "{db}", "--what-if", "max_concurrent=zero"],
        ["replay", "--db", "{db}", "--what-if", "cancel_grace_seconds=99999"],  # as POST
        ["replay", "--db", "{db}", "--explain", "nope"],
        ["replay", "--db", "{db}", "--until", "yesterday-ish"],
        # two moments (the state after seq 5 is not the state at a later time)
        ["replay", "--db", "{db}", "--until-seq", "5", "--until", "2100-01-01T00:00:00Z"],
    ],
)
def test_cli_replay_errors_are_one_line(args: list[str], day_db: Path) -> None:
    one_error_line(gpuyard(*[a.replace("{db}", str(day_db)) for a in args]))


def test_a_progress_bar_on_a_terminal_only(day_db: Path) -> None:
    import os
    import pty
    import subprocess
    import sys
    import threading

    from cli_runner import REPO

    command = [sys.executable, "-m", "service.cli", "replay", "--db", str(day_db), "--what-if",
               "max_concurrent=3", "--format", "json"]
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=secondary,
                            stdin=subprocess.DEVNULL)
    os.close(secondary)
    drawn = bytearray()

    def pump() -> None:
        try:
            while chunk := os.read(primary, 65536):
                drawn.extend(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=60)
    reader.join(timeout=5)
    os.close(primary)
    assert proc.returncode == 0
    assert json.loads(out)["overrides"] == {"max_concurrent": 3}  # stdout stays clean JSON
    assert b"replaying" in drawn
    piped = gpuyard("replay", "--db", str(day_db), "--what-if", "max_concurrent=3")
    assert piped.returncode == 0 and piped.stderr == ""
