"""SPEC sections 2, 3, 5, 6 and 7 as the command handler decides them, given / when / then.

Commands go through ``service.commands.handle``; their events are folded; a domain
error must leave the log exactly as it was.
"""

from __future__ import annotations

from typing import Any

import pytest
from scenario import ADMIN, ALICE, BOB, CAROL, DAVE, LEAD, VIEWER, World

from projections.views import mean_run_seconds, stats
from service.commands import (
    Approve,
    Cancel,
    ChangeSettings,
    Cleanup,
    Conflict,
    CreateUser,
    DomainError,
    ExpireApprovals,
    InvalidRequest,
    IssueToken,
    NotAllowed,
    Reject,
    ReportCancelled,
    ReportExited,
    ReportFailed,
    ReportStarted,
    RevokeToken,
    SetPriority,
    UnknownJob,
    UnknownUser,
    UpdateUser,
    WrongState,
    listing_scope,
)

HOUR = 3600.0
DAY = 86400.0


def refused(world: World, error: type[DomainError], command: Any, actor: Any, now: float) -> str:
    """The command raises ``error`` and writes nothing; returns its detail."""
    before = list(world.records)
    with pytest.raises(error) as raised:
        world.do(command, actor, now=now)
    assert world.records == before
    return raised.value.detail


# ---------------------------------------------------------------- approval (SPEC 5)


@pytest.mark.parametrize(
    ("actor", "options", "settings", "blocked"),
    [
        pytest.param(ALICE, {"requires_approval": True}, {}, True, id="requested"),
        pytest.param(ADMIN, {"requires_approval": True}, {}, True, id="requested-by-admin"),
        pytest.param(ALICE, {"estimated_cost": 50.01}, {}, True, id="cost-over-threshold"),
        pytest.param(LEAD, {"estimated_cost": 60.0}, {}, True, id="lead-not-exempt"),
        pytest.param(ALICE, {"estimated_cost": 50.0}, {}, False, id="cost-at-threshold"),
        pytest.param(ALICE, {"estimated_cost": 10.0}, {}, False, id="cost-under-threshold"),
        pytest.param(ADMIN, {"estimated_cost": 1000.0}, {}, False, id="admin-exempt-from-cost"),
        pytest.param(ALICE, {"estimated_cost": 60.0}, {"approval_cost_threshold": 100.0},
                     False, id="threshold-raised"),
        pytest.param(ALICE, {"estimated_cost": 0.5}, {"approval_cost_threshold": 0.0},
                     True, id="threshold-zero"),
        pytest.param(ALICE, {}, {}, False, id="no-cost-no-approval"),
    ],
)
def test_approval_rules(
    actor: Any, options: dict[str, Any], settings: dict[str, Any], blocked: bool
) -> None:
    world = World(**settings)
    cost = options.pop("estimated_cost", None)
    world.submit(actor, "j", now=0.0, estimated_cost=cost, **options)
    job = world.state.jobs["j"]
    assert job.status == ("blocked" if blocked else "pending")
    assert job.requires_approval is blocked
    if blocked:
        assert world.reasons("j", 1.0) == ["awaiting_approval"]
        assert world.schedule(1.0) == []
    else:
        assert world.schedule(1.0) == ["j"]


@pytest.mark.parametrize(
    ("in_config", "in_body", "cost", "status"),
    [
        pytest.param(10.0, 99.0, 99.0, "blocked", id="body-raises-the-cost"),
        pytest.param(99.0, 10.0, 99.0, "blocked", id="body-cannot-lower-the-cost"),
        pytest.param(None, 99.0, 99.0, "blocked", id="body-gives-the-cost"),
        pytest.param(99.0, None, 99.0, "blocked", id="config-gives-the-cost"),
        pytest.param(None, 10.0, 10.0, "running", id="a-low-stated-cost-runs"),
    ],
)
def test_the_cost_is_the_higher_of_config_and_body(
    in_config: float | None, in_body: float | None, cost: float, status: str
) -> None:
    world = World()
    from scenario import config

    from service.commands import Submit

    command = Submit(job_id="j", config_name="c", config=config(0, None, in_config),
                     estimated_cost=in_body)
    world.do(command, ALICE, now=0.0)
    world.schedule(0.0)
    job = world.state.jobs["j"]
    assert (job.status, job.spec.estimated_cost) == (status, cost)
    if status == "blocked":
        assert "99" in (job.approval_reason or "")


def test_approve_moves_a_blocked_job_to_pending_and_it_then_runs() -> None:
    world = World()
    world.submit(ALICE, "j", now=0.0, requires_approval=True)
    assert world.positions(1.0)["j"] is None
    refused(world, NotAllowed, Approve("j"), LEAD, 1.0)
    world.do(Approve("j"), ADMIN, now=2.0)
    assert world.status("j") == "pending"
    assert world.state.jobs["j"].queued_at == 2.0
    assert world.positions(2.0)["j"] == 1
    assert world.schedule(3.0) == ["j"]
    world.assert_replay_equal()


