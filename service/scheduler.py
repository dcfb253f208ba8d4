"""The scheduler: SPEC section 4, as a pure function of the state and the time.

Theory of operation
-------------------
Effective priority is ``p = priority_override ?? priority``, lifted by aging
(``starvation_boost`` per whole ``starvation_threshold`` waited) but never above
Urgent (30) by aging alone. The queue order is effective priority descending, then
``queued_at``, then submission order.

The pending index (``projections.state.PendingIndex``) keeps jobs in *levels* of equal
base priority and GPU need, each sorted by ``(queued_at, seq)``; inside one level that
is already queue order at any instant, so the global order is a heap merge of levels.

A pass walks that order. For each job, in this order:

1. running jobs (all targets) ``>= max_concurrent``          -> stop the pass;
2. the user's running jobs ``>= user_max_concurrent``        -> skip (``user_limit``);
3. fair share on, job has a team, team ``>= team_max_concurrent`` -> skip (``team_limit``);
4. local jobs: running local jobs ``>= local_job_max_concurrent`` -> skip
   (``local_job_limit``); allocated GPUs + need ``> local_gpu_max_concurrent`` -> skip
   (``local_gpu_limit``); not enough free GPUs -> skip (``gpus_busy``);
5. otherwise dispatch it.

A GPU job the inventory can no longer hold (GPUs removed after it was submitted) waits
with ``gpu_inventory`` and reserves nothing, so it cannot hold back the jobs behind it.

GPU choice: with ``device_ids`` and not ``any_gpu``, exactly those devices once all are
free; otherwise the lowest-indexed free GPUs.

No starvation by backfill: the first local job in the pass that waits for GPUs reserves
them. Jobs after it may start only on GPUs outside its ``device_ids``; if it has no
``device_ids`` (or ``any_gpu``), no later local job starts in this pass
(``reserved_for_higher_priority``), CPU-only ones (``num_processes = 0``) included: they
take no GPU, but they take the local job slots the waiting job will need. A job held by
``local_gpu_max_concurrent`` waits for GPUs too (for allocated ones to be released): it
reserves every GPU, whatever its ``device_ids``, since a GPU taken on any device spends
the budget it waits for. A job that needs more GPUs than a lowered limit allows reserves
nothing, like one the inventory can no longer hold.

A pass visits the jobs it can start and the heads of held users, not the whole queue:
a user (or team) at its limit stays at it for the rest of the pass, so the walk stops
following that user's stream of jobs in that team (a job keeps the team it was submitted
in: a user moved to another team has a stream in each); a level whose jobs can no longer
start is dropped.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import Literal

from msgspec import Struct

from events.types import JobDispatched, Settings
from projections.state import JobEntry, OrderKey, QueueState, StreamLevel
from service.wording import is_are, plural, running_count

__all__ = [
    "URGENT",
    "Reason",
    "Explanation",
    "Placement",
    "effective_priority",
    "decide",
    "explain",
    "probe",
    "pending_in_order",
    "position",
    "never_fits",
]

URGENT = 30

ReasonCode = Literal[
    "global_limit",
    "user_limit",
    "team_limit",
    "local_job_limit",
    "local_gpu_limit",
    "gpus_busy",
    "gpu_inventory",
    "reserved_for_higher_priority",
    "awaiting_approval",
    "jobs_ahead",
    "ready",
    "running",
    "finished",
]


class Reason(Struct, frozen=True):
    code: ReasonCode
    detail: str


class Explanation(Struct, frozen=True):
    job_id: str
    status: str
    position: int | None
    reasons: list[Reason]


class Placement(Struct, frozen=True):
    """What a pass would do with one job: start it (with these GPUs) or why not."""

    starts: bool
    gpus: tuple[int, ...] = ()
    reason: Reason | None = None


# ---------------------------------------------------------------- priority and order


def effective_priority(p: int, waited_seconds: float, settings: Settings) -> int:
    """``p`` lifted by aging; aging alone never lifts a job above Urgent (30)."""
    if p >= URGENT:
        return p
    threshold = settings.starvation_threshold_minutes * 60.0
    if settings.starvation_boost <= 0 or threshold <= 0 or waited_seconds < threshold:
        return p
    lift = settings.starvation_boost * (waited_seconds // threshold)  # a float: never overflows
    return URGENT if p + lift >= URGENT else p + int(lift)


def job_effective_priority(job: JobEntry, now: float, settings: Settings) -> int:
    return effective_priority(job.base_priority, now - job.queued_at, settings)


# (-effective priority, queued_at, submit seq): smaller runs first
SortKey = tuple[int, float, int]


def _sort_key(p: int, queued_at: float, seq: int, now: float, settings: Settings) -> SortKey:
    return (-effective_priority(p, now - queued_at, settings), queued_at, seq)


def pending_in_order(state: QueueState, now: float) -> Iterator[JobEntry]:
    """Every pending job in queue order, lazily (a heap merge of the levels)."""
    settings = state.settings
    heap: list[tuple[SortKey, int, StreamLevel, str]] = []
    for level, keys in state.pending.levels.items():
        queued_at, seq, job_id = keys[0]
        heap.append((_sort_key(level[0], queued_at, seq, now, settings), 0, level, job_id))
    heapq.heapify(heap)
    jobs = state.jobs
    levels = state.pending.levels
    while heap:
        _, index, level, job_id = heapq.heappop(heap)
        yield jobs[job_id]
        keys = levels[level]
        if index + 1 < len(keys):
            queued_at, seq, next_id = keys[index + 1]
            key = _sort_key(level[0], queued_at, seq, now, settings)
            heapq.heappush(heap, (key, index + 1, level, next_id))


def _ahead_in_level(keys: Sequence[OrderKey], p: int, target: SortKey, now: float, settings: Settings) -> int:
    """How many jobs of one level come before ``target`` (levels are sorted in order)."""
    lo, hi = 0, len(keys)
    while lo < hi:
        mid = (lo + hi) // 2
        queued_at, seq, _ = keys[mid]
        if _sort_key(p, queued_at, seq, now, settings) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


def position(state: QueueState, job: JobEntry, now: float) -> int | None:
    """1-based rank among all pending jobs; ``None`` when the job is not pending."""
    if job.status != "pending":
        return None
    settings = state.settings
    target = _sort_key(job.base_priority, job.queued_at, job.submit_seq, now, settings)
    ahead = 0
    for level, keys in state.pending.levels.items():
        if level[0] == job.base_priority:
            # same base priority: queue order is (queued_at, seq) order, aging being
            # monotone in the wait, so the sorted keys can be bisected directly
            ahead += keys.bisect_left((job.queued_at, job.submit_seq, ""))
        else:
            ahead += _ahead_in_level(keys, level[0], target, now, settings)
    return ahead + 1


# ---------------------------------------------------------------- never fits


def never_fits(state: QueueState, need: int, device_ids: tuple[int, ...] | None) -> str | None:
    """Why a local job with this need could never start here, or ``None`` if it could."""
    inventory = {d.index for d in state.gpus}
    limit = state.settings.local_gpu_max_concurrent
    if need > len(inventory):
        return (f"num_processes {need} is more than the {plural(len(inventory), 'GPU')} this "
                "server has")
    if limit is not None and need > limit:
        return f"num_processes {need} is more than local_gpu_max_concurrent ({limit})"
    if device_ids:
        outside = sorted(set(device_ids) - inventory)
        if outside:
            known = sorted(inventory) or "none"
            return f"device_ids {outside} are not in the GPU inventory (indices: {known})"
    return None


# ---------------------------------------------------------------- the pass


_ALL_GPUS = None  # a reservation that holds every GPU

_HEAD = 0  # heap entry comes from a level's heads stream
_NEXT = 1  # heap entry is a user's next job within one level
_PROBE = 2  # heap entry is the job being probed or explained

HeapEntry = tuple[SortKey, int, StreamLevel, int, str]


class _Pass:
    """The bookkeeping of one walk: counts as they would be after its dispatches."""

    def __init__(self, state: QueueState) -> None:
        self.state = state
        self.settings = state.settings
        self.running = state.running_total
        self.user_running: dict[int, int] = {}
        self.team_running: dict[str, int] = {}
        self.local_running = state.local_running
        self.allocated = state.allocated_gpu_count
        self.free = set(state.free_gpus())
        self.inventory = frozenset(d.index for d in state.gpus)
        self.reserved: set[int] | None = set()  # None: every GPU is reserved
        self.reserved_for = ""  # the job the reservation is for
        self.local_blocked = False
        self.stopped = False

    def users(self, user_id: int) -> int:
        count = self.user_running.get(user_id)
        return self.state.user_running.get(user_id, 0) if count is None else count

    def teams(self, team_id: str) -> int:
        count = self.team_running.get(team_id)
        return self.state.team_running.get(team_id, 0) if count is None else count

    def place(self, job: JobEntry) -> Placement:
        """Rules 1-5 for one job, in order, against the counts so far."""
        s = self.settings
        if self.running >= s.max_concurrent:
            return Placement(False, reason=Reason(
                "global_limit", f"{running_count(self.running, 'job')}, max_concurrent is "
                f"{s.max_concurrent}"))
        if self.users(job.user_id) >= s.user_max_concurrent:
            return Placement(False, reason=Reason(
                "user_limit", f"user {job.user_id} already runs "
                f"{plural(self.users(job.user_id), 'job')}, user_max_concurrent is "
                f"{s.user_max_concurrent}"))
        if s.enable_fair_share and job.team_id is not None:
            if self.teams(job.team_id) >= s.team_max_concurrent:
                return Placement(False, reason=Reason(
                    "team_limit", f"team {job.team_id} already runs "
                    f"{plural(self.teams(job.team_id), 'job')}, team_max_concurrent is "
                    f"{s.team_max_concurrent}"))
        if job.spec.target != "local":
            return Placement(True)
        if self.local_running >= s.local_job_max_concurrent:
            return Placement(False, reason=Reason(
                "local_job_limit", f"{running_count(self.local_running, 'local job')}, "
                f"local_job_max_concurrent is {s.local_job_max_concurrent}"))
        need = job.spec.num_processes
        if need == 0:
            if self.reserved is _ALL_GPUS:  # it takes no GPU, but it would take a local slot
                return Placement(False, reason=Reason(
                    "reserved_for_higher_priority",
                    f"job {self.reserved_for}, ahead of it in the queue, waits for GPUs; no "
                    "local job behind it starts before it"))
            return Placement(True)
        outgrown = self._outgrown(job)
        if outgrown is not None:  # the inventory shrank after submission: wait, reserve nothing
            return Placement(False, reason=Reason("gpu_inventory", outgrown))
        limit = s.local_gpu_max_concurrent
        if limit is not None and need > limit:  # lowered after submission: wait, reserve nothing
            return Placement(False, reason=Reason(
                "local_gpu_limit", f"it needs {plural(need, 'GPU')} and "
                f"local_gpu_max_concurrent is now {limit}; it waits until the limit is raised"))
        if limit is not None and self.allocated + need > limit:
            return Placement(False, reason=Reason(
                "local_gpu_limit", f"{plural(self.allocated, 'GPU')} {is_are(self.allocated)} "
                f"allocated and this job needs {need}, local_gpu_max_concurrent is {limit}"))
        gpus = self._choose(job, self.reserved)
        if gpus is not None:
            return Placement(True, gpus=gpus)
        if self.reserved != set() and self._choose(job, set()) is not None:
            return Placement(False, reason=Reason(
                "reserved_for_higher_priority",
                f"the free GPUs it could use are held for job {self.reserved_for}, ahead of "
                "it in the queue, which waits for GPUs"))
        return Placement(False, reason=Reason("gpus_busy", self._busy_detail(job)))

    def _outgrown(self, job: JobEntry) -> str | None:
        """Why a job accepted at submit (``never_fits`` let it in) cannot start on the
        inventory as it is now. Unlike at submit, ``any_gpu`` makes ``device_ids``
        irrelevant here: submit refuses indices that do not exist at all; a job that
        may take any GPU can still run when one of them has gone."""
        spec = job.spec
        if spec.num_processes > len(self.inventory):
            return (f"it needs {plural(spec.num_processes, 'GPU')} and the GPU inventory now has "
                    f"{len(self.inventory)}; it waits until GPUs come back")
        if spec.device_ids and not spec.any_gpu and not self.inventory.issuperset(spec.device_ids):
            gone = sorted(set(spec.device_ids) - self.inventory)
            if len(gone) == 1:
                return (f"GPU {gone[0]} is no longer in the GPU inventory; it waits until it "
                        "comes back")
            return f"GPUs {gone} are no longer in the GPU inventory; it waits until they come back"
        return None

    def _choose(self, job: JobEntry, reserved: set[int] | None) -> tuple[int, ...] | None:
        if reserved is _ALL_GPUS:
            return None
        usable = self.free - reserved if reserved else self.free
        spec = job.spec
        if spec.device_ids and not spec.any_gpu:
            wanted = spec.device_ids
            return tuple(wanted) if usable.issuperset(wanted) else None
        if len(usable) < spec.num_processes:
            return None
        return tuple(sorted(usable)[: spec.num_processes])

    def _busy_detail(self, job: JobEntry) -> str:
        spec = job.spec
        if spec.device_ids and not spec.any_gpu:
            busy = sorted(set(spec.device_ids) - self.free)
            return f"it needs GPUs {list(spec.device_ids)} and {busy} are in use"
        free = len(self.free)
        return f"it needs {plural(spec.num_processes, 'GPU')} and {free} {is_are(free)} free"

    def record(self, job: JobEntry, placement: Placement) -> None:
        """Count a decision so the jobs after it see it."""
        if placement.starts:
            self.running += 1
            self.user_running[job.user_id] = self.users(job.user_id) + 1
            if job.team_id is not None:
                self.team_running[job.team_id] = self.teams(job.team_id) + 1
            if job.spec.target == "local":
                self.local_running += 1
                self.allocated += len(placement.gpus)
                self.free.difference_update(placement.gpus)
            if self.running >= self.settings.max_concurrent:
                self.stopped = True
            if self.local_running >= self.settings.local_job_max_concurrent:
                self.local_blocked = True
            return
        assert placement.reason is not None
        code = placement.reason.code
        if code == "global_limit":
            self.stopped = True
        elif code == "local_job_limit":
            self.local_blocked = True
        elif code in ("gpus_busy", "local_gpu_limit") and self.reserved == set():
            self.reserved = self._reservation(job, code)
            self.reserved_for = job.job_id

    def _reservation(self, job: JobEntry, code: str) -> set[int] | None:
        """What the first local job that waits for GPUs holds back from the jobs after it."""
        spec = job.spec
        if code == "local_gpu_limit":
            # it waits for allocated GPUs to be released: a GPU anyone else took, on any
            # device, would put it further off; one that can never fit holds nothing
            limit = self.settings.local_gpu_max_concurrent
            return _ALL_GPUS if limit is not None and spec.num_processes <= limit else set()
        if spec.device_ids and not spec.any_gpu:
            return set(spec.device_ids)
        return _ALL_GPUS

    def level_is_dead(self, level: StreamLevel) -> bool:
        """No job of this level can start for the rest of the pass."""
        return self.local_blocked or self.reserved is _ALL_GPUS


def _walk(
    state: QueueState, now: float, probe_job: JobEntry | None = None
) -> Iterator[tuple[JobEntry, Placement]]:
    """Yield each visited job with its placement, in queue order.

    With ``probe_job``, that job is visited at its place in the order even if its stream
    was cut off, and the walk ends right after it.
    """
    walk = _Pass(state)
    settings = state.settings
    if walk.running >= settings.max_concurrent:
        # rule 1 stops the pass at its first job, whichever it is: nobody is visited
        # (the steady state of a long queue, so the heap of every user's head is not built)
        if probe_job is not None:
            yield probe_job, walk.place(probe_job)
        return
    index = state.pending
    heap: list[HeapEntry] = []
    for level, heads in index.heads.items():
        queued_at, seq, job_id = heads[0]
        heap.append((_sort_key(level[0], queued_at, seq, now, settings), _HEAD, level, 0, job_id))
    probe_id = None
    if probe_job is not None:
        probe_id = probe_job.job_id
        key = _sort_key(
            probe_job.base_priority, probe_job.queued_at, probe_job.submit_seq, now, settings
        )
        heap.append((key, _PROBE, probe_job.level, 0, probe_id))
    heapq.heapify(heap)
    jobs = state.jobs

    while heap and not walk.stopped:
        _, kind, level, at, job_id = heapq.heappop(heap)
        if kind == _HEAD:
            heads = index.heads[level]
            if at + 1 < len(heads) and not walk.level_is_dead(level):
                queued_at, seq, next_id = heads[at + 1]
                key = _sort_key(level[0], queued_at, seq, now, settings)
                heapq.heappush(heap, (key, _HEAD, level, at + 1, next_id))
        if kind == _PROBE:
            assert probe_job is not None
            placement = walk.place(probe_job)
            yield probe_job, placement
            return
        if job_id == probe_id:
            continue  # visited as the probe, at the same place in the order
        if walk.level_is_dead(level):
            continue
        job = jobs[job_id]
        placement = walk.place(job)
        walk.record(job, placement)
        yield job, placement
        if placement.reason is not None and placement.reason.code in ("user_limit", "team_limit"):
            continue  # the user (and team) stays held for the rest of the pass
        mine = index.by_user[(job.user_id, job.team_id, level)]
        following = at + 1 if kind == _NEXT else 1
        if following < len(mine):
            queued_at, seq, next_id = mine[following]
            key = _sort_key(level[0], queued_at, seq, now, settings)
            heapq.heappush(heap, (key, _NEXT, level, following, next_id))

    if probe_job is not None and walk.stopped:
        yield probe_job, walk.place(probe_job)


def decide(state: QueueState, now: float) -> list[JobDispatched]:
    """One scheduling pass: the dispatches it makes, in order."""
    return [
        JobDispatched(job_id=job.job_id, gpus=placement.gpus, attempt=job.attempt)
        for job, placement in _walk(state, now)
        if placement.starts
    ]


def probe(state: QueueState, job: JobEntry, now: float) -> Placement:
    """Would ``job`` start in a pass now? ``job`` may be one not yet in the state."""
    for visited, placement in _walk(state, now, probe_job=job):
        if visited is job:
            return placement
    raise AssertionError("the probe is always visited")  # pragma: no cover


def explain(state: QueueState, job_id: str, now: float) -> Explanation:
    """Why ``job_id`` is not running now: the same walk as :func:`decide`."""
    job = state.jobs[job_id]
    if job.status == "blocked":
        reasons = [Reason("awaiting_approval", job.approval_reason or "it awaits an admin's approval")]
        return Explanation(job_id, job.status, None, reasons)
    if job.status == "running":
        return Explanation(job_id, job.status, None, [Reason("running", "it is running")])
    if job.status != "pending":
        return Explanation(job_id, job.status, None, [Reason("finished", f"it is {job.status}")])
    placement = probe(state, job, now)
    pos = position(state, job, now)
    reasons: list[Reason] = []
    if placement.starts:
        reasons.append(Reason("ready", "it can start now; the next scheduling pass starts it"))
    else:
        assert placement.reason is not None
        reasons.append(placement.reason)
    if pos is not None and pos > 1:
        reasons.append(Reason("jobs_ahead", f"{plural(pos - 1, 'pending job')} {is_are(pos - 1)} "
                              "ahead of it"))
    return Explanation(job_id, job.status, pos, reasons)
