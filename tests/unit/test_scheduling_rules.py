"""SPEC section 4, rule by rule: given events, when a scheduling pass runs at ``now``, then.

Every scenario goes through the real pure core: ``service.commands.handle`` for the
commands, ``projections.fold`` for the state, ``service.scheduler.decide`` for the
pass and ``explain`` for the reasons.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from scenario import ADMIN, ALICE, BOB, CAROL, DAVE, LEAD, VIEWER, World, config

from events.types import Settings
from service.commands import ChangeSettings, InvalidRequest, SetPriority, Submit
from service.scheduler import effective_priority, explain, job_effective_priority

HOUR = 3600.0

# ---------------------------------------------------------------- effective priority


@pytest.mark.parametrize(
    ("p", "waited", "threshold_minutes", "boost", "expected"),
    [
        pytest.param(10, 0.0, 60, 10, 10, id="no-wait"),
        pytest.param(10, 3599.9, 60, 10, 10, id="just-under-one-threshold"),
        pytest.param(10, 3600.0, 60, 10, 20, id="one-threshold"),
        pytest.param(10, 7200.0, 60, 10, 30, id="two-thresholds-reach-urgent"),
        pytest.param(10, 10 * HOUR, 60, 10, 30, id="aging-capped-at-30"),
        pytest.param(25, 3600.0, 60, 10, 30, id="25-plus-10-capped-at-30"),
        pytest.param(29, 3600.0, 60, 10, 30, id="29-plus-10-capped-at-30"),
        pytest.param(0, 2 * HOUR, 60, 10, 20, id="viewer-ages-from-0"),
        pytest.param(0, 29.9, 0.5, 10, 0, id="fractional-threshold-not-reached"),
        pytest.param(0, 45.0, 0.5, 10, 10, id="fractional-threshold-one-step"),
        pytest.param(0, 90.0, 0.5, 10, 30, id="fractional-threshold-three-steps"),
        pytest.param(10, 180.0, 1.5, 5, 20, id="fractional-threshold-boost-5"),
        pytest.param(10, 10 * HOUR, 60, 0, 10, id="boost-0-never-ages"),
        pytest.param(30, 100 * HOUR, 60, 10, 30, id="urgent-not-aged"),
        pytest.param(31, 100 * HOUR, 60, 10, 31, id="override-31-not-aged"),
        pytest.param(50, 100 * HOUR, 60, 10, 50, id="override-50-not-aged"),
        pytest.param(100, 100 * HOUR, 60, 10, 100, id="override-100-not-aged"),
    ],
)
def test_effective_priority(
    p: int, waited: float, threshold_minutes: float, boost: int, expected: int
) -> None:
    settings = Settings(starvation_threshold_minutes=threshold_minutes, starvation_boost=boost)
    assert effective_priority(p, waited, settings) == expected


def test_effective_priority_of_a_job_uses_its_override_and_queued_at() -> None:
    world = World(local_job_max_concurrent=10)
    world.submit(ALICE, "r", now=100.0)
    world.do(SetPriority("r", 5), LEAD, now=200.0)
    job = world.state.jobs["r"]
    assert job_effective_priority(job, 100.0 + HOUR, world.state.settings) == 15
    world.do(SetPriority("r", None), LEAD, now=300.0)
    assert job_effective_priority(job, 100.0 + HOUR, world.state.settings) == 20


# ---------------------------------------------------------------- order and positions

# Each submission: (actor, job id, queued at, priority override or None)
Submission = tuple[Any, str, float, int | None]

ORDER_CASES = [
    pytest.param(
        [(VIEWER, "v", 0.0, None), (ALICE, "r", 0.0, None), (LEAD, "l", 0.0, None),
         (ADMIN, "a", 0.0, None)],
        0.0, ["a", "l", "r", "v"], {}, id="base-priority-by-level",
    ),
    pytest.param(
        [(BOB, "late", 10.0, None), (ALICE, "early", 0.0, None)],
        20.0, ["early", "late"], {}, id="queued-at-breaks-ties",
    ),
    pytest.param(
        [(BOB, "first", 5.0, None), (ALICE, "second", 5.0, None), (CAROL, "third", 5.0, None)],
        5.0, ["first", "second", "third"], {}, id="submission-order-breaks-equal-times",
    ),
    pytest.param(
        [(ALICE, "r", 0.0, None), (LEAD, "l", 3000.0, None)],
        3000.0, ["l", "r"], {"r": 10, "l": 20}, id="before-aging-lead-first",
    ),
    pytest.param(
        [(ALICE, "r", 0.0, None), (LEAD, "l", 3000.0, None)],
        3600.0, ["r", "l"], {"r": 20, "l": 20}, id="aged-researcher-ties-lead-and-waited-longer",
    ),
    pytest.param(
        [(ALICE, "r", 0.0, None), (ADMIN, "a", 100.0, None)],
        10 * HOUR, ["r", "a"], {"r": 30, "a": 30}, id="aging-reaches-urgent-not-beyond",
    ),
    pytest.param(
        [(ALICE, "r", 0.0, None), (BOB, "o", 100.0, 31)],
        10 * HOUR, ["o", "r"], {"r": 30, "o": 31}, id="override-31-beats-fully-aged",
    ),
    pytest.param(
        [(ALICE, "x", 0.0, 50), (BOB, "y", 36000.0, 60)],
        36000.0, ["y", "x"], {"x": 50, "y": 60}, id="override-above-30-not-aged",
    ),
    pytest.param(
        [(ADMIN, "a", 0.0, 0), (VIEWER, "v", 10.0, 100)],
        10.0, ["v", "a"], {"a": 0, "v": 100}, id="override-0-and-100",
    ),
    pytest.param(
        [(ADMIN, "a", 0.0, 0), (VIEWER, "v", 10.0, None)],
        2 * HOUR, ["a", "v"], {"a": 20, "v": 10}, id="override-0-still-ages",
    ),
]


@pytest.mark.parametrize(("submissions", "now", "order", "effective"), ORDER_CASES)
def test_pending_order_and_positions(
    submissions: list[Submission], now: float, order: list[str], effective: dict[str, int]
) -> None:
    world = World(local_job_max_concurrent=10)
    for actor, job_id, queued_at, override in submissions:
        world.submit(actor, job_id, now=queued_at)
        if override is not None:
            world.do(SetPriority(job_id, override), LEAD, now=queued_at)
    assert world.order(now) == order
    assert world.positions(now) == {job_id: rank for rank, job_id in enumerate(order, 1)}
    settings = world.state.settings
    for job_id, expected in effective.items():
        assert job_effective_priority(world.state.jobs[job_id], now, settings) == expected
    # the pass starts jobs in that same order
    world.do(ChangeSettings({"max_concurrent": 100, "user_max_concurrent": 100}), now=now)
    assert world.schedule(now) == order


def test_positions_are_1_to_n_and_null_for_jobs_not_pending() -> None:
    world = World(max_concurrent=2, user_max_concurrent=5, local_job_max_concurrent=5)
    for job_id in ("j1", "j2", "j3", "j4", "j5"):
        world.submit(ALICE, job_id, now=float(job_id[1]))
    world.submit(BOB, "blocked", now=6.0, requires_approval=True)
    assert world.schedule(10.0) == ["j1", "j2"]
    assert world.positions(10.0) == {
        "j1": None, "j2": None, "j3": 1, "j4": 2, "j5": 3, "blocked": None,
    }
    assert world.reasons("j4", 10.0) == ["global_limit", "jobs_ahead"]


def test_a_job_approved_later_joins_the_queue_when_approved() -> None:
    world = World(local_job_max_concurrent=1)
    world.submit(ALICE, "needs-ok", now=0.0, requires_approval=True)
    world.submit(BOB, "plain", now=10.0)
    world.submit(CAROL, "running", now=11.0)
    from service.commands import Approve

    world.do(Approve("needs-ok"), ADMIN, now=20.0)
    assert world.order(20.0) == ["plain", "running", "needs-ok"]
    assert world.schedule(21.0) == ["plain"]
    assert world.reasons("needs-ok", 21.0) == ["local_job_limit", "jobs_ahead"]


# ---------------------------------------------------------------- limits, one pass

# A pass scenario: settings, GPU count, jobs already running (submitted and started at
# t=0), jobs submitted at t=10, and what a pass at t=20 does: the job ids it starts in
# order, the GPUs they get, and the first reason `explain` gives for those it holds.
PassCase = dict[str, Any]


def job(actor: Any, job_id: str, **options: Any) -> tuple[Any, str, dict[str, Any]]:
    return (actor, job_id, options)


PASS_CASES: list[Any] = [
    pytest.param({
        "settings": {"max_concurrent": 2, "user_max_concurrent": 5, "local_job_max_concurrent": 10},
        "submit": [job(ALICE, "a1"), job(BOB, "b1"), job(CAROL, "c1")],
        "starts": ["a1", "b1"], "held": {"c1": "global_limit"},
    }, id="global-limit-stops-the-pass"),
    pytest.param({
        "settings": {"max_concurrent": 2, "user_max_concurrent": 5, "local_job_max_concurrent": 10},
        "running": [job(ALICE, "a0"), job(BOB, "b0")],
        "submit": [job(CAROL, "c1")],
        "starts": [], "held": {"c1": "global_limit"},
    }, id="global-limit-counts-running-jobs"),
    pytest.param({
        "settings": {"user_max_concurrent": 1, "local_job_max_concurrent": 10},
        "submit": [job(ALICE, "a1"), job(ALICE, "a2"), job(BOB, "b1")],
        "starts": ["a1", "b1"], "held": {"a2": "user_limit"},
    }, id="user-limit-skips-and-continues"),
    pytest.param({
        "settings": {"user_max_concurrent": 1, "local_job_max_concurrent": 10},
        "running": [job(ALICE, "a0")],
        "submit": [job(ALICE, "a1"), job(BOB, "b1")],
        "starts": ["b1"], "held": {"a1": "user_limit"},
    }, id="user-limit-counts-running-jobs"),
    pytest.param({
        "settings": {"team_max_concurrent": 1, "local_job_max_concurrent": 10},
        "submit": [job(ALICE, "a1"), job(BOB, "b1")],
        "starts": ["a1", "b1"], "held": {},
    }, id="team-limit-ignored-without-fair-share"),
    pytest.param({
        "settings": {"team_max_concurrent": 1, "enable_fair_share": True,
                      "local_job_max_concurrent": 10},
        "submit": [job(ALICE, "a1"), job(BOB, "b1"), job(CAROL, "c1")],
        "starts": ["a1", "c1"], "held": {"b1": "team_limit"},
    }, id="team-limit-with-fair-share"),
    pytest.param({
        "settings": {"team_max_concurrent": 1, "enable_fair_share": True,
                      "local_job_max_concurrent": 10},
        "running": [job(BOB, "b0")],
        "submit": [job(ALICE, "a1"), job(DAVE, "d1"), job(DAVE, "d2")],
        "starts": ["d1", "d2"], "held": {"a1": "team_limit"},
    }, id="team-limit-never-holds-a-job-without-team"),
    pytest.param({
        "settings": {},
        "submit": [job(ALICE, "a1"), job(BOB, "b1")],
        "starts": ["a1"], "held": {"b1": "local_job_limit"},
    }, id="local-job-limit-default-1"),
    pytest.param({
        "settings": {"local_job_max_concurrent": 2},
        "running": [job(ALICE, "a0")],
        "submit": [job(BOB, "b1"), job(CAROL, "c1")],
        "starts": ["b1"], "held": {"c1": "local_job_limit"},
    }, id="local-job-limit-counts-running-jobs"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10, "local_gpu_max_concurrent": 2},
        "submit": [job(ALICE, "a1", num_processes=1), job(BOB, "b1", num_processes=1),
                job(CAROL, "c1", num_processes=1)],
        "starts": ["a1", "b1"], "gpus": {"a1": (0,), "b1": (1,)},
        "held": {"c1": "local_gpu_limit"},
    }, id="local-gpu-limit"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10, "local_gpu_max_concurrent": 3},
        "submit": [job(ALICE, "a1", num_processes=2), job(BOB, "b1", num_processes=2),
                job(CAROL, "c1", num_processes=1)],
        "starts": ["a1"], "gpus": {"a1": (0, 1)},
        "held": {"b1": "local_gpu_limit", "c1": "reserved_for_higher_priority"},
    }, id="local-gpu-limit-is-allocated-plus-need-and-b1-waiting-on-it-reserves"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10, "user_max_concurrent": 4},
        "submit": [job(ALICE, f"a{i}", num_processes=1) for i in range(4)],
        "starts": ["a0", "a1", "a2", "a3"],
        "gpus": {"a0": (0,), "a1": (1,), "a2": (2,), "a3": (3,)}, "held": {},
    }, id="local-gpu-limit-null-is-unlimited"),
    pytest.param({
        "inventory": 2, "settings": {"local_job_max_concurrent": 10},
        "running": [job(ALICE, "a0", num_processes=2)],
        "submit": [job(BOB, "b1", num_processes=1), job(CAROL, "c1", num_processes=0)],
        "starts": [], "held": {"b1": "gpus_busy", "c1": "reserved_for_higher_priority"},
    }, id="gpus-busy-reserves-every-gpu-and-holds-a-lower-cpu-only-job"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10},
        "submit": [job(ALICE, "a1", num_processes=2, device_ids=[2, 3])],
        "starts": ["a1"], "gpus": {"a1": (2, 3)}, "held": {},
    }, id="device-ids-exactly-those"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10},
        "submit": [job(ALICE, "a1", num_processes=2, device_ids=[2, 3], any_gpu=True)],
        "starts": ["a1"], "gpus": {"a1": (0, 1)}, "held": {},
    }, id="any-gpu-takes-lowest-free"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10},
        "running": [job(DAVE, "x", device_ids=[0])],
        "submit": [job(ALICE, "a1", num_processes=2)],
        "starts": ["a1"], "gpus": {"a1": (1, 2)}, "held": {},
    }, id="no-device-ids-takes-lowest-free"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10},
        "running": [job(DAVE, "x", device_ids=[1])],
        "submit": [job(ALICE, "a1", device_ids=[1, 2])],
        "starts": [], "held": {"a1": "gpus_busy"},
    }, id="device-ids-wait-until-all-are-free"),
    pytest.param({
        "inventory": 1, "settings": {"local_job_max_concurrent": 10},
        "submit": [job(ALICE, "r1", num_processes=1), job(LEAD, "l1", num_processes=1)],
        "starts": ["l1"], "held": {"r1": "gpus_busy"},
    }, id="higher-priority-gets-the-contested-gpu"),
    # no starvation by backfill
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10},
        "running": [job(DAVE, "x", device_ids=[0])],
        "submit": [job(LEAD, "h", device_ids=[0, 1]), job(ALICE, "l", num_processes=1)],
        "starts": ["l"], "gpus": {"l": (2,)}, "held": {"h": "gpus_busy"},
    }, id="reservation-lower-job-starts-outside-device-ids"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10},
        "running": [job(DAVE, "x", device_ids=[0])],
        "submit": [job(LEAD, "h", device_ids=[0, 1]), job(ALICE, "l", device_ids=[1])],
        "starts": [], "held": {"h": "gpus_busy", "l": "reserved_for_higher_priority"},
    }, id="reservation-holds-a-lower-job-wanting-a-reserved-gpu"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10},
        "running": [job(DAVE, "x", device_ids=[0])],
        "submit": [job(LEAD, "h", num_processes=4), job(ALICE, "l", num_processes=1),
                job(BOB, "cpu", num_processes=0)],
        "starts": [], "held": {"h": "gpus_busy", "l": "reserved_for_higher_priority",
                               "cpu": "reserved_for_higher_priority"},
    }, id="reservation-without-device-ids-holds-every-lower-local-job-cpu-only-too"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10},
        "running": [job(DAVE, "x", device_ids=[0])],
        "submit": [job(LEAD, "h", device_ids=[0, 1]), job(ALICE, "l", device_ids=[1]),
                job(BOB, "cpu", num_processes=0)],
        "starts": ["cpu"], "held": {"h": "gpus_busy", "l": "reserved_for_higher_priority"},
    }, id="reservation-of-device-ids-lets-a-lower-cpu-only-job-start"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10},
        "running": [job(DAVE, "x", device_ids=[0])],
        "submit": [job(LEAD, "h", num_processes=4, device_ids=[1], any_gpu=True),
                job(ALICE, "l", device_ids=[3])],
        "starts": [], "held": {"h": "gpus_busy", "l": "reserved_for_higher_priority"},
    }, id="reservation-with-any-gpu-holds-every-lower-gpu-job"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10, "user_max_concurrent": 1},
        "running": [job(LEAD, "x", device_ids=[0])],
        "submit": [job(LEAD, "h", num_processes=4), job(ALICE, "l", num_processes=1)],
        "starts": ["l"], "gpus": {"l": (1,)}, "held": {"h": "user_limit"},
    }, id="a-job-held-by-its-user-limit-reserves-nothing"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10, "local_gpu_max_concurrent": 3},
        "running": [job(DAVE, "x", device_ids=[0])],
        "submit": [job(LEAD, "h", num_processes=3), job(ALICE, "l", num_processes=1)],
        "starts": [], "held": {"h": "local_gpu_limit", "l": "reserved_for_higher_priority"},
    }, id="a-job-held-by-the-gpu-limit-reserves-every-gpu"),
    pytest.param({
        "inventory": 4, "settings": {"local_job_max_concurrent": 10, "local_gpu_max_concurrent": 3},
        "running": [job(DAVE, "x", device_ids=[0])],
        "submit": [job(LEAD, "h", device_ids=[1, 2, 3]), job(ALICE, "l", device_ids=[1]),
                job(BOB, "cpu", num_processes=0)],
        "starts": [], "held": {"h": "local_gpu_limit", "l": "reserved_for_higher_priority",
                               "cpu": "reserved_for_higher_priority"},
    }, id="gpu-limit-reservation-holds-every-gpu-whatever-its-device-ids"),
]


@pytest.mark.parametrize("case", PASS_CASES)
def test_a_scheduling_pass(case: PassCase) -> None:
    world = World(case.get("inventory", 0), **case["settings"])
    settings = world.state.settings
    if case.get("running"):
        # start the given jobs first (with room for all of them), then restore the limits
        world.do(ChangeSettings({"max_concurrent": 100, "user_max_concurrent": 100,
                                 "local_job_max_concurrent": 100}), now=0.0)
        for actor, job_id, options in case["running"]:
            world.submit(actor, job_id, now=0.0, **options)
        assert world.schedule(0.0) == [job_id for _, job_id, _ in case["running"]]
        world.do(ChangeSettings({
            "max_concurrent": settings.max_concurrent,
            "user_max_concurrent": settings.user_max_concurrent,
            "local_job_max_concurrent": settings.local_job_max_concurrent,
        }), now=0.0)
    for actor, job_id, options in case["submit"]:
        world.submit(actor, job_id, now=10.0, **options)

    assert world.schedule(20.0) == case["starts"]
    for job_id, gpus in case.get("gpus", {}).items():
        assert world.gpus_of(job_id) == gpus
    for job_id, code in case["held"].items():
        assert world.status(job_id) == "pending"
        assert world.reason(job_id, 20.0) == code
    # a second pass changes nothing, and a fold of the log equals the live state
    assert world.schedule(20.0) == []
    world.assert_replay_equal()


def test_a_reservation_holds_for_the_rest_of_its_pass() -> None:
    """The waiting job reserves its GPUs when the pass reaches it. Its own user's CPU-only
    job (outside a reservation of named GPUs) may then take the user's last slot; the
    reservation still holds for this pass, and the next pass (the holder now waits for
    its user limit) gives the GPU away."""
    world = World(3, local_job_max_concurrent=4)
    world.submit(LEAD, "lead", now=0.0, num_processes=1)
    world.submit(BOB, "bob-1gpu", now=0.0, num_processes=1)
    world.submit(BOB, "bob-pair", now=0.0, device_ids=[1, 2])
    world.submit(ALICE, "alice-1gpu", now=0.0, num_processes=1)
    world.submit(BOB, "bob-cpu", now=0.0, num_processes=0)

    assert world.schedule(0.0) == ["lead", "bob-1gpu", "bob-cpu"]
    assert world.state.free_gpus() == [2]
    assert world.reason("bob-pair", 0.0) == "user_limit"
    assert world.reason("alice-1gpu", 0.0) == "ready"
    assert world.schedule(0.0) == ["alice-1gpu"]
    assert world.gpus_of("alice-1gpu") == (2,)


def test_a_job_over_a_lowered_gpu_limit_waits_and_reserves_nothing() -> None:
    """The limit was lowered below what a waiting job needs: it waits for the limit to be
    raised, and holds nobody back meanwhile (it would hold them forever)."""
    world = World(4, local_job_max_concurrent=10, user_max_concurrent=4)
    world.submit(DAVE, "x", now=0.0, device_ids=[0])
    assert world.schedule(0.0) == ["x"]
    world.submit(LEAD, "big", now=0.0, num_processes=4)
    assert world.schedule(0.0) == []
    assert world.reason("big", 0.0) == "gpus_busy"
    world.do(ChangeSettings({"local_gpu_max_concurrent": 3}), now=1.0)
    world.submit(ALICE, "small", now=2.0, num_processes=1)
    assert world.schedule(3.0) == ["small"]
    assert world.reason("big", 3.0) == "local_gpu_limit"
    assert "until the limit is raised" in explain(world.state, "big", 3.0).reasons[0].detail
    world.do(ChangeSettings({"local_gpu_max_concurrent": None}), now=4.0)
    world.submit(ALICE, "later", now=5.0, num_processes=1)
    assert world.schedule(6.0) == []  # big waits for free GPUs again, and reserves them
    assert world.reason("later", 6.0) == "reserved_for_higher_priority"
    world.submit(BOB, "cpu", now=7.0, num_processes=0)
    details = {job_id: explain(world.state, job_id, 8.0).reasons[0].detail
               for job_id in ("later", "cpu")}
    assert details == {
        "later": "the free GPUs it could use are held for job big, ahead of it in the queue, "
                 "which waits for GPUs",
        "cpu": "job big, ahead of it in the queue, waits for GPUs; no local job behind it "
               "starts before it",
    }
    world.assert_replay_equal()


@pytest.mark.parametrize("new_team", ["beta", None])
def test_a_user_moved_to_another_team_is_held_only_where_the_team_is_full(
    new_team: str | None,
) -> None:
    """A job keeps the team it was submitted in. Alice's job from her old, full team
    waits; the one she submitted after moving starts, in the same pass, and ``no_wait``
    takes it for one that can start."""
    world = World(max_concurrent=10, user_max_concurrent=5, team_max_concurrent=1,
                  enable_fair_share=True, local_job_max_concurrent=10)
    world.submit(BOB, "bob1", now=0.0)
    assert world.schedule(1.0) == ["bob1"]
    world.submit(ALICE, "a1", now=2.0)
    moved = msgspec.structs.replace(ALICE, team_id=new_team)
    outcome = world.submit(moved, "a2", now=3.0, no_wait=True)
    assert outcome.events  # accepted: it can start now
    assert world.reasons("a2", 4.0) == ["ready", "jobs_ahead"]
    assert world.schedule(4.0) == ["a2"]
    assert world.reason("a1", 4.0) == "team_limit"
    world.assert_replay_equal()


def test_seed_fair_share_example() -> None:
    """The seed's table, corrected: carol's third job waits for her user limit (5 < 6)."""
    world = World(max_concurrent=6, user_max_concurrent=2, team_max_concurrent=3,
                  enable_fair_share=True, local_job_max_concurrent=10)
    submissions = [(ALICE, "alice1"), (BOB, "bob1"), (CAROL, "carol1"), (BOB, "bob2"),
                   (CAROL, "carol2"), (CAROL, "carol3"), (ALICE, "alice2")]
    for second, (actor, job_id) in enumerate(submissions):
        world.submit(actor, job_id, now=float(second))

    assert world.schedule(now=10.0) == ["alice1", "bob1", "carol1", "bob2", "carol2"]
    assert world.state.running_total == 5 < world.state.settings.max_concurrent
    assert world.state.team_running == {"alpha": 3, "beta": 2}
    assert world.reason("alice2", 10.0) == "team_limit"
    assert world.reason("carol3", 10.0) == "user_limit"
    assert "global_limit" not in world.reasons("carol3", 10.0)

    # a finished alpha job frees a team slot: alice's held job starts, carol's still waits
    from service.commands import ReportExited

    world.do(ReportExited(job_id="bob1", exit_code=0), now=20.0)
    assert world.schedule(now=20.0) == ["alice2"]
    assert world.reason("carol3", 20.0) == "user_limit"
    world.assert_replay_equal()


def test_aging_lets_a_waiting_job_overtake_on_a_later_pass() -> None:
    world = World(1, starvation_threshold_minutes=0.5, starvation_boost=10)
    world.submit(VIEWER, "old", now=0.0, num_processes=1)
    world.submit(ALICE, "new", now=50.0, num_processes=1)
    assert world.order(50.0) == ["old", "new"]  # old aged to 10 after 30 s, then queued first
    world.submit(LEAD, "lead", now=55.0, num_processes=1)
    assert world.order(55.0) == ["lead", "old", "new"]  # old: 0 + 10 (one step)
    assert world.order(65.0) == ["old", "lead", "new"]  # old: 0 + 20, ties lead, queued first
    assert world.schedule(65.0) == ["old"]


# ---------------------------------------------------------------- never fits


@pytest.mark.parametrize(
    ("gpu_count", "settings", "options", "detail"),
    [
        pytest.param(2, {}, {"num_processes": 3}, "more than the 2 GPUs",
                     id="more-than-inventory"),
        pytest.param(0, {}, {"num_processes": 1}, "more than the 0 GPUs",
                     id="gpu-job-on-a-server-without-gpus"),
        pytest.param(4, {"local_gpu_max_concurrent": 2}, {"num_processes": 3},
                     "local_gpu_max_concurrent", id="more-than-the-gpu-limit"),
        pytest.param(4, {}, {"num_processes": 1, "device_ids": [4]}, "not in the GPU inventory",
                     id="device-ids-outside-inventory"),
        pytest.param(4, {}, {"num_processes": 1, "device_ids": [9], "any_gpu": True},
                     "not in the GPU inventory", id="device-ids-outside-inventory-any-gpu"),
        pytest.param(4, {}, {"num_processes": 2, "device_ids": [0, 0]}, "twice",
                     id="device-ids-twice"),
        pytest.param(4, {}, {"num_processes": 1, "device_ids": [-1]}, "GPU indices",
                     id="negative-device-id"),
        pytest.param(4, {}, {"num_processes": 2, "device_ids": [0]}, "device_ids",
                     id="device-ids-count-differs"),
        pytest.param(4, {}, {"num_processes": -1}, "0 or more", id="negative-num-processes"),
        pytest.param(4, {}, {"num_processes": 1, "target": "worker"}, "not available",
                     id="worker-target-without-workers"),
        pytest.param(4, {}, {"num_processes": 1, "target": "cloud"}, "not available",
                     id="cloud-target-without-provider"),
    ],
)
def test_a_job_that_could_never_start_is_refused_at_submit(
    gpu_count: int, settings: dict[str, Any], options: dict[str, Any], detail: str
) -> None:
    world = World(gpu_count, **settings)
    before = list(world.records)
    with pytest.raises(InvalidRequest) as refused:
        world.submit(ALICE, "j", now=1.0, **options)
    assert detail in refused.value.detail
    assert world.records == before  # nothing written
    assert "j" not in world.state.jobs


@pytest.mark.parametrize(
    ("gpu_count", "options", "need", "device_ids"),
    [
        pytest.param(0, {"num_processes": 0}, 0, None, id="cpu-only-without-gpus"),
        pytest.param(2, {"num_processes": None}, 1, None, id="default-one-gpu"),
        pytest.param(4, {"num_processes": None, "device_ids": [1, 3]}, 2, (1, 3),
                     id="need-follows-device-ids"),
        pytest.param(4, {"num_processes": None, "device_ids": [1, 3], "any_gpu": True}, 2, (1, 3),
                     id="any-gpu-any-two-when-device-ids-name-two"),
        pytest.param(4, {"num_processes": 4}, 4, None, id="whole-inventory"),
    ],
)
def test_submit_resolves_the_gpu_need(
    gpu_count: int, options: dict[str, Any], need: int, device_ids: tuple[int, ...] | None
) -> None:
    world = World(gpu_count)
    world.submit(ALICE, "j", now=1.0, **options)
    spec = world.state.jobs["j"].spec
    assert (spec.num_processes, spec.device_ids, spec.target) == (need, device_ids, "local")


@pytest.mark.parametrize(
    ("in_config", "in_body", "need", "device_ids"),
    [
        pytest.param({"num_processes": 2, "device_ids": [2, 3]}, {"num_processes": 1}, 1, None,
                     id="body-count-drops-config-ids-naming-another-count"),
        pytest.param({"num_processes": 2, "device_ids": [2, 3]}, {"num_processes": 2}, 2, (2, 3),
                     id="body-count-keeps-config-ids-naming-that-count"),
        pytest.param({"num_processes": 2, "device_ids": [2, 3]}, {"num_processes": 0}, 0, None,
                     id="body-makes-it-cpu-only"),
        pytest.param({"num_processes": 2}, {"device_ids": [1]}, 1, (1,),
                     id="body-ids-say-how-many-gpus"),
        pytest.param({"num_processes": 2, "device_ids": [2, 3]}, {"device_ids": [0, 1, 2]},
                     3, (0, 1, 2), id="body-ids-replace-config-ids"),
        pytest.param({"num_processes": 2}, {"device_ids": [1], "any_gpu": True}, 2, (1,),
                     id="any-gpu-keeps-the-config-count"),
        pytest.param({"num_processes": 1}, {"num_processes": 3, "device_ids": [0, 1, 2]},
                     3, (0, 1, 2), id="body-pair-wins"),
    ],
)
def test_the_submit_body_overrides_the_configs_gpu_fields(
    in_config: dict[str, Any], in_body: dict[str, Any], need: int,
    device_ids: tuple[int, ...] | None,
) -> None:
    world = World(4)
    world.do(Submit(job_id="j", config_name="train", config=config(**in_config), **in_body),
             ALICE, now=1.0)
    spec = world.state.jobs["j"].spec
    assert (spec.num_processes, spec.device_ids) == (need, device_ids)


@pytest.mark.parametrize(
    ("in_config", "in_body"),
    [
        pytest.param({"num_processes": 2, "device_ids": [2]}, {}, id="config-disagrees-itself"),
        pytest.param({}, {"num_processes": 2, "device_ids": [0]}, id="body-disagrees-itself"),
    ],
)
def test_a_count_and_device_ids_that_disagree_are_refused(
    in_config: dict[str, Any], in_body: dict[str, Any]
) -> None:
    world = World(4)
    with pytest.raises(InvalidRequest, match="as many device_ids as processes") as refused:
        world.do(Submit(job_id="j", config_name="train", config=config(**in_config), **in_body),
                 ALICE, now=1.0)
    assert "num_processes is 2 but device_ids names 1 GPU;" in str(refused.value)
    assert "j" not in world.state.jobs