@pytest.mark.parametrize(
    ("reason", "message"),
    [("budget exceeded", "budget exceeded"), (None, "rejected by root"), ("   ", "rejected by root")],
)
def test_reject_records_the_reason(reason: str | None, message: str) -> None:
    world = World()
    world.submit(ALICE, "j", now=0.0, requires_approval=True)
    refused(world, NotAllowed, Reject("j", "no"), LEAD, 1.0)
    world.do(Reject("j", reason), ADMIN, now=1.0)
    job = world.state.jobs["j"]
    assert (job.status, job.error_message, job.completed_at) == ("rejected", message, 1.0)
    assert world.reasons("j", 2.0) == ["finished"]


@pytest.mark.parametrize(
    ("timeout_hours", "now", "expired"),
    [
        pytest.param(24.0, 24 * HOUR, False, id="exactly-24h-not-yet"),
        pytest.param(24.0, 24 * HOUR + 1, True, id="older-than-24h"),
        pytest.param(0.5, 1799.0, False, id="fractional-timeout-not-yet"),
        pytest.param(0.5, 1801.0, True, id="fractional-timeout-expired"),
    ],
)
def test_approval_expiry(timeout_hours: float, now: float, expired: bool) -> None:
    world = World(approval_timeout_hours=timeout_hours)
    world.submit(ALICE, "old", now=0.0, requires_approval=True)
    world.submit(BOB, "young", now=now - 10.0, requires_approval=True)
    world.do(ExpireApprovals(), now=now)
    job = world.state.jobs["old"]
    if expired:
        assert (job.status, job.error_message) == ("rejected", "approval expired")
    else:
        assert job.status == "blocked"
    assert world.status("young") == "blocked"
    world.assert_replay_equal()


def test_a_priority_change_does_not_save_a_blocked_job_from_expiry() -> None:
    """Expiry walks the blocked jobs oldest first and stops at the first one still in
    time: a priority set on the old job after the young one was submitted must not move
    it behind the young one."""
    world = World(approval_timeout_hours=1.0)
    world.submit(ALICE, "old", now=0.0, requires_approval=True)
    world.submit(BOB, "young", now=600.0, requires_approval=True)
    world.do(SetPriority("old", 50), LEAD, now=900.0)
    world.do(ExpireApprovals(), now=HOUR + 1.0)
    assert world.statuses() == {"old": "rejected", "young": "blocked"}
    world.assert_replay_equal()


def test_approved_jobs_never_expire() -> None:
    world = World()
    world.submit(ALICE, "j", now=0.0, requires_approval=True)
    world.do(Approve("j"), ADMIN, now=10.0)
    world.do(ExpireApprovals(), now=48 * HOUR)
    assert world.status("j") == "pending"


@pytest.mark.parametrize("command", [Approve("j"), Reject("j", "no")], ids=["approve", "reject"])
@pytest.mark.parametrize("state", ["pending", "running", "completed", "rejected", "cancelled"])
def test_only_blocked_jobs_can_be_approved_or_rejected(command: Any, state: str) -> None:
    world = World(local_job_max_concurrent=5)
    world.submit(ALICE, "j", now=0.0, requires_approval=state in ("rejected",))
    if state in ("running", "completed"):
        world.schedule(1.0)
    if state == "completed":
        world.do(ReportExited(job_id="j", exit_code=0), now=2.0)
    if state == "rejected":
        world.do(Reject("j", "no"), ADMIN, now=2.0)
    if state == "cancelled":
        world.do(Cancel(job_ids=("j",)), ALICE, now=2.0)
    assert world.status("j") == state
    detail = refused(world, WrongState, command, ADMIN, 3.0)
    assert state in detail
    refused(world, UnknownJob, type(command)("nope"), ADMIN, 3.0)


# ---------------------------------------------------------------- no_wait and dry_run


def test_no_wait_that_can_start_is_queued_and_starts() -> None:
    world = World(2)
    outcome = world.submit(ALICE, "j", now=0.0, num_processes=1, no_wait=True)
    assert outcome.job_id == "j" and world.event_types()[-1] == "job.submitted"
    assert world.schedule(0.0) == ["j"]


@pytest.mark.parametrize(
    ("local_jobs", "options", "reason"),
    [
        pytest.param(2, {"num_processes": 2}, "gpus_busy", id="gpus-busy"),
        pytest.param(1, {"num_processes": 0}, "local_job_limit", id="local-job-limit"),
        pytest.param(2, {"num_processes": 1, "requires_approval": True}, None,
                     id="needs-approval"),
    ],
)
def test_no_wait_that_cannot_start_is_rejected_and_nothing_is_queued(
    local_jobs: int, options: dict[str, Any], reason: str | None
) -> None:
    world = World(2, local_job_max_concurrent=local_jobs)
    world.submit(BOB, "running", now=0.0, num_processes=1)
    assert world.schedule(0.0) == ["running"]
    before = list(world.records)
    outcome = world.submit(ALICE, "j", now=1.0, no_wait=True, **options)
    assert (outcome.status, outcome.job_id, outcome.events) == ("rejected", None, [])
    if reason is not None:
        assert outcome.placement is not None and outcome.placement.reason is not None
        assert outcome.placement.reason.code == reason
    assert world.records == before and "j" not in world.state.jobs


