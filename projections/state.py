"""The in-memory state every read and every decision works from.

It is built only by :func:`projections.fold.apply`; nothing else mutates it.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from copy import copy
from typing import Literal

from msgspec import Struct, field
from sortedcontainers import SortedList

from events.types import GpuDevice, JobSpec, Level, Settings

Status = Literal["pending", "blocked", "running", "completed", "failed", "cancelled", "rejected"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "rejected"})
STATUSES: tuple[str, ...] = (
    "pending", "blocked", "running", "completed", "failed", "cancelled", "rejected",
)

# A pending job's key inside its stream: the stream is sorted by it.
OrderKey = tuple[float, int, str]  # (queued_at, submit seq, job_id)
# A stream of pending jobs sharing a base priority and a kind of need.
StreamLevel = tuple[int, bool]  # (base priority p, needs GPUs)


class JobEntry(Struct, kw_only=True, gc=False):
    """One job as the queue sees it (mutable: only the fold writes to it).

    ``gc=False``: the cyclic collector never walks the (many, long-lived) entries; they
    hold only a spec, metadata and scalars, so they can never be part of a cycle.
    """

    job_id: str
    user_id: int
    team_id: str | None
    spec: JobSpec
    priority: int
    status: Status
    submitted_at: float
    queued_at: float
    submit_seq: int
    priority_override: int | None = None
    started_at: float | None = None
    completed_at: float | None = None
    requires_approval: bool = False
    approval_reason: str | None = None
    attempt: int = 1
    max_attempts: int = 3
    error_message: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    allocated_gpus: tuple[int, ...] = ()
    exit_code: int | None = None
    worker_id: str | None = None
    pid: int | None = None
    process_start_time: int | None = None
    cancel_requested: bool = False
    idempotency_key: str | None = None
    request_hash: str | None = None

    @property
    def base_priority(self) -> int:
        """``priority_override ?? priority`` (SPEC section 4)."""
        return self.priority if self.priority_override is None else self.priority_override

    @property
    def level(self) -> StreamLevel:
        return (self.base_priority, self.spec.num_processes > 0)

    @property
    def order_key(self) -> OrderKey:
        return (self.queued_at, self.submit_seq, self.job_id)


class User(Struct, kw_only=True):
    user_id: int
    name: str
    level: Level
    team_id: str | None = None


class Token(Struct, kw_only=True):
    token_id: str
    user_id: int
    token_hash: str


class PendingIndex:
    """Pending jobs, kept in order by every event rather than sorted per read.

    Jobs are grouped into *levels* by base priority and GPU need. Within a level every
    job has the same base priority, so its effective priority (with aging) can only fall
    as ``queued_at`` grows: sorting a level by ``(queued_at, seq)`` keeps it in queue
    order at every instant, and the global order is a merge of at most a few levels.

    - ``levels[L]``: every pending job at level L (positions, listings): a SortedList;
    - ``by_user[(user, team, L)]``: one user's jobs at level L submitted in one team (the
      scheduler's skip-and-continue: a user or team limit holds all of them): a sorted
      deque, since jobs join at the back and mostly leave from the front. A job keeps the
      team it was submitted in, so a user moved to another team has a stream in each;
    - ``heads[L]``: the first job of each of those streams at level L: a sorted list.
    """

    __slots__ = ("levels", "by_user", "heads", "enabled")

    def __init__(self) -> None:
        self.levels: dict[StreamLevel, SortedList] = {}
        self.by_user: dict[tuple[int, str | None, StreamLevel], deque[OrderKey]] = {}
        self.heads: dict[StreamLevel, list[OrderKey]] = {}
        self.enabled = True

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self.levels.values())

    def add(self, job: JobEntry) -> None:
        if not self.enabled:
            return
        # `job.level` and `job.order_key`, spelled out: this runs twice per submission
        p = job.priority if job.priority_override is None else job.priority_override
        level = (p, job.spec.num_processes > 0)
        key = (job.queued_at, job.submit_seq, job.job_id)
        jobs = self.levels.get(level)
        if jobs is None:
            jobs = self.levels[level] = SortedList()
        jobs.add(key)
        stream = (job.user_id, job.team_id, level)
        mine = self.by_user.get(stream)
        if mine is None:
            self.by_user[stream] = deque((key,))
            old_head = None
        else:
            old_head = mine[0]
            _insert(mine, key)
        if old_head is None or key < old_head:  # the job heads its user's stream now
            heads = self.heads.get(level)
            if heads is None:
                heads = self.heads[level] = []
            if old_head is not None:
                _delete(heads, old_head)
            _insert(heads, key)

    def remove(self, job: JobEntry) -> None:
        if not self.enabled:
            return
        p = job.priority if job.priority_override is None else job.priority_override
        level = (p, job.spec.num_processes > 0)
        key = (job.queued_at, job.submit_seq, job.job_id)
        jobs = self.levels[level]
        jobs.remove(key)
        if not jobs:
            del self.levels[level]
        stream = (job.user_id, job.team_id, level)
        mine = self.by_user[stream]
        was_head = mine[0] == key
        _delete(mine, key)
        if was_head:
            heads = self.heads[level]
            _delete(heads, key)
            if mine:
                _insert(heads, mine[0])
            elif not heads:
                del self.heads[level]
        if not mine:
            del self.by_user[stream]

    def copy(self) -> PendingIndex:
        twin = PendingIndex()
        twin.levels = {level: keys.copy() for level, keys in self.levels.items()}
        twin.by_user = {key: keys.copy() for key, keys in self.by_user.items()}
        twin.heads = {level: keys.copy() for level, keys in self.heads.items()}
        twin.enabled = self.enabled
        return twin

    def rebuild(self, pending: list[JobEntry]) -> None:
        """Build the whole index at once (after a replay that ran with it disabled)."""
        grouped: dict[StreamLevel, list[OrderKey]] = {}
        mine: dict[tuple[int, str | None, StreamLevel], list[OrderKey]] = {}
        for job in pending:
            level = job.level
            key = job.order_key
            grouped.setdefault(level, []).append(key)
            mine.setdefault((job.user_id, job.team_id, level), []).append(key)
        self.levels = {level: SortedList(keys) for level, keys in grouped.items()}
        self.by_user = {stream: deque(sorted(keys)) for stream, keys in mine.items()}
        heads: dict[StreamLevel, list[OrderKey]] = {}
        for (_, _, level), keys in self.by_user.items():
            heads.setdefault(level, []).append(keys[0])
        self.heads = {level: sorted(keys) for level, keys in heads.items()}
        self.enabled = True


def _insert(keys: deque[OrderKey] | list[OrderKey], key: OrderKey) -> None:
    """Insert into a sorted sequence, after equal keys (as ``SortedList.add``)."""
    if not keys or key >= keys[-1]:
        keys.append(key)  # the usual case: the newest job
    else:
        keys.insert(bisect_right(keys, key), key)


def _delete(keys: deque[OrderKey] | list[OrderKey], key: OrderKey) -> None:
    """Remove one ``key`` from a sorted sequence; ``ValueError`` if it is not there."""
    if keys and keys[0] == key:
        del keys[0]  # the usual case: the oldest job (O(1) on a deque)
        return
    at = bisect_left(keys, key)
    if at == len(keys) or keys[at] != key:
        raise ValueError(f"{key!r} not in the pending index")
    del keys[at]


class QueueState:
    """Everything the fold knows. Attributes are read by the API and the deciders."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.last_at = 0.0
        self.settings = Settings()
        self.jobs: dict[str, JobEntry] = {}
        self.pending = PendingIndex()
        self.blocked: dict[str, None] = {}  # in submission order (approval expiry)
        self.running: dict[str, None] = {}
        self.user_running: dict[int, int] = {}
        self.team_running: dict[str, int] = {}
        self.local_running = 0
        self.status_counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self.user_active: dict[int, int] = {}  # pending + running per user
        self.gpu_backend = "none"
        self.gpus: tuple[GpuDevice, ...] = ()
        self.gpu_holder: dict[int, str] = {}  # device index -> job id
        # Dispatch times and waits, in time order, with running sums (SPEC 7 avg wait),
        # and the ones a re-queue took back, as (dispatch time, wait) in time order: a job
        # counts once, with the start it has now.
        self.wait_at: list[float] = []
        self.wait_sums: list[float] = [0.0]
        self.waits_taken_back: list[tuple[float, float]] = []
        # Times runs ended (a slot freed) and running sums of their lengths (wait estimates).
        self.run_end_at: list[float] = []
        self.run_sums: list[float] = [0.0]
        self.users: dict[int, User] = {}
        self.tokens: dict[str, Token] = {}
        self.token_by_hash: dict[str, str] = {}
        self.idempotency: dict[tuple[int, str], str] = {}

    def copy(self) -> QueueState:
        """A twin that shares nothing the fold changes in place (the engine's 2nd copy).

        Containers are copied and every job entry with them; what they hold besides
        (specs, settings, users, tokens, keys) is immutable or replaced, never changed.
        """
        twin = QueueState.__new__(QueueState)
        for name, value in vars(self).items():
            setattr(twin, name, value.copy() if isinstance(value, (dict, list)) else value)
        twin.jobs = {job_id: copy(job) for job_id, job in self.jobs.items()}
        twin.pending = self.pending.copy()
        return twin

    @property
    def running_total(self) -> int:
        return len(self.running)

    @property
    def allocated_gpu_count(self) -> int:
        return len(self.gpu_holder)

    def free_gpus(self) -> list[int]:
        """Indices of inventory GPUs that no running job holds, lowest first."""
        return sorted(d.index for d in self.gpus if d.index not in self.gpu_holder)