@pytest.mark.parametrize(
    ("options", "status"),
    [
        pytest.param({"num_processes": 1}, "running", id="would-start"),
        pytest.param({"num_processes": 2}, "queued", id="would-wait"),
        pytest.param({"num_processes": 1, "requires_approval": True}, "blocked", id="would-block"),
        pytest.param({"num_processes": 1, "estimated_cost": 75.0}, "blocked", id="cost-blocks"),
        # with no_wait, what that submission would get: started now, or refused
        pytest.param({"num_processes": 1, "no_wait": True}, "running", id="no-wait-would-start"),
        pytest.param({"num_processes": 2, "no_wait": True}, "rejected", id="no-wait-would-wait"),
        pytest.param({"num_processes": 1, "requires_approval": True, "no_wait": True},
                     "rejected", id="no-wait-would-block"),
    ],
)
def test_dry_run_writes_nothing(options: dict[str, Any], status: str) -> None:
    world = World(2, local_job_max_concurrent=2)
    world.submit(BOB, "running", now=0.0, num_processes=1)
    world.schedule(0.0)
    before = list(world.records)
    outcome = world.submit(ALICE, "j", now=1.0, dry_run=True, **options)
    assert (outcome.status, outcome.job_id, outcome.events) == (status, None, [])
    assert world.records == before and "j" not in world.state.jobs


def test_dry_run_of_a_never_fitting_job_is_refused_too() -> None:
    world = World(2)
    with pytest.raises(InvalidRequest):
        world.submit(ALICE, "j", now=1.0, dry_run=True, num_processes=3)


# ---------------------------------------------------------------- idempotency


def test_idempotency_same_key_same_request_returns_the_original_job() -> None:
    world = World()
    first = world.submit(ALICE, "j1", now=0.0, idempotency_key="k", request_hash="h1")
    before = list(world.records)
    again = world.submit(ALICE, "j2", now=5.0, idempotency_key="k", request_hash="h1")
    assert (first.job_id, again.job_id, again.status, again.events) == ("j1", "j1", "pending", [])
    assert world.records == before and "j2" not in world.state.jobs


def test_idempotency_same_key_other_request_is_a_conflict() -> None:
    world = World()
    world.submit(ALICE, "j1", now=0.0, idempotency_key="k", request_hash="h1")
    before = list(world.records)
    with pytest.raises(Conflict):
        world.submit(ALICE, "j2", now=5.0, idempotency_key="k", request_hash="h2")
    assert world.records == before


def test_idempotency_keys_belong_to_one_user() -> None:
    world = World(local_job_max_concurrent=5)
    world.submit(ALICE, "j1", now=0.0, idempotency_key="k", request_hash="h1")
    outcome = world.submit(BOB, "j2", now=0.0, idempotency_key="k", request_hash="h2")
    assert outcome.job_id == "j2" and world.status("j2") == "pending"
    world.assert_replay_equal()


# ---------------------------------------------------------------- cancel


def started_world() -> World:
    """alice: a1 running, a2 pending, a3 blocked, a4 completed; bob: b1 pending."""
    world = World(max_concurrent=1, user_max_concurrent=5, local_job_max_concurrent=5)
    world.submit(ALICE, "a4", now=0.0)
    world.schedule(0.0)
    world.do(ReportExited(job_id="a4", exit_code=0), now=1.0)
    world.submit(ALICE, "a1", now=2.0)
    world.submit(ALICE, "a2", now=3.0)
    world.submit(ALICE, "a3", now=4.0, requires_approval=True)
    world.submit(BOB, "b1", now=5.0)
    assert world.schedule(6.0) == ["a1"]
    return world


def test_cancel_a_pending_or_blocked_job_is_immediate() -> None:
    world = started_world()
    outcome = world.do(Cancel(job_ids=("a2", "a3")), ALICE, now=10.0)
    assert outcome.job_ids == ["a2", "a3"]
    assert (world.status("a2"), world.status("a3")) == ("cancelled", "cancelled")
    assert world.state.jobs["a2"].completed_at == 10.0


def test_cancel_a_running_job_asks_the_executor_and_its_exit_records_cancelled() -> None:
    world = started_world()
    world.do(Cancel(job_ids=("a1",)), ALICE, now=10.0)
    assert world.event_types()[-1] == "job.cancel_requested"
    assert world.status("a1") == "running" and world.state.jobs["a1"].cancel_requested
    again = world.do(Cancel(job_ids=("a1",)), ALICE, now=11.0)  # asking twice adds nothing
    assert again.events == []
    world.do(ReportExited(job_id="a1", exit_code=-15), now=12.0)
    assert world.status("a1") == "cancelled"
    assert world.schedule(12.0) == ["a2"]  # cancelling frees the slot for the next job


def test_report_cancelled_ends_a_running_job() -> None:
    world = started_world()
    world.do(Cancel(job_ids=("a1",)), ALICE, now=10.0)
    world.do(ReportCancelled(job_id="a1"), now=11.0)
    assert world.status("a1") == "cancelled"
    world.assert_replay_equal()


def test_bulk_cancel_is_atomic() -> None:
    world = started_world()
    detail = refused(world, WrongState, Cancel(job_ids=("a2", "a4")), ALICE, 10.0)
    assert "a4" in detail and "nothing was cancelled" in detail
    refused(world, UnknownJob, Cancel(job_ids=("a2", "zzz")), ALICE, 10.0)
    refused(world, NotAllowed, Cancel(job_ids=("a2", "b1")), ALICE, 10.0)
    assert world.status("a2") == "pending"
    refused(world, InvalidRequest, Cancel(), ALICE, 10.0)
    both = refused(world, InvalidRequest, Cancel(job_ids=("a2",), all=True), ALICE, 10.0)
    assert "not both" in both and world.status("a2") == "pending"


@pytest.mark.parametrize(
    ("actor", "cancelled"),
    [
        pytest.param(ALICE, ["a1", "a2", "a3"], id="researcher-own-jobs"),
        pytest.param(BOB, ["b1"], id="other-researcher-own-jobs"),
        pytest.param(VIEWER, [], id="viewer-without-jobs"),
        pytest.param(LEAD, ["a1", "a2", "a3", "b1"], id="lead-every-job"),
        pytest.param(ADMIN, ["a1", "a2", "a3", "b1"], id="admin-every-job"),
    ],
)
def test_cancel_all(actor: Any, cancelled: list[str]) -> None:
    world = started_world()
    outcome = world.do(Cancel(all=True), actor, now=10.0)
    assert sorted(outcome.job_ids) == cancelled
    for job_id in cancelled:
        expected = "running" if job_id == "a1" else "cancelled"
        assert world.status(job_id) == expected
    assert world.status("a4") == "completed"


def test_leads_cancel_other_users_jobs_researchers_do_not() -> None:
    world = started_world()
    refused(world, NotAllowed, Cancel(job_ids=("b1",)), ALICE, 10.0)
    world.do(Cancel(job_ids=("b1",)), LEAD, now=10.0)
    assert world.status("b1") == "cancelled"


# ---------------------------------------------------------------- priority override


@pytest.mark.parametrize(
    ("actor", "priority", "error"),
    [
        pytest.param(VIEWER, 50, NotAllowed, id="viewer"),
        pytest.param(ALICE, 50, NotAllowed, id="researcher"),
        pytest.param(LEAD, 50, None, id="lead"),
        pytest.param(ADMIN, 50, None, id="admin"),
        pytest.param(LEAD, 0, None, id="zero"),
        pytest.param(LEAD, 100, None, id="hundred"),
        pytest.param(LEAD, None, None, id="null-clears"),
        pytest.param(LEAD, -1, InvalidRequest, id="below-0"),
        pytest.param(LEAD, 101, InvalidRequest, id="above-100"),
        pytest.param(LEAD, True, InvalidRequest, id="bool"),
    ],
)
def test_priority_override_permissions_and_range(
    actor: Any, priority: int | None, error: type[DomainError] | None
) -> None:
    world = World()
    world.submit(BOB, "j", now=0.0)
    world.do(SetPriority("j", 7), ADMIN, now=0.0)
    if error is not None:
        refused(world, error, SetPriority("j", priority), actor, 1.0)
        assert world.state.jobs["j"].priority_override == 7
    else:
        world.do(SetPriority("j", priority), actor, now=1.0)
        job = world.state.jobs["j"]
        assert job.priority_override == priority
        assert job.base_priority == (10 if priority is None else priority)


@pytest.mark.parametrize(
    ("state", "allowed"),
    [("pending", True), ("blocked", True), ("running", False), ("completed", False),
     ("cancelled", False)],
)
def test_priority_override_only_on_pending_or_blocked_jobs(state: str, allowed: bool) -> None:
    world = World()
    world.submit(BOB, "j", now=0.0, requires_approval=state == "blocked")
    if state in ("running", "completed"):
        world.schedule(1.0)
    if state == "completed":
        world.do(ReportExited(job_id="j", exit_code=0), now=2.0)
    if state == "cancelled":
        world.do(Cancel(job_ids=("j",)), BOB, now=2.0)
    assert world.status("j") == state
    if allowed:
        world.do(SetPriority("j", 55), LEAD, now=3.0)
        assert world.state.jobs["j"].priority_override == 55
    else:
        refused(world, WrongState, SetPriority("j", 55), LEAD, 3.0)
    refused(world, UnknownJob, SetPriority("nope", 55), LEAD, 3.0)


def test_priority_override_reorders_the_queue_and_same_value_writes_nothing() -> None:
    world = World(max_concurrent=1)
    world.submit(ALICE, "first", now=0.0)
    world.submit(BOB, "second", now=1.0)
    assert world.order(2.0) == ["first", "second"]
    world.do(SetPriority("second", 11), LEAD, now=2.0)
    assert world.order(2.0) == ["second", "first"]
    assert world.do(SetPriority("second", 11), LEAD, now=3.0).events == []
    world.do(SetPriority("second", None), LEAD, now=4.0)
    assert world.order(4.0) == ["first", "second"]
    world.assert_replay_equal()


# ---------------------------------------------------------------- settings (SPEC 7)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({name: value}, id=f"{name}={value!r}")
        for name in ("max_concurrent", "user_max_concurrent", "team_max_concurrent",
                     "local_job_max_concurrent", "local_gpu_max_concurrent")
        for value in (0, -1, 1.5, True, "2")
    ] + [
        pytest.param({"starvation_threshold_minutes": 0}, id="threshold-0"),
        pytest.param({"starvation_threshold_minutes": -5}, id="threshold-negative"),
        # a vanishing threshold would overflow the aging steps and stop every pass
        pytest.param({"starvation_threshold_minutes": 1e-310}, id="threshold-vanishing"),
        pytest.param({"starvation_boost": -1}, id="boost-negative"),
        pytest.param({"starvation_boost": 2.5}, id="boost-fraction"),
        pytest.param({"approval_cost_threshold": -0.01}, id="cost-threshold-negative"),
        pytest.param({"approval_timeout_hours": 0}, id="timeout-0"),
        pytest.param({"cancel_grace_seconds": -1}, id="grace-negative"),
        pytest.param({"cancel_grace_seconds": 3600.5}, id="grace-over-an-hour"),
        pytest.param({"enable_fair_share": "yes"}, id="fair-share-not-bool"),
        pytest.param({"enable_fair_share": 1}, id="fair-share-int"),
        pytest.param({"max_concurrent": None}, id="max-concurrent-null"),
        pytest.param({"no_such_setting": 1}, id="unknown-setting"),
        pytest.param({"max_concurrent": 3, "user_max_concurrent": 0}, id="one-bad-of-two"),
    ],
)
def test_settings_validation_refuses_bad_values(changes: dict[str, Any]) -> None:
    world = World()
    settings = world.state.settings
    refused(world, InvalidRequest, ChangeSettings(changes), ADMIN, 1.0)
    assert world.state.settings == settings


@pytest.mark.parametrize(("changes", "shown"), [
    ({"max_concurrent": True}, "not true"),
    ({"max_concurrent": None}, "not null"),
    ({"user_max_concurrent": "2"}, 'not "2"'),
    ({"enable_fair_share": "yes"}, 'not "yes"'),
    ({"cancel_grace_seconds": 4000}, "at most 3600, not 4000"),
])
def test_a_refused_setting_shows_the_value_as_json_does(
    changes: dict[str, Any], shown: str
) -> None:
    """The person wrote JSON (or --what-if key=value): true and null, not True and None."""
    detail = refused(World(), InvalidRequest, ChangeSettings(changes), ADMIN, 1.0)
    assert detail.endswith(shown), detail


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({"max_concurrent": 1}, {"max_concurrent": 1}, id="limit-1"),
        pytest.param({"local_gpu_max_concurrent": 2}, {"local_gpu_max_concurrent": 2},
                     id="gpu-limit"),
        pytest.param({"starvation_threshold_minutes": 0.5},
                     {"starvation_threshold_minutes": 0.5}, id="fractional-threshold"),
        pytest.param({"starvation_boost": 0}, {"starvation_boost": 0}, id="boost-0"),
        pytest.param({"approval_cost_threshold": 0}, {"approval_cost_threshold": 0},
                     id="cost-threshold-0"),
        pytest.param({"enable_fair_share": True, "team_max_concurrent": 3},
                     {"enable_fair_share": True, "team_max_concurrent": 3}, id="fair-share"),
    ],
)
def test_settings_accepts_good_values(changes: dict[str, Any], expected: dict[str, Any]) -> None:
    world = World()
    world.do(ChangeSettings(changes), ADMIN, now=1.0)
    for name, value in expected.items():
        assert getattr(world.state.settings, name) == value
    assert world.event_types()[-1] == "queue.settings_changed"


def test_local_gpu_limit_explicit_null_sets_unlimited_and_omitted_leaves_it() -> None:
    world = World()
    world.do(ChangeSettings({"local_gpu_max_concurrent": 2}), ADMIN, now=1.0)
    world.do(ChangeSettings({"max_concurrent": 9}), ADMIN, now=2.0)
    assert world.state.settings.local_gpu_max_concurrent == 2
    world.do(ChangeSettings({"local_gpu_max_concurrent": None}), ADMIN, now=3.0)
    assert world.state.settings.local_gpu_max_concurrent is None
    assert world.state.settings.max_concurrent == 9
    assert world.do(ChangeSettings({"max_concurrent": 9}), ADMIN, now=4.0).events == []


@pytest.mark.parametrize("actor", [LEAD, ALICE, VIEWER])
def test_only_admins_change_settings_process_or_clean_up(actor: Any) -> None:
    from service.commands import Process

    world = World()
    refused(world, NotAllowed, ChangeSettings({"max_concurrent": 9}), actor, 1.0)
    refused(world, NotAllowed, Process(), actor, 1.0)
    refused(world, NotAllowed, Cleanup(30), actor, 1.0)


def test_researchers_and_viewers_list_only_their_own_entries() -> None:
    assert listing_scope(LEAD, None) is None
    assert listing_scope(ADMIN, ALICE.user_id) == ALICE.user_id
    for actor in (ALICE, VIEWER):
        assert listing_scope(actor, None) == actor.user_id
        assert listing_scope(actor, actor.user_id) == actor.user_id
        with pytest.raises(NotAllowed):
            listing_scope(actor, LEAD.user_id)


def test_raising_a_limit_starts_waiting_jobs() -> None:
    world = World(max_concurrent=1, local_job_max_concurrent=5)
    for job_id, actor in (("a", ALICE), ("b", BOB), ("c", CAROL)):
        world.submit(actor, job_id, now=0.0)
    assert world.schedule(1.0) == ["a"]
    world.do(ChangeSettings({"max_concurrent": 3}), ADMIN, now=2.0)
    assert world.schedule(2.0) == ["b", "c"]


# ---------------------------------------------------------------- cleanup


def test_cleanup_purges_old_terminal_entries_from_the_view_only() -> None:
    world = World(local_job_max_concurrent=5, user_max_concurrent=5, max_concurrent=5)
    for job_id in ("done-old", "failed-old", "done-new", "running", "pending"):
        world.submit(ALICE, job_id, now=0.0)
    world.submit(BOB, "cancelled-old", now=0.0)
    world.submit(BOB, "blocked-old", now=0.0, requires_approval=True)
    world.do(ChangeSettings({"max_concurrent": 4}), ADMIN, now=0.0)
    assert world.schedule(0.0) == ["done-old", "failed-old", "done-new", "running"]
    world.do(ReportExited(job_id="done-old", exit_code=0), now=1 * DAY)
    world.do(ReportExited(job_id="failed-old", exit_code=3), now=1 * DAY)
    world.do(Cancel(job_ids=("cancelled-old",)), BOB, now=1 * DAY)
    world.do(ReportExited(job_id="done-new", exit_code=0), now=20 * DAY)
    logged = list(world.records)

    refused(world, InvalidRequest, Cleanup(0), ADMIN, 40 * DAY)
    refused(world, InvalidRequest, Cleanup(366), ADMIN, 40 * DAY)
    outcome = world.do(Cleanup(30), ADMIN, now=40 * DAY)

    assert outcome.count == 3
    assert sorted(world.state.jobs) == ["blocked-old", "done-new", "pending", "running"]
    assert world.records[: len(logged)] == logged  # the log keeps every event
    assert world.event_types()[-1] == "queue.entries_purged"
    assert stats(world.state, 40 * DAY)["by_status"] == {
        "pending": 1, "blocked": 1, "running": 1, "completed": 1,
    }
    assert world.do(Cleanup(30), ADMIN, now=40 * DAY).count == 0
    world.assert_replay_equal()


def test_cleanup_keeps_an_entry_that_ended_exactly_days_ago() -> None:
    """"Older than ``days``": one that ended exactly at the cutoff stays."""
    world = World(local_job_max_concurrent=5)
    world.submit(ALICE, "j", now=0.0)
    world.schedule(0.0)
    world.do(ReportExited(job_id="j", exit_code=0), now=10 * DAY)
    assert world.do(Cleanup(30), ADMIN, now=40 * DAY).count == 0
    assert world.do(Cleanup(30), ADMIN, now=40 * DAY + 0.5).count == 1
    assert "j" not in world.state.jobs


# ---------------------------------------------------------------- users and tokens


def test_users_and_tokens() -> None:
    world = World()
    first = world.do(CreateUser(name="root", level="admin", token_id="t1", token_hash="h1"),
                     ADMIN, now=1.0)
    second = world.do(CreateUser(name="alice", level="researcher", team_id="alpha",
                                 token_id="t2", token_hash="h2"), ADMIN, now=2.0)
    assert (first.user_id, second.user_id) == (1, 2)
    assert world.event_types()[-4:] == ["user.created", "token.issued"] * 2
    assert world.state.users[2].team_id == "alpha"
    assert world.state.token_by_hash == {"h1": "t1", "h2": "t2"}

    refused(world, Conflict, CreateUser(name="alice", level="lead", token_id="t3",
                                        token_hash="h3"), ADMIN, 3.0)
    refused(world, InvalidRequest, CreateUser(name="x", level="boss", token_id="t3",
                                              token_hash="h3"), ADMIN, 3.0)
    refused(world, InvalidRequest, CreateUser(name="  ", level="lead", token_id="t3",
                                              token_hash="h3"), ADMIN, 3.0)
    refused(world, NotAllowed, CreateUser(name="y", level="lead", token_id="t3",
                                          token_hash="h3"), LEAD, 3.0)

    world.do(UpdateUser(user_id=2, changes={"level": "lead", "team_id": None}), ADMIN, now=4.0)
    assert (world.state.users[2].level, world.state.users[2].team_id) == ("lead", None)
    assert world.do(UpdateUser(user_id=2, changes={"level": "lead"}), ADMIN, now=4.5).events == []
    assert world.do(UpdateUser(user_id=2, changes={}), ADMIN, now=4.5).events == []
    refused(world, InvalidRequest, UpdateUser(user_id=2, changes={"email": "x"}), ADMIN, 5.0)
    refused(world, UnknownUser, UpdateUser(user_id=9, changes={"level": "lead"}), ADMIN, 5.0)
    detail = refused(world, Conflict, UpdateUser(user_id=1, changes={"level": "lead"}),
                     ADMIN, 5.0)
    assert "last admin" in detail

    world.do(IssueToken(user_id=2, token_id="t4", token_hash="h4"), ADMIN, now=6.0)
    world.do(RevokeToken(user_id=2, token_id="t2"), ADMIN, now=7.0)
    assert world.state.token_by_hash == {"h1": "t1", "h4": "t4"}
    refused(world, UnknownUser, RevokeToken(user_id=1, token_id="t4"), ADMIN, 8.0)
    refused(world, UnknownUser, IssueToken(user_id=9, token_id="t5", token_hash="h5"),
            ADMIN, 8.0)
    refused(world, NotAllowed, IssueToken(user_id=2, token_id="t5", token_hash="h5"),
            DAVE, 8.0)
    world.assert_replay_equal()


# ---------------------------------------------------------------- what executors report (SPEC 3)


def test_retryable_failure_requeues_until_max_attempts() -> None:
    world = World(1)
    world.submit(ALICE, "j", now=0.0, num_processes=1)
    for attempt in (1, 2, 3):
        assert world.schedule(float(attempt)) == ["j"]
        assert world.dispatched()["j"].attempt == attempt
        world.do(ReportStarted(job_id="j", pid=100 + attempt, process_start_time=5),
                 now=attempt + 0.1)
        world.do(ReportFailed(job_id="j", error="launch failed", retryable=True),
                 now=attempt + 0.5)
        job = world.state.jobs["j"]
        if attempt < 3:
            assert (job.status, job.attempt, job.allocated_gpus, job.pid) == (
                "pending", attempt + 1, (), None)
            assert world.event_types()[-2:] == ["job.failed", "job.requeued"]
        else:
            assert (job.status, job.attempt, job.error_message) == ("failed", 3, "launch failed")
            assert world.event_types()[-1] == "job.failed"
    assert world.schedule(10.0) == []
    assert world.state.free_gpus() == [0]
    world.assert_replay_equal()


def test_a_report_about_a_job_that_is_not_running_changes_nothing() -> None:
    """Executors may report twice (a retry after a lost answer) or late (the job was
    cancelled meanwhile): a start is recorded once, and an end only for a running job."""
    world = World(local_job_max_concurrent=5)
    world.submit(ALICE, "run", now=0.0)
    world.submit(BOB, "queued", now=0.0)
    world.do(ChangeSettings({"max_concurrent": 1}), ADMIN, now=0.0)
    assert world.schedule(1.0) == ["run"]
    assert world.do(ReportStarted(job_id="run", pid=100, process_start_time=5), now=2.0).events
    late = [
        ("run", ReportStarted(job_id="run", pid=200, process_start_time=6)),
        ("queued", ReportStarted(job_id="queued", pid=300, process_start_time=7)),
        ("queued", ReportCancelled(job_id="queued")),
        ("queued", ReportExited(job_id="queued", exit_code=0)),
        ("queued", ReportFailed(job_id="queued", error="lost", retryable=True)),
        ("nobody", ReportCancelled(job_id="nobody")),
    ]
    for job_id, report in late:
        assert world.do(report, now=3.0).events == [], (job_id, report)
    assert (world.state.jobs["run"].pid, world.status("queued")) == (100, "pending")
    world.do(ReportExited(job_id="run", exit_code=0), now=4.0)
    assert world.do(ReportCancelled(job_id="run"), now=5.0).events == []
    assert world.status("run") == "completed"
    world.assert_replay_equal()


@pytest.mark.parametrize(("ending", "status"), [("exit-0", "completed"), ("cancel", "cancelled")])
def test_a_retry_that_ends_well_ends_without_the_earlier_error(ending: str, status: str) -> None:
    world = World(1)
    world.submit(ALICE, "j", now=0.0, num_processes=1)
    world.schedule(1.0)
    world.do(ReportFailed(job_id="j", error="launch failed", retryable=True), now=1.5)
    assert world.schedule(2.0) == ["j"]
    running = world.state.jobs["j"]
    assert (running.status, running.attempt, running.error_message) == (
        "running", 2, "launch failed")  # while it runs again, why it is on its second try
    if ending == "exit-0":
        world.do(ReportExited(job_id="j", exit_code=0), now=3.0)
    else:  # a running job's cancel ends when the executor reports the process gone
        world.do(Cancel(job_ids=("j",)), ALICE, now=3.0)
        world.do(ReportCancelled(job_id="j"), now=3.5)
    job = world.state.jobs["j"]
    assert (job.status, job.attempt, job.error_message) == (status, 2, None)
    world.assert_replay_equal()


@pytest.mark.parametrize(
    ("report", "status", "exit_code", "message"),
    [
        pytest.param(ReportExited(job_id="j", exit_code=0), "completed", 0, None, id="exit-0"),
        pytest.param(ReportExited(job_id="j", exit_code=2), "failed", 2,
                     "the command exited with code 2", id="exit-nonzero-no-retry"),
        pytest.param(ReportExited(job_id="j", exit_code=-9), "failed", -9,
                     "the command was killed by signal 9", id="killed-by-signal"),
        pytest.param(ReportFailed(job_id="j", error="bad config", retryable=False), "failed",
                     None, "bad config", id="not-retryable"),
    ],
)
def test_how_a_running_job_ends(
    report: Any, status: str, exit_code: int | None, message: str | None
) -> None:
    world = World(1)
    world.submit(ALICE, "j", now=0.0, num_processes=1, max_attempts=3)
    world.schedule(0.0)
    world.do(report, now=5.0)
    job = world.state.jobs["j"]
    assert (job.status, job.exit_code, job.error_message, job.attempt) == (
        status, exit_code, message, 1)
    assert job.completed_at == 5.0 and world.state.gpu_holder == {}
    # a report about a job that is no longer running writes nothing
    assert world.do(report, now=6.0).events == []


@pytest.mark.parametrize(
    ("report", "cancel", "status", "ended_at", "completed_at"),
    [
        pytest.param(ReportExited(job_id="j", exit_code=0, ended_at=7.0), False, "completed",
                     7.0, 7.0, id="exited"),
        pytest.param(ReportExited(job_id="j", exit_code=3, ended_at=7.0), False, "failed",
                     7.0, 7.0, id="exited-nonzero"),
        pytest.param(ReportFailed(job_id="j", error="lost", retryable=False, ended_at=7.0),
                     False, "failed", 7.0, 7.0, id="failed"),
        pytest.param(ReportExited(job_id="j", exit_code=-15, ended_at=7.0), True, "cancelled",
                     7.0, 7.0, id="cancelled"),
        # a clock that disagrees can put neither end outside the run
        pytest.param(ReportExited(job_id="j", exit_code=0, ended_at=2.0), False, "completed",
                     2.0, 5.0, id="before-its-start"),
        pytest.param(ReportExited(job_id="j", exit_code=0, ended_at=500.0), False, "completed",
                     500.0, 100.0, id="after-it-was-learned"),
    ],
)
def test_an_end_learned_after_a_restart_keeps_the_time_it_happened(
    report: Any, cancel: bool, status: str, ended_at: float, completed_at: float
) -> None:
    world = World(1)
    world.submit(ALICE, "j", now=0.0, num_processes=1)
    assert world.schedule(5.0) == ["j"]
    if cancel:
        world.do(Cancel(job_ids=("j",)), ALICE, now=6.0)
    world.do(report, now=100.0)  # the server learned it as it started again
    (event,) = world.records[-1:]
    assert event.event.ended_at == ended_at  # the fact keeps what the executor said
    job = world.state.jobs["j"]
    assert (job.status, job.completed_at) == (status, completed_at)
    # the run's length is the true one; the history is kept in the order ends were learned
    assert world.state.run_end_at == [100.0]
    assert mean_run_seconds(world.state, 100.0) == completed_at - 5.0
    world.assert_replay_equal()


def test_an_end_learned_live_is_recorded_when_learned() -> None:
    world = World(1)
    world.submit(ALICE, "j", now=0.0, num_processes=1)
    world.schedule(5.0)
    world.do(ReportExited(job_id="j", exit_code=0), now=9.0)
    assert world.records[-1].event.ended_at is None
    assert world.state.jobs["j"].completed_at == 9.0
    assert mean_run_seconds(world.state, 9.0) == 4.0


def test_max_attempts_one_fails_on_the_first_infrastructure_failure() -> None:
    world = World()
    world.submit(ALICE, "j", now=0.0, max_attempts=1)
    world.schedule(0.0)
    world.do(ReportFailed(job_id="j", error="lost", retryable=True), now=1.0)
    assert world.status("j") == "failed"
    with pytest.raises(InvalidRequest):
        world.submit(ALICE, "k", now=2.0, max_attempts=0)


def test_metadata_over_64_kib_is_refused() -> None:
    world = World()
    with pytest.raises(InvalidRequest):
        world.submit(ALICE, "j", now=0.0, metadata={"blob": "x" * (64 * 1024)})
    world.submit(ALICE, "k", now=0.0, metadata={"run_name": "baseline"})
    assert world.state.jobs["k"].metadata == {"run_name": "baseline"}
